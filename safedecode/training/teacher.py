"""Teacher forcing: the model's predictions at the tokens of given responses after given prompts.

One home for "score these response tokens under the model", shared by the evaluation's perplexity
(:func:`safedecode.eval.runner.response_nll`), SafeInfer's head selection, OPO's soft-prompt losses
and TA-SFT's training loss:

- :func:`pack` lays (prompt, response) id pairs out as one left-padded batch and lists the
  positions whose next-token prediction scores a response token;
- :func:`response_hidden` runs the decoder body and returns the final hidden states at exactly
  those positions (differentiable; the lm_head is left to the caller, so a fused loss never sees
  ``[T, V]`` logits);
- :func:`response_logprobs` is the no-grad summary: summed log-prob and token count per pair.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

Pair = tuple[Sequence[int], Sequence[int]]  # (prompt ids, response ids)


@dataclass
class Packed:
    """A left-padded batch of prompt + response rows.

    ``ids / mask / pos [B, T]``; ``rows / cols [N]`` the position predicting each response token
    (``N`` = all response tokens, row-major), ``targets [N]`` those tokens, ``example [N]`` the
    index (into the pairs given to :func:`pack`) each belongs to; ``prompt_start / last_prompt
    [B]`` where each row's prompt starts and ends; ``order`` the pair index of each row."""

    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    example: torch.Tensor
    prompt_start: torch.Tensor
    last_prompt: torch.Tensor
    order: list[int]

    def to(self, device) -> Packed:
        return Packed(*(getattr(self, f).to(device) for f in
                        ("ids", "mask", "pos", "rows", "cols", "targets", "example",
                         "prompt_start", "last_prompt")), self.order)


def pack(pairs: Sequence[Pair], pad_id: int = 0, order: Sequence[int] | None = None) -> Packed:
    """Left-pad ``pairs`` (in ``order``, default as given) into one batch; see :class:`Packed`."""
    idx = list(range(len(pairs))) if order is None else list(order)
    if not idx:
        raise ValueError("teacher forcing: no (prompt, response) pairs")
    full = [list(pairs[i][0]) + list(pairs[i][1]) for i in idx]
    for i in idx:
        if not len(pairs[i][0]):
            raise ValueError(f"teacher forcing: pair {i} has an empty prompt (nothing predicts "
                             "its first response token)")
    t = max(map(len, full))
    ids = torch.full((len(idx), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), t), dtype=torch.long)
    rows, cols, tgt, ex, start, last = [], [], [], [], [], []
    for j, (i, f) in enumerate(zip(idx, full, strict=True)):
        off = t - len(f)
        ids[j, off:] = torch.tensor(f, dtype=torch.long)
        mask[j, off:] = 1
        n_p, n_r = len(pairs[i][0]), len(pairs[i][1])
        start.append(off)
        last.append(off + n_p - 1)
        rows.extend([j] * n_r)
        cols.extend(range(off + n_p - 1, off + n_p - 1 + n_r))
        tgt.extend(int(x) for x in pairs[i][1])
        ex.extend([i] * n_r)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    as_t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Packed(ids, mask, pos, as_t(rows), as_t(cols), as_t(tgt), as_t(ex), as_t(start),
                  as_t(last), idx)


def unwrap(model):
    """The transformers causal LM inside a peft wrapper (LoRA layers stay injected)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def decoder_body(model):
    """The decoder stack without the lm_head (``model.model`` for Llama-like models)."""
    lm = unwrap(model)
    get = getattr(lm, "get_decoder", None)
    body = get() if callable(get) else None
    if body is None:
        body = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    if body is None or body is lm:
        raise ValueError(f"teacher forcing: cannot find the decoder body of {type(lm).__name__}")
    return body


def response_hidden(model, packed: Packed, inputs_embeds: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Final hidden states ``[N, d]`` at :attr:`Packed.rows`/``cols`` (after the final norm),
    differentiable. ``inputs_embeds`` (``[B, T, d]``) replaces the embedding of ``ids`` (soft
    prompts)."""
    body = decoder_body(model)
    kw = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else \
        {"input_ids": packed.ids}
    out = body(attention_mask=packed.mask, position_ids=packed.pos, use_cache=False, **kw)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return hidden[packed.rows, packed.cols]


def response_logprobs(model, pairs: Sequence[Pair], *, batch_size: int = 16, pad_id: int = 0,
                      around: Callable[[torch.Tensor], AbstractContextManager] | None = None
                      ) -> list[tuple[float, int]]:
    """``(summed log-prob, token count)`` of each response given its prompt (ids), no grad.

    Rows are sorted by length and batched. ``around(last_prompt)``, if given, wraps each batch's
    forward; ``last_prompt[j]`` is the position of row j's last prompt token (to patch
    activations there). Empty responses score ``(0.0, 0)``."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    order = sorted((i for i in range(len(pairs)) if len(pairs[i][1])),
                   key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    device = next(model.parameters()).device
    head = unwrap(model).get_output_embeddings()
    for s in range(0, len(order), batch_size):
        packed = pack(pairs, pad_id, order[s:s + batch_size]).to(device)
        ctx = around(packed.last_prompt) if around is not None else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            logits = head(response_hidden(model, packed)).float()
            lp = torch.log_softmax(logits, -1).gather(-1, packed.targets[:, None])[:, 0]
        sums = torch.zeros(len(pairs), dtype=torch.float64).index_add_(
            0, packed.example.cpu(), lp.double().cpu())
        for i in packed.order:
            out[i] = (float(sums[i]), len(pairs[i][1]))
    return out
