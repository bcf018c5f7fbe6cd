"""The C++ backend's per-ISA block kernels (AVX-512, AVX2, baseline): each level the CPU runs gives
bit-identical results to the others and matches the reference, across block boundaries, dtypes,
branch counts (fused K <= 4 and the generic path) and every sampling mode."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_logprobs_close, make_logits

from safedecode import _C
from safedecode.ops import contrastive_logprobs, contrastive_sample

ISAS = _C.cpu_isas()
MODES = {
    "greedy": dict(temperature=0.0),
    "full": dict(temperature=0.8),
    "top_k": dict(temperature=0.7, top_k=50),
    "top_k1": dict(temperature=1.0, top_k=1),
    "top_kp": dict(temperature=0.7, top_k=40, top_p=0.9),
    "top_p": dict(temperature=1.2, top_p=0.5),
    "beta": dict(temperature=0.7, top_k=50, top_p=0.9, beta=0.1),
    "min_p": dict(temperature=1.0, min_p=0.05),
}


@pytest.fixture
def isa_runner():
    before = _C.cpu_isa()

    def run(isa, fn, *args, **kw):
        _C.set_cpu_isa(isa)
        return fn(*args, **kw)

    yield run
    _C.set_cpu_isa(before)


def test_levels_listed_best_first():
    assert ISAS[-1] == "baseline" and _C.cpu_isa() in ISAS
    order = ["avx512", "avx2", "baseline"]
    assert ISAS == [x for x in order if x in ISAS]


def test_unknown_level_is_a_clear_error():
    with pytest.raises(ValueError, match="not built or not supported here; choose one of: "
                       + ", ".join(ISAS)):
        _C.set_cpu_isa("avx9000")


def test_env_var_picks_the_level():
    env = {**os.environ, "SAFEDECODE_CPU_ISA": "baseline"}
    out = subprocess.run([sys.executable, "-c", "from safedecode import _C; print(_C.cpu_isa())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "baseline"


def test_env_var_with_an_unknown_level_warns():
    env = {**os.environ, "SAFEDECODE_CPU_ISA": "avx9000"}
    code = "from safedecode.ops import cpp; cpp.load(); print(cpp._C.cpu_isa())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ISAS[0]
    assert "SAFEDECODE_CPU_ISA='avx9000' is not built or not supported" in out.stderr


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [1, 37, 1000, 4133])
def test_levels_agree_bitwise_and_match_reference(isa_runner, mode, k, dtype, v):
    kw = MODES[mode]
    logits = make_logits(k, 6, v, dtype=dtype, seed=v + k)
    logits[:, 1, ::7] = float("-inf")  # masked entries in every chunk
    logits[:, 1, 3 % v] = 0.0
    logits[:, 2] = logits[:, 2].round()  # exact ties
    weights = [1.0] + [(-0.5) ** i for i in range(1, k)]
    seeds = torch.arange(6) * 7919
    ref_lp = contrastive_logprobs(logits, weights, backend="reference", **kw)
    outs = {}
    for isa in ISAS:
        tok, lp = isa_runner(isa, contrastive_sample, logits, weights, backend="cpp", seed=seeds,
                             step=11, return_logprobs=True, **kw)
        dist = isa_runner(isa, contrastive_logprobs, logits, weights, backend="cpp", **kw)
        outs[isa] = (tok, lp, dist)
        assert_logprobs_close(ref_lp, dist)
        assert torch.isfinite(ref_lp.gather(1, tok[:, None])).all(), f"{isa}: token outside support"
        if kw["temperature"] == 0.0:
            ref_tok = contrastive_sample(logits, weights, backend="reference", **kw)
            assert torch.equal(tok, ref_tok), isa
    first = outs[ISAS[0]]
    for isa in ISAS[1:]:
        for a, b in zip(first, outs[isa], strict=True):
            assert torch.equal(a, b), f"{ISAS[0]} and {isa} differ"


@pytest.mark.parametrize("top_k", [1, 2, 50, 999, 1000, 1001, 5000])
def test_running_top_k_threshold_keeps_exact_support(isa_runner, top_k):
    """The prefilter's threshold (k-th largest of a prefix, then of the candidates) never drops
    a top-k token: many ties, big values late in the row, a -inf-heavy first block."""
    g = torch.Generator().manual_seed(top_k)
    v = 9000
    logits = (torch.randn(2, 4, v, generator=g) * 2).round()
    logits[:, 0, :1024] = float("-inf")
    logits[0, 0, 5] = 0.0
    logits[:, 1] = torch.linspace(-5, 5, v)  # increasing: every block raises the threshold
    logits[:, 3] = 1.0  # all tied
    kw = dict(temperature=1.0, top_k=min(top_k, v))
    ref = contrastive_logprobs(logits, [1.0, -0.5], backend="reference", **kw)
    for isa in ISAS:
        out = isa_runner(isa, contrastive_logprobs, logits, [1.0, -0.5], backend="cpp", **kw)
        assert torch.equal(torch.isfinite(ref), torch.isfinite(out)), isa
        assert_logprobs_close(ref, out)
