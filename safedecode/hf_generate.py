"""``model.generate(..., custom_generate=safedecode.custom_generate, safedecode_method=...)``.

transformers calls a callable ``custom_generate`` with the prepared inputs and generation config
(``GenerationMixin.generate``); this one runs the method's K branches through the safedecode
engine. Like transformers' own ``negative_prompt_ids``, the caller renders every branch's prompt:
``input_ids`` is branch 0 and ``safedecode_branch_ids`` (a list of ``[B, T_k]`` tensors,
left-padded, with ``safedecode_branch_masks`` or the pad token marking padding) are branches
1..K-1. Sampling
settings come from the generation config (``do_sample``, ``temperature``, ``top_k``, ``top_p``,
``min_p``, ``max_new_tokens``); the result is ``[B, T + new]`` token ids, padded like transformers'.
"""

from __future__ import annotations

import torch

from safedecode.engine.branches import Method
from safedecode.engine.decoder import SafeDecoder, TokenPrompts


def _rows(ids: torch.Tensor, mask: torch.Tensor | None, pad: int | None) -> list[list[int]]:
    """Per-row token ids without their left padding (given by ``mask``, else leading pads)."""
    if ids.dim() != 2:
        raise ValueError(f"expected [B, T] prompt ids, got shape {tuple(ids.shape)}")
    if mask is None:  # no mask: only a leading run of pad tokens is padding
        keep = torch.ones_like(ids, dtype=torch.bool)
        if pad is not None:
            keep = (ids != pad).long().cummax(dim=1).values.bool()
        mask = keep
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def custom_generate(model, input_ids: torch.Tensor, logits_processor=None, stopping_criteria=None,
                    generation_config=None, synced_gpus: bool = False, streamer=None,
                    safedecode_method: Method | None = None,
                    safedecode_branch_ids: list[torch.Tensor] | None = None,
                    safedecode_branch_masks: list[torch.Tensor] | None = None,
                    safedecode_backend: str = "auto", **model_kwargs) -> torch.LongTensor:
    """Decode with a safedecode method from inside ``model.generate`` (see the module doc)."""
    if not isinstance(safedecode_method, Method):
        raise ValueError("safedecode_method: pass a safedecode Method, e.g. "
                         "safedecode.methods.get('acd-text')")
    gc = generation_config
    pad = gc.pad_token_id if gc is not None else None
    extra = list(safedecode_branch_ids or [])
    if len(extra) != safedecode_method.k - 1:
        raise ValueError(f"safedecode_branch_ids: method {safedecode_method.name!r} has "
                         f"{safedecode_method.k} branches: give {safedecode_method.k - 1} "
                         f"prompt tensors besides input_ids, got {len(extra)}")
    masks = list(safedecode_branch_masks or [None] * len(extra))
    mask0 = model_kwargs.get("attention_mask")
    if mask0 is None:  # transformers drops an all-ones mask: the prompts are unpadded
        mask0 = torch.ones_like(input_ids, dtype=torch.bool)
    ids = [_rows(input_ids, mask0, pad)]
    ids += [_rows(x.to(input_ids.device), m, pad) for x, m in zip(extra, masks, strict=True)]
    if any(len(branch) != input_ids.shape[0] for branch in ids):
        raise ValueError("safedecode_branch_ids: every branch needs one prompt per request")
    max_new = gc.max_new_tokens if gc.max_new_tokens is not None \
        else gc.max_length - input_ids.shape[1]
    dec = SafeDecoder(model, None, safedecode_method, backend=safedecode_backend)
    sampled = bool(gc.do_sample)
    results = dec.generate(
        TokenPrompts(ids), max_new_tokens=max_new,
        temperature=float(gc.temperature or 1.0) if sampled else 0.0,
        top_k=int(gc.top_k or 0) if sampled else 0,
        top_p=float(gc.top_p if gc.top_p is not None else 1.0) if sampled else 1.0,
        min_p=float(gc.min_p or 0.0) if sampled else 0.0,
        seed=None, streamer=streamer)
    fill = pad if pad is not None else 0
    out = torch.full((input_ids.shape[0], max_new), fill, dtype=torch.long,
                     device=input_ids.device)
    for i, r in enumerate(results):
        out[i, :len(r.token_ids)] = torch.tensor(r.token_ids, dtype=torch.long)
    return torch.cat([input_ids, out], dim=1)
