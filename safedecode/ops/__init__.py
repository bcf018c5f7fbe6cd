"""The fused contrastive-sampling ops and their dispatcher.

``contrastive_sample`` turns the logits of K prompt branches of B requests (``[K, B, V]``) into one
token per request; ``contrastive_logprobs`` returns the final normalised log-distribution it samples
from. The exact semantics are those of :mod:`safedecode.ops.reference`; every backend
(``reference``, ``cpp``, ``triton``, ``cuda``) implements the same signature.
"""

from __future__ import annotations

import torch

from . import registry
from .params import Prepared, RowParam, prepare, raise_on_status

__all__ = ["contrastive_sample", "contrastive_sample_with_status", "contrastive_logprobs",
           "available_backends", "Prepared"]


def available_backends() -> dict[str, str]:
    """Map each backend name to "ok" or the reason it is unavailable here."""
    return registry.status()


def contrastive_sample(
    logits: torch.Tensor,
    weights,
    *,
    rule: str = "linear",
    anchor: int = 0,
    beta: RowParam = 0.0,
    temperature: RowParam = 1.0,
    top_k: RowParam = 0,
    top_p: RowParam = 1.0,
    min_p: RowParam = 0.0,
    seed: RowParam | None = None,
    step: RowParam = 0,
    return_logprobs: bool = False,
    backend: str = "auto",
    check_inputs: bool = True,
):
    """Sample one token per request from the contrast of K branches.

    Args:
        logits: ``[K, B, V]`` fp32/bf16/fp16; any strides on K and B, V contiguous.
        weights: ``[K]`` or ``[B, K]`` branch weights. ``rule="linear"``: ``s = sum_k w_k lp_k``;
            ``rule="union"`` (K=2, SafeInfer): ``s = lp_0 + w_1 * min(0, lp_0 - lp_1)``.
        anchor: branch whose distribution defines the plausibility mask.
        beta: plausibility threshold in [0, 1]; keep v iff ``p_anchor(v) >= beta * max p_anchor``.
        temperature: >= 0; 0 is greedy (lowest index on ties).
        top_k: keep the k best tokens (ties kept), 0 = off. top_p: nucleus in (0, 1].
        min_p: keep tokens with ``p >= min_p * p_max``, 0 = off.
        seed, step: key of the counter-based Philox draw; the same (seed, step, inputs) gives the
            same token on a backend, whatever else is in the batch. ``seed=None`` draws per-row
            seeds from torch's global generator. Each may be a scalar (broadcast: rows then share
            one stream) or a ``[B]`` tensor, like every per-row parameter above.
        return_logprobs: also return the chosen token's log-prob under the final distribution.
        backend: "auto" (fastest here; ``SAFEDECODE_BACKEND`` overrides) or a backend name.
        check_inputs: raise ValueError for NaN/+inf logits and rows without any candidate (the
            kernels always flag such rows and return token -1; ``False`` skips reading the flags and
            the range checks of tensor parameters, avoiding a device sync).

    Returns:
        tokens ``[B]`` int64, or ``(tokens, logprobs [B] fp32)`` with ``return_logprobs``.
    """
    p = prepare(logits, weights, rule=rule, anchor=anchor, beta=beta, temperature=temperature,
                top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, step=step,
                check_inputs=check_inputs)
    impl = registry.select(backend, logits.device)
    if p.logits.shape[1] == 0:
        empty = torch.empty(0, dtype=torch.int64, device=logits.device)
        return (empty, empty.float()) if return_logprobs else empty
    tokens, lps, status = impl.contrastive_sample(p, return_logprobs)
    if check_inputs:
        raise_on_status(status)
    return (tokens, lps) if return_logprobs else tokens


def contrastive_sample_with_status(logits: torch.Tensor, weights, *, return_logprobs: bool = False,
                                   backend: str = "auto", **params):
    """:func:`contrastive_sample` without reading anything back: returns ``(tokens, logprobs or
    None, status)`` on the logits' device, ``status`` [B] int32 per row (0 = ok, else a code of
    :data:`safedecode.ops.params.STATUS_MESSAGES`). Tensor parameters are not range-checked
    (no device sync): the decode engine validates them once per request."""
    p = prepare(logits, weights, check_inputs=False, **params)
    impl = registry.select(backend, logits.device)
    if p.logits.shape[1] == 0:
        empty = torch.empty(0, dtype=torch.int64, device=logits.device)
        return empty, (empty.float() if return_logprobs else None), empty.int()
    return impl.contrastive_sample(p, return_logprobs)


def contrastive_logprobs(
    logits: torch.Tensor,
    weights,
    *,
    rule: str = "linear",
    anchor: int = 0,
    beta: RowParam = 0.0,
    temperature: RowParam = 1.0,
    top_k: RowParam = 0,
    top_p: RowParam = 1.0,
    min_p: RowParam = 0.0,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """The final normalised log-distribution ``[B, V]`` (fp32, ``-inf`` outside the final set).

    Same inputs and semantics as :func:`contrastive_sample`; rows with temperature 0 use T = 1.
    """
    p = prepare(logits, weights, rule=rule, anchor=anchor, beta=beta, temperature=temperature,
                top_k=top_k, top_p=top_p, min_p=min_p, seed=0, step=0, check_inputs=check_inputs)
    impl = registry.select(backend, logits.device)
    if p.logits.shape[1] == 0:
        return torch.empty(0, p.logits.shape[2], dtype=torch.float32, device=logits.device)
    out, status = impl.contrastive_logprobs(p)
    if check_inputs:
        raise_on_status(status)
    return out
