"""The generation benchmark's cases under pytest-benchmark (greedy, 32 new tokens)."""

from __future__ import annotations

import pytest

from safedecode.bench.generate import METHODS, Setup, prompts_for
from safedecode.bench.timing import sync

N_NEW = 32


@pytest.fixture(scope="module")
def setup(device: str) -> Setup:
    return Setup.load(device)


def _run(benchmark, device: str, fn) -> None:
    def run() -> None:
        fn()
        sync(device)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("b", [1, 8])
def test_generate(benchmark, device: str, setup: Setup, b: int, method: str) -> None:
    benchmark.group = f"generate B={b} greedy {N_NEW} new tokens"
    benchmark.extra_info.update(B=b, new_tokens=N_NEW, tokens=b * N_NEW,
                                weight_bytes=setup.weight_bytes)
    _run(benchmark, device, setup.generators(prompts_for(b), "greedy", N_NEW)[method])


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_prefill(benchmark, device: str, setup: Setup, shared: bool) -> None:
    dec = setup.sd if shared else setup.sd_noprefix
    prompts = prompts_for(32)
    benchmark.group = "prefill B=32, K=2"
    _run(benchmark, device, lambda: dec.generate(prompts, max_new_tokens=1))
