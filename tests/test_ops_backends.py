"""Every fast backend against the reference on random inputs (shapes x dtypes x parameters)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import DEVICE, FAST_BACKENDS
from helpers import (
    assert_logprobs_close,
    both,
    both_logprobs,
    greedy_near_tie_ok,
    make_logits,
)

from safedecode.ops import registry

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KS = [1, 2, 3]
BS = [1, 7, 64]
VS = [1, 111, 32000, 49152, 151936]
# The Triton interpreter simulates every program in numpy: keep its cases small.
INTERPRETED_MAX_ELEMS = 3 * 7 * 32000
INTERPRETED_MAX_ROWS = 7  # every row is several programs per pass: B=64 costs ~16 s a case


def _cases():
    for backend, k, b, v, dt in itertools.product(FAST_BACKENDS, KS, BS, VS, DTYPES):
        if backend == "triton" and DEVICE == "cpu" and (k * b * v > INTERPRETED_MAX_ELEMS
                                                         or b > INTERPRETED_MAX_ROWS):
            continue
        yield pytest.param(backend, k, b, v, dt, id=f"{backend}-K{k}-B{b}-V{v}-{str(dt)[6:]}")


CASES = list(_cases())


def _weights(k: int, b: int, per_row: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if per_row:
        w = torch.randn(b, k, generator=g)
        w[:, 0] = w[:, 0].abs() + 0.5
    else:
        w = torch.randn(k, generator=g)
        w[0] = w[0].abs() + 0.5
    return w


def _row_params(b: int, v: int, seed: int) -> dict:
    """Per-row sampling parameters spanning the interesting settings."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda options: torch.tensor(options)[torch.randint(len(options), (b,), generator=g)]  # noqa: E731
    return dict(
        temperature=pick([0.0, 0.5, 1.0, 1.7]),
        top_k=pick([0, 1, 5, 50, v]).clamp(max=v),
        top_p=pick([1.0, 0.95, 0.6, 1e-4]),
        min_p=pick([0.0, 0.0, 0.05]),
        beta=pick([0.0, 0.0, 0.1, 0.5]),
        seed=torch.randint(0, 2**40, (b,), generator=g),
        step=torch.randint(0, 1000, (b,), generator=g),
    )


def _to_device(d: dict) -> dict:
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


@pytest.mark.parametrize("backend,k,b,v,dtype", CASES)
def test_greedy_tokens_identical(backend, k, b, v, dtype):
    registry.load(backend)
    logits = make_logits(k, b, v, dtype, seed=k * 1000 + b + v, device=DEVICE)
    for per_row, beta in ((False, 0.0), (True, 0.0), (False, 0.1), (True, 0.5)):
        w = _weights(k, b, per_row, seed=v + b).to(DEVICE)
        (ref, _), (out, _) = both(logits, w, backend, temperature=0.0, beta=beta)
        assert torch.equal(ref.cpu(), out.cpu()), f"per_row={per_row} beta={beta}"


@pytest.mark.parametrize("backend,k,b,v,dtype", CASES)
def test_logprobs_and_samples_match_reference(backend, k, b, v, dtype):
    registry.load(backend)
    logits = make_logits(k, b, v, dtype, seed=7 * k + b + v, device=DEVICE)
    w = _weights(k, b, per_row=True, seed=b + v).to(DEVICE)
    for trial in range(2):
        params = _to_device(_row_params(b, v, seed=trial * 31 + v))
        sample_kw = dict(params)
        lp_kw = {key: val for key, val in params.items() if key not in ("seed", "step")}
        ref_lp, out_lp = both_logprobs(logits, w, backend, **lp_kw)
        assert_logprobs_close(ref_lp.cpu(), out_lp.cpu())
        (ref_tok, _), (tok, tok_lp) = both(logits, w, backend, **sample_kw)
        tok, tok_lp, ref_lp = tok.cpu(), tok_lp.cpu(), ref_lp.cpu()
        # Every sampled token lies in the reference's support, with the reference's log-prob.
        chosen = ref_lp.gather(1, tok[:, None])[:, 0]
        assert torch.isfinite(chosen).all(), "a backend sampled a token the reference masks"
        assert torch.allclose(tok_lp, chosen, atol=1e-3, rtol=0)
        greedy = params["temperature"].cpu() == 0
        assert torch.equal(tok[greedy], ref_tok.cpu()[greedy])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [111, 32000])
def test_union_rule(backend, dtype, v):
    registry.load(backend)
    b = 7
    logits = make_logits(2, b, v, dtype, seed=v, device=DEVICE)
    w = torch.tensor([1.0, 99.0], device=DEVICE)  # SafeInfer: gamma = a/(1-a), a = 0.99
    for kw in (dict(temperature=0.0), dict(temperature=0.0, beta=0.1)):
        (ref, _), (out, _) = both(logits, w, backend, rule="union", **kw)
        ok = greedy_near_tie_ok(logits, w, ref, out, rule="union", **kw)
        assert ok.all(), f"{kw}: {ref.tolist()} vs {out.tolist()}"
    kw = dict(temperature=0.8, top_k=20, top_p=0.9)
    ref_lp, out_lp = both_logprobs(logits, w, backend, rule="union", **kw)
    assert_logprobs_close(ref_lp.cpu(), out_lp.cpu())
