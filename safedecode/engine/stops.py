"""Ending a flagged request's answer: the sentence stop of a gated hook.

``BranchHook(stop="sentence")`` (see :class:`~.branches.BranchHook`): on the rows where the
hook's gate held, once the request has ``after`` new tokens, a sampled token whose text ends a
sentence is followed by the end-of-turn token. Applied to the tokens :meth:`ModelStep.sample`
draws, on the device, without a host read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .branches import Method

SENTENCE_ENDS = (".", "!", "?")


@functools.lru_cache(maxsize=8)  # decoding every token costs ~0.3 s; engines are made per call
def sentence_end_table(tokenizer, vocab: int, skip: frozenset[int] = frozenset()
                       ) -> torch.Tensor:
    """``[vocab]`` bool: the tokens whose text, trailing spaces removed, ends a sentence (ids
    past the tokenizer's and ``skip`` are False). Cached per tokenizer; not to be changed."""
    n = min(vocab, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    table = torch.zeros(vocab, dtype=torch.bool)
    table[:n] = torch.tensor([t.rstrip().endswith(SENTENCE_ENDS) for t in texts])
    for i in skip:
        if 0 <= i < vocab:
            table[i] = False
    return table


@dataclass(frozen=True)
class SentenceStop:
    branch: int  # the branch whose hook's gate decides
    after: int  # new tokens a request has before the stop may act
    ends: torch.Tensor  # [vocab] bool, on the device
    eos: int  # the token emitted

    def apply(self, state, sidx: torch.Tensor, k: int) -> torch.Tensor:
        """Bool ``[n]``: the sequences ``sidx`` (``k`` rows each) whose next token is the end of
        turn: gated, with ``after`` new tokens, the last one ending a sentence."""
        return (state.gate_on[sidx * k + self.branch] & (state.step[sidx] >= self.after)
                & self.ends[state.last[sidx]])


def sentence_stop(method: Method, model, tokenizer, eos: frozenset[int],
                  device: torch.device) -> SentenceStop | None:
    """The method's sentence stop (None without one); ``eos``: the model's end-of-turn ids
    (the tokenizer's own is emitted when among them)."""
    found = [(k, h) for k, br in enumerate(method.branches) for h in br.hooks if h.stop]
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{method.name}: at most one hook with a stop per method (each ends "
                         f"the request's answer); got {len(found)}")
    if not eos:
        raise ValueError(f"{method.name}: a sentence stop needs the model's end-of-turn token; "
                         "the model and tokenizer name none")
    k, hook = found[0]
    own = getattr(tokenizer, "eos_token_id", None)
    token = own if own in eos else min(eos)
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
    table = sentence_end_table(tokenizer, vocab, eos)
    return SentenceStop(k, hook.window or 1, table.to(device), token)
