"""Packed forwards: the running sequences' decode tokens and new prompts in **one** forward.

A decode step that also admits requests used to run two forwards — the running rows' decode
(one token each), then the new prompts' prefill (padded to the longest) — so every admission read
the weights twice and stalled every running stream for a second forward. Here the tokens of
both are concatenated into one ``[1, N]`` sequence (no padding: N = running rows + the prompt
tokens), so the linear layers, norms and MLPs run once over exactly the tokens that exist, as in
vLLM's mixed prefill/decode batches. Attention is the only per-row part; a transformers
``AttentionInterface`` function (:func:`packed_attention`, switched on for that forward only)
splits it by the :class:`PackPlan`: the decode tokens attend over their rows' columns (one
batched call, the rows read as a view when consecutive), the prompts' tokens over theirs with a
causal mask (one batched call). The cache writes every token's KV at its (row, column).

It needs a model whose attention goes through transformers' attention interface and passes the
forward's keyword arguments down (every model of transformers 5); :class:`~.step.ModelStep`
checks on the first packed forward that every layer came through it and otherwise goes back to
two forwards for good.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "safedecode_packed"


@dataclass
class PackPlan:
    """How the ``[1, N]`` packed tokens split into attention groups.

    Tokens ``0 .. n_dec-1`` are decode tokens (one per row ``dec_rows``); the rest are prompt
    tokens: ``pf_tok[i, j]`` is the pack index of prompt row ``pf_rows[i]``'s j-th new token
    (``pf_valid`` marks the real ones; the others repeat a real index and are dropped).
    Masks are additive, ``[rows, 1, q, attend]``; ``dec_slid``/``pf_slid`` are the same with
    the sliding ``window`` applied (:class:`~.masks.LayerMasks`), for the layers whose attention
    call names that window."""

    n_dec: int
    dec_rows: slice | torch.Tensor | None
    dec_attend: int
    dec_mask: torch.Tensor | None
    pf_rows: torch.Tensor | None
    pf_tok: torch.Tensor | None
    pf_valid: torch.Tensor | None
    pf_attend: int
    pf_mask: torch.Tensor | None
    window: int | None = None
    dec_slid: torch.Tensor | None = None
    pf_slid: torch.Tensor | None = None
    calls: int = 0  # layers that ran through packed_attention (the routing check)
    slid_calls: int = 0  # of them, with the sliding window


def packed_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, *, scaling: float | None = None, dropout: float = 0.0,
                     safedecode_pack: PackPlan | None = None, **kwargs):
    """Attention of a packed forward; ``key``/``value`` are the layer's whole KV buffers
    ``[rows, kv_heads, columns, dim]`` (see :meth:`~.cache.SlotLayer.update`)."""
    plan = safedecode_pack
    if plan is None:
        raise RuntimeError(f"the {NAME!r} attention runs only inside a safedecode packed forward")
    plan.calls += 1
    window = kwargs.get("sliding_window")
    dec_mask, pf_mask = plan.dec_mask, plan.pf_mask
    if window is not None and plan.window is not None:
        if window != plan.window:
            raise ValueError(f"packed attention: a layer's sliding window is {window}, the "
                             f"model's config says {plan.window}")
        plan.slid_calls += 1
        dec_mask, pf_mask = plan.dec_slid, plan.pf_slid
    q = query[0]  # [H, N, D]
    out = query.new_empty(q.shape[1], q.shape[0], q.shape[2])  # [N, H, D]
    if plan.n_dec:
        qd = q[:, :plan.n_dec].transpose(0, 1)[:, :, None]  # [n_dec, H, 1, D]
        a = plan.dec_attend
        od, _ = sdpa_attention_forward(module, qd, key[plan.dec_rows, :, :a],
                                       value[plan.dec_rows, :, :a], dec_mask,
                                       scaling=scaling, dropout=0.0)
        out[:plan.n_dec] = od[:, 0]
    if plan.pf_rows is not None:
        qp = q[:, plan.pf_tok].transpose(0, 1)  # [R, H, t, D]
        a = plan.pf_attend
        op, _ = sdpa_attention_forward(module, qp, key[plan.pf_rows, :, :a],
                                       value[plan.pf_rows, :, :a], pf_mask,
                                       scaling=scaling, dropout=0.0)  # [R, t, H, D]
        out[plan.pf_tok[plan.pf_valid]] = op[plan.pf_valid]
    return out[None], None


AttentionInterface.register(NAME, packed_attention)


@contextlib.contextmanager
def packed_attention_on(model) -> Iterator[None]:
    """Route ``model``'s attention through :func:`packed_attention` for one forward."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
