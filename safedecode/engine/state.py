"""The decode state: cache slots, per-row lengths and masks, per-sequence sampling state.

A *sequence* (a request, or a child forked from one) holds one slot ``s`` in ``[0, max_seqs)``;
its K branch rows are ``s * K + k`` (sequence-major), so a contiguous run of slots is a
contiguous run of rows and the step's logits ``[n * K, V]`` are viewed as ``[n, K, V]`` and
handed to the fused op as ``[K, n, V]`` without a copy. A row's tokens sit in columns
``0 .. len-1`` of the :class:`~.cache.SlotCache` (column = position); its additive mask row
``bias[r]`` is 0 on those columns. Releasing a slot touches nothing on the device: the next
sequence to take it overwrites the length, mask and KV it uses. Forking copies the parent's rows
(``len`` columns of KV per layer) into the children's slots: memory ``n x len x`` (KV bytes per
column), time one ``index_copy`` per layer — no forward pass.

Host-side copies of every row's length (``host_len``) give each step its attention width and
need no device read.
"""

from __future__ import annotations

import bisect
import heapq
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .cache import SlotCache

BUCKET = 32  # attention widths and capacities are multiples of this (shapes repeat)


def round_up(n: int, m: int = BUCKET) -> int:
    return -(-n // m) * m


class DecodeState:
    """Slots for ``max_seqs`` sequences of up to ``max_len`` tokens, K rows each."""

    def __init__(self, *, num_layers: int, k: int, max_seqs: int, max_len: int,
                 device: torch.device, dtype: torch.dtype,
                 sliding: tuple[bool, ...] = (), vocab: int = 0) -> None:
        self.k, self.max_seqs = k, max_seqs
        self.columns = round_up(max_len)
        self.device, self.dtype = device, dtype
        rows = max_seqs * k
        self.cache = SlotCache(num_layers, rows, self.columns, sliding)
        self.neg = torch.finfo(dtype).min
        self.lens = torch.zeros(rows, dtype=torch.long, device=device)
        self.bias = torch.full((rows, self.columns), self.neg, dtype=dtype, device=device)
        self.last = torch.zeros(max_seqs, dtype=torch.long, device=device)  # token to feed next
        self.seed = torch.zeros(max_seqs, dtype=torch.long, device=device)
        self.step = torch.zeros(max_seqs, dtype=torch.long, device=device)
        self.temperature = torch.zeros(max_seqs, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(max_seqs, dtype=torch.long, device=device)
        self.top_p = torch.ones(max_seqs, dtype=torch.float32, device=device)
        self.min_p = torch.zeros(max_seqs, dtype=torch.float32, device=device)
        # penalties and logit bias (SamplingParams.adjusts_logits): per slot; the [slots, V]
        # counts of generated tokens and biases are allocated for the first request using them
        self.vocab = vocab
        self.adjusted = [False] * max_seqs  # host side: whether a slot's logits are adjusted
        self.repeating = [False] * max_seqs  # host side: whether its repetition penalty is on
        self.presence = torch.zeros(max_seqs, dtype=torch.float32, device=device)
        self.frequency = torch.zeros(max_seqs, dtype=torch.float32, device=device)
        self.counts: torch.Tensor | None = None
        self.logit_bias: torch.Tensor | None = None
        self.repetition = torch.ones(max_seqs, dtype=torch.float32, device=device)
        self.seen: torch.Tensor | None = None  # [rows, V]: tokens in each row's context
        # banned tokens (SamplingParams' min_tokens, one-token bad words, allowed_token_ids):
        # per slot, allocated for the first request that bans any; `ends` are banned while the
        # slot's step < its min_tokens (longer words and n-grams: the host, per step)
        self.banning = [False] * max_seqs  # host side: whether a slot bans tokens
        self.min_tokens = torch.zeros(max_seqs, dtype=torch.long, device=device)
        self.banned: torch.Tensor | None = None  # [slots, V] bool
        self.ends: torch.Tensor | None = None  # [slots, V] bool
        self.gate_on = torch.zeros(rows, dtype=torch.bool, device=device)  # a gated hook's call
        # per slot: its contrast-gate decision as the host knows it (None: not read yet), so a
        # step can leave out the rows a decided sequence no longer needs (ModelStep.decode)
        self.host_gate: list[bool | None] = [None] * max_seqs
        self.host_len = [0] * rows
        self._free = list(range(max_seqs))
        self._layouts: OrderedDict[tuple[int, ...], tuple] = OrderedDict()

    # -- slots -----------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        """The lowest free slot (keeps the live slots packed at the bottom)."""
        if not self._free:
            raise ValueError("max_seqs: no free slot")
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        if slot in self._free:
            raise RuntimeError(f"slot {slot} released twice")
        heapq.heappush(self._free, slot)

    def in_use(self) -> int:
        return self.max_seqs - len(self._free)

    # -- layout ----------------------------------------------------------------------------
    def rows_of(self, slot: int) -> range:
        return range(slot * self.k, (slot + 1) * self.k)

    def layout(self, slots: tuple[int, ...]):
        """``(rows, row_index, slot_index)`` of sequences ``slots`` in this order: ``rows`` a
        ``slice`` when they are consecutive (attention reads a view), else the index tensor.
        Cached: a step whose batch did not change builds no tensor."""
        hit = self._layouts.get(slots)
        if hit is not None:
            self._layouts.move_to_end(slots)
            return hit
        k = self.k
        row_list = [s * k + j for s in slots for j in range(k)]
        index = torch.tensor(row_list, dtype=torch.long, device=self.device)
        consecutive = all(b == a + 1 for a, b in zip(slots, slots[1:], strict=False))
        rows = slice(slots[0] * k, (slots[-1] + 1) * k) if consecutive else index
        out = (rows, index, torch.tensor(slots, dtype=torch.long, device=self.device))
        self._layouts[slots] = out
        if len(self._layouts) > 64:
            self._layouts.popitem(last=False)
        return out

    def shortest(self, rows) -> int:
        """The fewest tokens any of ``rows`` holds (host side: no device read)."""
        return min(self.host_len[r] for r in rows)

    def attend(self, slots, extra: int = 0) -> int:
        """Attention width for ``slots``: the longest row + ``extra`` columns, bucketed."""
        k, hl = self.k, self.host_len
        longest = max(hl[s * k + j] for s in slots for j in range(k))
        return min(self.columns, round_up(longest + extra))

    # -- per-sequence parameters -----------------------------------------------------------
    def set_params(self, slot: int, *, seed: int, temperature: float, top_k: int, top_p: float,
                   min_p: float, step: int = 0) -> None:
        self.seed[slot] = seed
        self.step[slot] = step
        self.temperature[slot] = temperature
        self.top_k[slot] = top_k
        self.top_p[slot] = top_p
        self.min_p[slot] = min_p

    def set_adjust(self, slot: int, presence: float, frequency: float,
                   logit_bias: tuple[tuple[int, float], ...], repetition: float = 1.0,
                   context: list[list[int]] | None = None) -> None:
        """A new sequence's penalties and logit bias (its counts start at zero);
        ``repetition`` != 1 needs ``context``: each branch's prompt ids."""
        on = bool(presence or frequency or logit_bias or repetition != 1.0)
        self.adjusted[slot] = on
        self.repeating[slot] = repetition != 1.0
        self.presence[slot], self.frequency[slot] = presence, frequency
        self.repetition[slot] = repetition
        if repetition != 1.0:
            self.reseen(slot, context, [])
        if self.counts is None:
            if not on:
                return
            self.counts = torch.zeros(self.max_seqs, self.vocab, dtype=torch.float32,
                                      device=self.device)
            self.logit_bias = torch.zeros_like(self.counts)
        # zeroed for every new sequence: a step adjusts all its rows once any asks
        self.counts[slot] = 0.0
        self.logit_bias[slot] = 0.0
        if logit_bias:
            ids, vals = zip(*logit_bias, strict=True)
            self.logit_bias[slot, list(ids)] = torch.tensor(vals, device=self.device)

    def set_bans(self, slot: int, *, banned: Sequence[int] = (),
                 allowed: Sequence[int] | None = None, ends: Sequence[int] = (),
                 min_tokens: int = 0) -> None:
        """A new sequence's banned tokens: ``banned``, every token but ``allowed`` (None: no
        such list), and ``ends`` while fewer than ``min_tokens`` tokens are generated."""
        ends = [t for t in ends if t < self.vocab] if min_tokens else []
        on = bool(banned) or allowed is not None or bool(ends)
        self.banning[slot] = on
        self.min_tokens[slot] = min_tokens
        if self.banned is None:
            if not on:
                return
            self.banned = torch.zeros(self.max_seqs, self.vocab, dtype=torch.bool,
                                      device=self.device)
            self.ends = torch.zeros_like(self.banned)
        row = self.banned[slot]  # set for every new sequence: a step bans for all its rows
        row.fill_(allowed is not None)
        if allowed is not None:
            row[torch.tensor(list(allowed), dtype=torch.long, device=self.device)] = False
        if banned:
            row[torch.tensor(list(banned), dtype=torch.long, device=self.device)] = True
        self.ends[slot] = False
        if ends:
            self.ends[slot, torch.tensor(ends, dtype=torch.long, device=self.device)] = True

    def adjust(self, slots: tuple[int, ...], sidx: torch.Tensor, logits: torch.Tensor,
               coef: torch.Tensor, bans: tuple[list[int], list[int]] | None = None,
               biases: tuple[list[int], list[int], list[float]] | None = None
               ) -> torch.Tensor:
        """``[n, K, V]`` logits of ``slots`` with their repetition penalty applied to every
        branch, their bias and presence / frequency penalties to branch k times ``coef[k]``
        (see :func:`~.step.adjust_coefficients`) — and ``biases`` (``(batch rows, token ids,
        values)`` the host worked out for this step: sequence biases) the same way — then their
        banned tokens ``-inf`` on every branch (the op excludes them), and ``bans`` (``(batch
        rows, token ids)``: this step's bans the host worked out) too; the same tensor when no
        slot has any."""
        z = logits
        if any(self.adjusted[s] for s in slots):
            z = self._penalise(slots, sidx, logits.float(), coef)
        if any(self.banning[s] for s in slots):
            ban = self.banned[sidx] | (self.ends[sidx]
                                       & (self.step[sidx] < self.min_tokens[sidx])[:, None])
            z = z.masked_fill(ban[:, None, :], float("-inf"))
        if biases is not None:  # summed where one token is biased twice
            z = z.float() if z.dtype != torch.float32 else z.clone() if z is logits else z
            rows, toks = (torch.tensor(x, dtype=torch.long, device=z.device) for x in biases[:2])
            add = torch.tensor(biases[2], dtype=torch.float32, device=z.device)[:, None] \
                * coef[None, :].to(z.device, torch.float32)
            kk = torch.arange(self.k, device=z.device)[None, :].expand_as(add)
            z.index_put_((rows[:, None].expand_as(add), kk, toks[:, None].expand_as(add)), add,
                         accumulate=True)
        if bans is not None:
            z = z.clone() if z is logits else z
            rows, toks = (torch.tensor(x, dtype=torch.long, device=z.device) for x in bans)
            z[rows, :, toks] = float("-inf")
        return z

    def _penalise(self, slots: tuple[int, ...], sidx: torch.Tensor, z: torch.Tensor,
                  coef: torch.Tensor) -> torch.Tensor:
        if any(self.repeating[s] for s in slots):  # (a penalty of 1 on the others: no change)
            p = self.repetition[sidx][:, None, None]
            seen = self.seen.view(self.max_seqs, self.k, -1)[sidx]
            z = torch.where(seen, torch.where(z < 0, z * p, z / p), z)
        if self.counts is None:
            return z
        c = self.counts[sidx]
        adj = self.logit_bias[sidx] - self.frequency[sidx, None] * c \
            - self.presence[sidx, None] * (c > 0)
        return z + adj[:, None, :] * coef[None, :, None]

    def record(self, sidx: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count each slot's sampled token (for the penalties)."""
        t = tokens.clamp(min=0)
        if self.counts is not None:
            self.counts.index_put_((sidx, t), torch.ones_like(tokens, dtype=torch.float32),
                                   accumulate=True)
        if self.seen is not None:
            branch = torch.arange(self.k, device=self.device)
            self.seen.view(self.max_seqs, self.k, -1)[sidx[:, None], branch[None, :],
                                                       t[:, None]] = True

    def reseen(self, slot: int, context: list[list[int]], tokens: list[int]) -> None:
        """A sequence's repetition-penalty tokens: each branch's prompt ``context`` and its
        generated ``tokens``."""
        if self.seen is None:
            self.seen = torch.zeros(self.max_seqs * self.k, self.vocab, dtype=torch.bool,
                                    device=self.device)
        for j, ids in enumerate(context):
            row = self.seen[slot * self.k + j]
            row.zero_()
            keep = [t for t in (*ids, *tokens) if t < self.vocab]
            row[torch.tensor(keep, dtype=torch.long, device=self.device)] = True

    def recount(self, slot: int, tokens: list[int]) -> None:
        """A sequence's counts from its generated ``tokens`` (after a truncation)."""
        if self.counts is not None:
            self.counts[slot] = torch.bincount(
                torch.tensor(tokens, dtype=torch.long), minlength=self.vocab
            )[:self.vocab].float().to(self.device)

    def set_rows(self, slot: int, lengths: list[int]) -> None:
        """A new sequence's rows hold ``lengths[k]`` tokens (written by its prefill)."""
        for j, n in enumerate(lengths):
            r = slot * self.k + j
            self.host_len[r] = n
        rows = slice(slot * self.k, (slot + 1) * self.k)
        self.lens[rows] = torch.tensor(lengths, dtype=torch.long)
        self.gate_on[rows] = False
        self.host_gate[slot] = None
        self.bias[rows] = self.neg
        for j, n in enumerate(lengths):
            self.bias[slot * self.k + j, :n] = 0.0

    def advance(self, slots, rows, index: torch.Tensor) -> None:
        """After a decode forward over ``slots``: every row holds one more token."""
        if isinstance(rows, slice):
            self.lens[rows] += 1
        else:
            self.lens.index_add_(0, index, torch.ones_like(index))
        k, hl = self.k, self.host_len
        for s in slots:
            for j in range(k):
                hl[s * k + j] += 1

    def advance_rows(self, rows: tuple[int, ...], index: torch.Tensor) -> None:
        """After a decode forward over some rows only (``index``: the same as a tensor): each
        holds one more token; the other rows of their sequences keep their length."""
        self.lens.index_add_(0, index, torch.ones_like(index))
        for r in rows:
            self.host_len[r] += 1

    def fork(self, parent: int, children: list[int]) -> None:
        """Copy the parent's rows (KV, length, mask, gate decisions, sampling state) into
        ``children``."""
        k = self.k
        n_cols = max(self.host_len[parent * k + j] for j in range(k))
        src = torch.tensor([parent * k + j for _ in children for j in range(k)],
                           dtype=torch.long, device=self.device)
        dst = torch.tensor([c * k + j for c in children for j in range(k)],
                           dtype=torch.long, device=self.device)
        self.cache.copy_rows(src, dst, n_cols)
        self.lens[dst] = self.lens[src]
        if self.seen is not None:
            self.seen[dst] = self.seen[src]
        self.gate_on[dst] = self.gate_on[src]
        self.bias[dst] = self.bias[src]
        ch = torch.tensor(children, dtype=torch.long, device=self.device)
        for t in (self.last, self.step, self.temperature, self.top_k, self.top_p, self.min_p,
                  self.presence, self.frequency, self.repetition, self.min_tokens):
            t[ch] = t[parent].clone()
        if self.counts is not None:
            self.counts[ch] = self.counts[parent].clone()
            self.logit_bias[ch] = self.logit_bias[parent].clone()
        if self.banned is not None:
            self.banned[ch] = self.banned[parent].clone()
            self.ends[ch] = self.ends[parent].clone()
        for c in children:
            self.adjusted[c] = self.adjusted[parent]
            self.banning[c] = self.banning[parent]
            self.repeating[c] = self.repeating[parent]
            self.host_gate[c] = self.host_gate[parent]
            for j in range(k):
                self.host_len[c * k + j] = self.host_len[parent * k + j]

    def compact(self) -> list[tuple[int, int]]:
        """Move the highest live sequences into the free slots below them, so the live slots are
        ``0 .. n-1`` and every step reads the cache through a view (no gather). Each move copies
        one sequence's rows (as :meth:`fork` does) once; returns the ``(from, to)`` moves."""
        moves = []
        used = sorted(set(range(self.max_seqs)) - set(self._free))
        while used and self._free and self._free[0] < used[-1]:
            dst, src = heapq.heappop(self._free), used.pop()
            self.fork(src, [dst])
            self.seed[dst] = self.seed[src]
            heapq.heappush(self._free, src)
            bisect.insort(used, dst)
            moves.append((src, dst))
        return moves

    def truncate(self, slot: int, lengths: list[int], last_token: int, step: int) -> None:
        """Roll a sequence's rows back to ``lengths`` tokens; ``last_token`` is fed next."""
        k = self.k
        for j, n in enumerate(lengths):
            r = slot * k + j
            self.host_len[r] = n
            self.bias[r, n:] = self.neg
        self.lens[slot * k:(slot + 1) * k] = torch.tensor(lengths, dtype=torch.long)
        self.last[slot] = last_token
        self.step[slot] = step

    def nbytes(self) -> int:
        """Device bytes of the KV buffers (after the first forward) and the per-row state."""
        kv = sum(t.numel() * t.element_size() for layer in self.cache.layers
                 if layer.is_initialized for t in (layer.keys, layer.values))
        return kv + self.bias.numel() * self.bias.element_size()
