"""Comparison helpers for backend-vs-reference tests."""

from __future__ import annotations

import torch

from safedecode.ops import contrastive_logprobs, contrastive_sample
from safedecode.ops.params import prepare
from safedecode.ops.reference import _scores

# Log-prob tolerance between a backend and the reference: both compute exp/log in fp32 with
# different summation orders; the final log-normaliser differs by a few ulp of log(Z).
LOGPROB_ATOL = 2e-4
# A token may be in one support and not the other only at the top-p cut, where fp64 masses that
# differ in the last bits land on either side of top_p * Z: such a token sits at the edge of the
# kept set, i.e. its log-prob is within this of the smallest kept log-prob.
BOUNDARY_TOL = 1e-3


def make_logits(k: int, b: int, v: int, dtype=torch.float32, scale: float = 3.0, seed: int = 0,
                device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, b, v, generator=g) * scale).to(dtype).to(device)


def assert_logprobs_close(ref: torch.Tensor, out: torch.Tensor, atol: float = LOGPROB_ATOL):
    """Same support up to top-p boundary tokens, and close log-probs on the shared support."""
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert not torch.isnan(out).any(), "backend produced NaN log-probs"
    fr, fo = torch.isfinite(ref), torch.isfinite(out)
    both = fr & fo
    diff = fr ^ fo
    if diff.any():
        for row in torch.nonzero(diff.any(dim=1))[:, 0].tolist():
            for lp, fin in ((ref[row], fr[row]), (out[row], fo[row])):
                odd = diff[row] & fin
                if not odd.any():
                    continue
                edge = lp[fin].min()
                assert (lp[odd] - edge).abs().max() <= BOUNDARY_TOL, (
                    f"row {row}: supports differ away from the top-p boundary")
    if both.any():
        # Rows whose support differs renormalise differently: compare after re-centring.
        d = (ref - out).masked_fill(~both, 0.0)
        rows_same = ~diff.any(dim=1)
        if rows_same.any():
            err = d[rows_same].abs().max().item()
            assert err <= atol, f"log-prob max abs error {err} > {atol}"


def greedy_near_tie_ok(logits, weights, tokens_ref, tokens_out, **kw) -> torch.Tensor:
    """For non-linear rules: a differing greedy token must be a near-tie of the reference's."""
    p = prepare(logits, weights, **kw)
    s, _ = _scores(p)
    best = s.gather(1, tokens_ref[:, None])[:, 0]
    got = s.gather(1, tokens_out.clamp(min=0)[:, None])[:, 0]
    return (tokens_ref == tokens_out) | ((best - got).abs() <= 1e-5 * (1 + best.abs()))


def both(logits, weights, backend: str, **kw):
    """(reference, backend) outputs of contrastive_sample with log-probs."""
    ref = contrastive_sample(logits, weights, backend="reference", return_logprobs=True, **kw)
    out = contrastive_sample(logits, weights, backend=backend, return_logprobs=True, **kw)
    return ref, out


def both_logprobs(logits, weights, backend: str, **kw):
    ref = contrastive_logprobs(logits, weights, backend="reference", **kw)
    out = contrastive_logprobs(logits, weights, backend=backend, **kw)
    return ref, out
