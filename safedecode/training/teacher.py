"""Teacher forcing: the log-probability of given responses after given prompts, batched.

One home for "score these response tokens under the model": the evaluation's perplexity
(:func:`safedecode.eval.runner.response_nll`) and SafeInfer's head selection use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

Pair = tuple[Sequence[int], Sequence[int]]  # (prompt ids, response ids)


def response_logprobs(model, pairs: Sequence[Pair], *, batch_size: int = 16, pad_id: int = 0,
                      around: Callable[[torch.Tensor], AbstractContextManager] | None = None
                      ) -> list[tuple[float, int]]:
    """``(summed log-prob, token count)`` of each response given its prompt (ids), no grad.

    Rows are left-padded and sorted by length, so every response ends at the last position.
    ``around(last_prompt)``, if given, wraps each batch's forward; ``last_prompt[j]`` is the
    position of row j's last prompt token (to patch activations there). Empty responses score
    ``(0.0, 0)``."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    order = sorted((i for i in range(len(pairs)) if len(pairs[i][1])),
                   key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    device = next(model.parameters()).device
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        full = [list(pairs[i][0]) + list(pairs[i][1]) for i in idx]
        t = max(map(len, full))
        r_max = max(len(pairs[i][1]) for i in idx)
        ids = torch.full((len(idx), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), t), dtype=torch.long)
        for j, f in enumerate(full):
            ids[j, t - len(f):] = torch.tensor(f)
            mask[j, t - len(f):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        last = torch.tensor([t - len(pairs[i][1]) - 1 for i in idx])
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
        ctx = around(last) if around is not None else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            try:  # logits only for the last r_max + 1 positions
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                               logits_to_keep=r_max + 1).logits
            except TypeError:
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            logits = logits[:, -(r_max + 1):-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[:, -r_max:, None])[..., 0]
        for j, i in enumerate(idx):
            n = len(pairs[i][1])
            out[i] = (float(lp[j, r_max - n:].sum()), n)
    return out
