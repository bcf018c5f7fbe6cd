"""The op benchmark's cases under pytest-benchmark: fused vs naive vs transformers' warpers."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from safedecode.bench.ops import OpCase, fused_backends, implementations, make_logits
from safedecode.bench.timing import sync

CASES = [OpCase(b, v, beta=0.1) for v in (32000, 151936) for b in (1, 64)]
IMPLS = ["fused", "naive", "hf", "triton", "flashinfer"]  # the last two only on a GPU


@pytest.fixture(scope="module")
def backends(device: str) -> list[str]:
    return fused_backends(device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_op(benchmark, device: str, backends: list[str], case: OpCase, impl: str) -> None:
    logits = make_logits(case, device)
    fns = implementations(logits, case, backends)
    if impl not in fns:
        pytest.skip(f"{impl} is not available on {device}")
    fn = fns[impl]
    benchmark.group = f"op {case}"
    benchmark.extra_info.update(asdict(case), logits_bytes=logits.numel() * logits.element_size(),
                                backend=backends[0] if impl == "fused" else impl)

    def run() -> None:
        fn()
        sync(device)

    benchmark.pedantic(run, rounds=20, warmup_rounds=2, iterations=1)
