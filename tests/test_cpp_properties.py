"""Property tests (hypothesis) for the C++ backend against the reference.

Also the fuzz target of the sanitizer build (scripts/sanitize.sh runs this file under ASan+UBSan).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_logprobs_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safedecode import _C
from safedecode.ops import contrastive_logprobs, contrastive_sample

EXAMPLES = int(os.environ.get("SAFEDECODE_FUZZ_EXAMPLES", "300"))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def problems(draw):
    k = draw(st.integers(1, 3))
    b = draw(st.integers(1, 5))
    v = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.01, 1.0, 5.0, 30.0]))
    logits = torch.randn(k, b, v, generator=g) * scale
    if draw(st.booleans()):  # quantised logits: many exact ties
        logits = logits.round()
    dead_frac = draw(st.sampled_from([0.0, 0.5, 0.99]))
    logits = logits.masked_fill(torch.rand(k, b, v, generator=g) < dead_frac, float("-inf"))
    logits[0, :, draw(st.integers(0, v - 1))] = 0.0  # keep the anchor alive
    rule = "union" if k == 2 and draw(st.booleans()) else "linear"
    weights = [draw(st.floats(0.1, 3.0))] + [draw(st.floats(-3.0, 3.0)) for _ in range(k - 1)]
    if rule == "union":
        weights[1] = abs(weights[1])
    kw = dict(
        rule=rule,
        temperature=draw(st.sampled_from([0.0, 0.3, 1.0, 2.0])),
        top_k=draw(st.integers(0, v + 2)),
        top_p=draw(st.sampled_from([1.0, 0.9, 0.5, 1e-3])),
        min_p=draw(st.sampled_from([0.0, 0.1, 0.9])),
        beta=draw(st.sampled_from([0.0, 0.01, 0.5, 1.0])),
    )
    return logits.to(dtype), weights, kw, seed


def _run(fn, *args, **kw):
    try:
        return fn(*args, **kw), None
    except ValueError as exc:
        return None, str(exc)


@pytest.fixture
def restore_isa():
    before = _C.cpu_isa()
    yield
    _C.set_cpu_isa(before)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(problems(), st.sampled_from(_C.cpu_isas()))
def test_cpp_matches_reference(restore_isa, problem, isa):
    """Every vector ISA level the CPU runs (AVX-512, AVX2, baseline) against the reference."""
    _C.set_cpu_isa(isa)
    logits, weights, kw, seed = problem
    ref, ref_err = _run(contrastive_logprobs, logits, weights, backend="reference", **kw)
    out, out_err = _run(contrastive_logprobs, logits, weights, backend="cpp", **kw)
    assert (ref_err is None) == (out_err is None), (ref_err, out_err)
    if ref_err is not None:
        return
    assert_logprobs_close(ref, out)
    tok, lp = contrastive_sample(logits, weights, backend="cpp", seed=seed, step=3,
                                 return_logprobs=True, **kw)
    assert torch.isfinite(ref.gather(1, tok[:, None])).all()
    assert torch.isfinite(lp).all() and (lp <= 1e-6).all()
    if kw["rule"] == "linear":
        greedy_kw = {**kw, "temperature": 0.0}
        g_ref = contrastive_sample(logits, weights, backend="reference", **greedy_kw)
        g_out = contrastive_sample(logits, weights, backend="cpp", **greedy_kw)
        assert torch.equal(g_ref, g_out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_convert_exactly(dtype):
    """Subnormals, signed zeros, extremes of each 16-bit format pick the right argmax."""
    info = torch.finfo(dtype)
    specials = torch.tensor([info.tiny, -info.tiny, info.max, -info.max, 0.0, -0.0,
                             info.smallest_normal / 4, 1.0, -1.0]).to(dtype)
    for i in range(specials.numel()):
        logits = torch.full((1, 1, specials.numel()), float(info.min)).to(dtype)
        logits[0, 0, i] = specials[i]
        ref = contrastive_sample(logits, [1.0], temperature=0.0, backend="reference")
        out = contrastive_sample(logits, [1.0], temperature=0.0, backend="cpp")
        assert torch.equal(ref, out)
