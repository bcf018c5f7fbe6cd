"""Teacher forcing: the model's predictions at the tokens of given responses after given prompts.

One home for "score these response tokens under the model", shared by the evaluation's perplexity
(:func:`safedecode.eval.runner.response_nll`), SafeInfer's head selection, OPO's soft-prompt losses
and TA-SFT's training loss:

- :func:`pack` lays (prompt, response) id pairs out as one left-padded batch and lists the
  positions whose next-token prediction scores a response token;
- :func:`response_hidden` runs the decoder body and returns the final hidden states at exactly
  those positions (differentiable; the lm_head is left to the caller, so a fused loss never sees
  ``[T, V]`` logits);
- :func:`head_logits` turns those hidden states into the model's logits: the lm_head and what
  some families apply after it (:class:`LogitTransform`), checked once per model against its
  own forward (:func:`check_head`);
- :func:`response_logprobs` is the no-grad summary: summed log-prob and token count per pair.
"""

from __future__ import annotations

import contextlib
import math
import weakref
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


@dataclass(frozen=True)
class LogitTransform:
    """What a causal LM does to ``lm_head(hidden)`` before returning its logits:
    ``cap · tanh(scale · z / cap)`` (``cap`` None: ``scale · z``). ``scale``: Cohere's
    ``logit_scale``, 1 / Granite's ``logits_scaling``; ``cap``: Gemma's
    ``final_logit_softcapping``."""

    scale: float = 1.0
    cap: float | None = None

    @classmethod
    def of(cls, model) -> LogitTransform:
        from safedecode.models import text_config

        lm = unwrap(model)
        cfg = text_config(lm)
        scale = 1.0
        own = getattr(lm, "logit_scale", None)  # Cohere: an attribute of the causal LM
        if isinstance(own, (int, float)):
            scale *= float(own)
        div = getattr(cfg, "logits_scaling", None)  # Granite
        if isinstance(div, (int, float)) and div:
            scale /= float(div)
        cap = getattr(cfg, "final_logit_softcapping", None)
        return cls(scale, float(cap) if cap else None)

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.cap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.cap is not None:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_head(model) -> LogitTransform:
    """``model``'s :class:`LogitTransform`, verified once per model: on a few tokens,
    :func:`head_logits` of the decoder body's hidden states must equal the model's own forward
    (a family that changes its logits in another way is a ``ValueError``, not a silent
    perplexity)."""
    lm = unwrap(model)
    hit = _CHECKED.get(lm)
    if hit is not None:
        return hit
    transform = LogitTransform.of(lm)
    param = next(lm.parameters())
    vocab = lm.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(1, 7, device=param.device) * 7919 % vocab)[None]
    with torch.no_grad():
        own = lm(input_ids=ids, use_cache=False).logits.float()
        out = decoder_body(lm)(input_ids=ids, use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        ours = transform(lm.get_output_embeddings()(hidden)).float()
    tol = 1e-3 * max(1.0, own.abs().max().item()) if param.dtype == torch.float32 else \
        3e-2 * max(1.0, own.abs().max().item())
    err = (own - ours).abs().max().item()
    if not math.isfinite(err) or err > tol:
        raise ValueError(f"teacher forcing: {type(lm).__name__}'s logits are not its lm_head "
                         f"of the final hidden states (after {transform}): off by {err:.3g}; "
                         "safedecode cannot score its tokens from hidden states (for "
                         "`safedecode eval`, --no-ppl skips the perplexity)")
    _CHECKED[lm] = transform
    return transform


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from final hidden states ``[..., d]`` (the lm_head, then the family's
    :class:`LogitTransform`; checked once per model by :func:`check_head`)."""
    return check_head(model)(unwrap(model).get_output_embeddings()(hidden))


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
    for s in range(0, len(order), batch_size):
        packed = pack(pairs, pad_id, order[s:s + batch_size]).to(device)
        ctx = around(packed.last_prompt) if around is not None else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            logits = head_logits(model, response_hidden(model, packed)).float()
            lp = torch.log_softmax(logits, -1).gather(-1, packed.targets[:, None])[:, 0]
        sums = torch.zeros(len(pairs), dtype=torch.float64).index_add_(
            0, packed.example.cpu(), lp.double().cpu())
        for i in packed.order:
            out[i] = (float(sums[i]), len(pairs[i][1]))
    return out
