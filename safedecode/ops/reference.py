"""Reference backend: plain PyTorch, written as the specification.

Every other backend is tested against this file, and benchmarks use it as the honest "naive
contrast" pipeline (combine, mask, sort-based top-k/top-p, inverse-CDF draw). All math is fp32; the
top-p mass and the draw accumulate in fp64.

Per row b (``z_k`` = logits of branch k as fp32, ``w`` = weights[b]):

1. **Score.** ``rule="linear"``: ``s = sum_k w_k * z_k``, summed in k order, each product rounded
   (no FMA). This is ``sum_k w_k * log_softmax(z_k)`` up to a per-row constant, which cancels in
   every later step, so no backend needs a log-sum-exp for it. Branches with ``w_k == 0`` are
   skipped. ``rule="union"`` (SafeInfer, K=2): ``lp_k = log_softmax(z_k)``,
   ``s = lp_0 + w_1 * min(0, lp_0 - lp_1)``. A token is excluded (``s = -inf``) where the anchor
   is ``-inf``, or where any branch with a non-zero weight is ``-inf`` (a ``-inf`` under a
   negative weight would otherwise force the token).
2. **Plausibility.** Keep v iff ``z_a(v) >= max(z_a) + log_beta`` (fp32, ``a`` = anchor).
3. **Temperature** T: ``x = (s - m) / T`` in fp32 (a true division), ``m`` = max kept score; the
   distribution is ``softmax(x)``. T = 0 is greedy: the token is argmax s (lowest index on ties);
   masks and log-probs then use T = 1.
4. **Top-k**: keep ``s >= t_k``, ``t_k`` = k-th largest kept score (ties at t_k are all kept).
5. **Top-p**: sort the top-k survivors by s descending (stable), ``e = exp(x)``; with ``c_j``
   the fp64 cumulative sum of ``e`` and ``Z`` its total, ``j*`` = first j with
   ``c_j >= top_p * Z``; keep ``s >= s_(j*)``. top_p = 1 keeps all. (Thresholds 4-5 compare
   scores only, so every backend makes the same cut except where top-p's fp64 mass lands within
   rounding of ``top_p * Z``.)
6. **Min-p**: keep ``x >= log_min_p`` (i.e. ``p >= min_p * p_max``). The final set is the
   intersection of steps 2, 4, 5 and 6 (min-p after top-p, as transformers' warpers order them).
7. **Draw**: ``u`` = Philox uniform keyed by (seed, step); walk the final set in vocabulary order,
   accumulating ``exp(x)`` in fp64, and return the first token whose cumulative sum exceeds
   ``u * Z_final``.

Returned log-prob of the chosen token: ``x - log(Z_final)`` under the final distribution.

Rows with bad logits (NaN, +inf, an all ``-inf`` anchor, no candidate) get a status code, token
-1, log-prob NaN and an all ``-inf`` log-distribution, on every backend.
"""

from __future__ import annotations

import torch

from . import philox
from .params import (
    STATUS_ANCHOR_EMPTY,
    STATUS_NAN,
    STATUS_NO_CANDIDATE,
    STATUS_POS_INF,
    Prepared,
)

NEG_INF = float("-inf")


