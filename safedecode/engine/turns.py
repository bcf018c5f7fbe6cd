"""Finished requests' KV kept for what comes next: a chat's next turn (its history extends the
kept prompt + answer) and requests that start like them (their leading tokens cut from it).

The engine plans at a request's prefill which of its branches are worth keeping
(:meth:`KeptTurns.plan`) and, when the request finishes, copies their KV into the turn store
(:meth:`KeptTurns.keep`). A search (DeAL, the router) whose losing candidate ended before it
chose drops what that candidate kept (:meth:`KeptTurns.discard`); a fork family's members
that end while others run are kept under names of their own, so the one the search chooses
is never overwritten by a loser.
"""

from __future__ import annotations

import hashlib
from array import array

from .branches import Method
from .cache import LRU
from .prompts import MIN_SHARED_TOKENS, Prefix, PromptBuilder, TokenRuns
from .state import DecodeState
from .step import Built, ModelStep

# per branch, what a request keeps when it finishes: (turn digest or None, prefix, suffix)
Plan = list[tuple[bytes | None, Prefix, list[int]] | None]


class KeptTurns:
    """What finished sequences keep, and what they kept (by sequence id, for
    :meth:`discard`; the ``remember`` most recent)."""

    def __init__(self, runner: ModelStep, state: DecodeState, method: Method,
                 builder: PromptBuilder | None, runs: TokenRuns, remember: int = 1024) -> None:
        self.runner, self.state, self.method = runner, state, method
        self.builder, self.runs = builder, runs
        self._kept: LRU = LRU(remember)  # sequence id -> [(turn digest or None, sequence)]

    def plan(self, built: Built) -> Plan | None:
        """Per branch (turn digest or None, prefix, suffix) of a request whose KV is worth
        keeping when it finishes: a chat request's for its next turn, any request's that starts
        with its branch's own prefix for the requests that start like it (``TokenRuns.kept``);
        None where none is (no prefix cache or turn store). Branches with hooks are left out:
        their answer's KV was computed under decode-phase hooks a prefix never runs."""
        if not self.runner.prefix_cache or not self.runner.turns.max_bytes:
            return None
        b = self.builder
        out: Plan = []
        for br, (pre, suf) in zip(self.method.branches, built, strict=True):
            turn = None if br.hooks or b is None else b.turn_of(pre, suf)
            keep = not br.hooks and (turn is not None or (
                pre.chain is not None and (b is None or b.share_tokens)))
            out.append((turn, pre, suf) if keep else None)
        return out if any(out) else None

    def keep(self, seq_id: int, plan: Plan, out: list[int], slot: int, alone: bool) -> None:
        """Store a finished sequence's KV (in ``slot``: prompt and answer ``out``, all but the
        last token, which was never fed) per branch of its ``plan`` as a prefix its chat's next
        turn, or a request starting like it, may extend. Not ``alone`` (a fork family member
        ending while others run: a search's candidate, a choice): kept under a name of its own,
        beside the others (one is the answer the chat goes on with)."""
        fed = out[:-1]
        kb = self.method.k
        ran = self.runner.branches_run(self.state, slot)  # a gated sequence's rows
        entries: list[tuple[bytes | None, Prefix]] = []
        self._kept[seq_id] = entries
        for k, entry in enumerate(plan):
            if entry is None or (ran is not None and k not in ran):
                continue
            turn, pre, suf = entry
            if turn is None and len(pre) + len(suf) + len(fed) - pre.chain[1] < \
                    MIN_SHARED_TOKENS:
                continue  # too short for any request to share: not worth the copy
            if turn is not None:
                key = f"turn:{turn.hex()}" + ("" if alone else f":{seq_id}")
            else:  # named by what it holds
                ids = array("q", [*pre.ids, *pre.tail_ids, *suf, *fed]).tobytes()
                key = "kept:" + hashlib.blake2b(pre.key.encode() + ids,
                                                digest_size=16).hexdigest()
            if pre.soft is None:
                done = Prefix(key, [*pre.ids, *suf, *fed])
            else:
                done = Prefix(key, list(pre.ids), pre.soft, (*pre.tail_ids, *suf, *fed))
            done.chain = pre.chain
            self.runner.turns.put(key, self.state.cache.read(slot * kb + k, len(done)),
                                  computed=0)
            entries.append((turn, done))
            if turn is not None:
                self.builder.finished(turn, done)
            if done.chain is not None:
                self.runs.kept(done)

    def discard(self, seq_id: int) -> None:
        """Forget what a finished sequence kept (a no-op where it kept nothing)."""
        for turn, done in self._kept.pop(seq_id, ()):
            self.runner.turns.drop(done.key)
            if turn is not None:
                self.builder.forget(turn, done)