def _scores(p: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """Combined score ``s`` [B, V] (fp32, -inf = excluded) and a per-row status [B]."""
    z = p.logits.float()
    k, b, v = z.shape
    status = torch.zeros(b, dtype=torch.int32, device=z.device)
    status[torch.isinf(z).logical_and(z > 0).any(dim=2).any(dim=0)] = STATUS_POS_INF
    status[torch.isnan(z).any(dim=2).any(dim=0)] = STATUS_NAN
    za = z[p.anchor]
    excluded = torch.isneginf(za)
    if p.rule == 0:
        s = torch.zeros(b, v, dtype=torch.float32, device=z.device)
        for i in range(k):
            wi = p.weights[:, i : i + 1]
            active = wi != 0
            s = torch.where(active, s + wi * z[i], s)
            excluded |= active & torch.isneginf(z[i])
    else:
        lp0 = torch.log_softmax(z[0], dim=-1)
        lp1 = torch.log_softmax(z[1], dim=-1)
        gamma = p.weights[:, 1:2]
        s = torch.where(gamma != 0, lp0 + gamma * torch.clamp(lp0 - lp1, max=0.0), lp0)
        excluded |= torch.isneginf(z[0]) | ((gamma != 0) & torch.isneginf(z[1]))
    # Plausibility mask on the anchor: z_a >= max z_a + log(beta).
    amax = za.amax(dim=-1, keepdim=True)
    excluded |= za < amax + p.log_beta[:, None]
    s = s.masked_fill(excluded, NEG_INF)
    ok = status == 0
    status[ok & torch.isneginf(amax[:, 0])] = STATUS_ANCHOR_EMPTY
    ok = status == 0
    status[ok & torch.isneginf(s).all(dim=-1)] = STATUS_NO_CANDIDATE
    return s, status


def _final_scores(p: Prepared) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores after every mask, scaled by 1/T (T=1 for greedy rows); -inf outside the final set."""
    s, status = _scores(p)
    b, v = s.shape
    bad = status != 0
    s = s.masked_fill(bad[:, None], 0.0)  # keep the math finite on bad rows; they are reported
    temp = torch.where(p.temperature > 0, p.temperature, torch.ones_like(p.temperature))
    m = s.amax(dim=-1, keepdim=True)
    x = (s - m) / temp[:, None]  # <= 0, max 0

    # Sort once by score (descending, stable: ties keep vocabulary order).
    sorted_s, order = torch.sort(s, dim=-1, descending=True, stable=True)
    sorted_x = x.gather(1, order)
    rank = torch.arange(v, device=x.device)[None, :]
    # top-k: keep s >= k-th largest (ties kept).
    k = torch.where(p.top_k > 0, p.top_k, torch.full_like(p.top_k, v)).clamp(max=v)
    t_k = sorted_s.gather(1, (k - 1)[:, None])
    keep_sorted = sorted_s >= t_k
    # top-p over the top-k survivors.
    e = torch.where(keep_sorted, torch.exp(sorted_x), torch.zeros_like(sorted_x)).double()
    c = torch.cumsum(e, dim=-1)
    z_total = c[:, -1:]
    reached = c >= p.top_p.double()[:, None] * z_total
    reached[:, -1] = True
    j_star = torch.where(reached, rank, torch.full_like(rank, v)).amin(dim=-1, keepdim=True)
    t_p = sorted_s.gather(1, j_star)
    use_p = (p.top_p < 1.0)[:, None]
    keep_sorted &= ~use_p | (sorted_s >= t_p)
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    # min-p relative to the maximum (x = 0 there).
    keep &= x >= p.log_min_p[:, None]
    x = x.masked_fill(~keep, NEG_INF)
    return x, s, status


def contrastive_logprobs(p: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """Final normalised log-distribution [B, V] (fp32) and the per-row status [B]."""
    x, _, status = _final_scores(p)
    out = torch.log_softmax(x, dim=-1)
    return out.masked_fill((status != 0)[:, None], NEG_INF), status  # bad rows: all -inf


def contrastive_sample(
    p: Prepared, return_logprobs: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Tokens [B] int64, chosen log-probs [B] fp32 (or None) and the per-row status [B]."""
    x, s, status = _final_scores(p)
    b, v = x.shape
    e = torch.exp(x).double()  # exp(-inf) = 0 outside the final set
    c = torch.cumsum(e, dim=-1)
    u = philox.uniform(p.seed, p.step).to(x.device)
    target = u * c[:, -1]
    sampled = torch.searchsorted(c, target[:, None], right=True)[:, 0].clamp(max=v - 1)
    # Rounding can leave the walk on a zero-mass token at the end: step back to the last kept one.
    last_kept = torch.where(e > 0, torch.arange(v, device=x.device), -1).amax(dim=-1)
    sampled = torch.where(e.gather(1, sampled[:, None])[:, 0] > 0, sampled, last_kept)
    greedy = torch.argmax(s, dim=-1)  # first maximal index on ties
    tokens = torch.where(p.temperature == 0, greedy, sampled)
    tokens = torch.where(status == 0, tokens, torch.full_like(tokens, -1))
    lps = None
    if return_logprobs:
        lp = torch.log_softmax(x, dim=-1)
        lps = lp.gather(1, tokens.clamp(min=0)[:, None])[:, 0]
        lps = torch.where(status == 0, lps, torch.full_like(lps, float("nan")))
    return tokens, lps, status
