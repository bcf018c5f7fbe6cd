"""Chat templates per branch, split into a shared branch prefix and a per-request suffix.

For branch k and request b the prompt is ``template([system_k] + messages_b)``. Its *prefix* — the
text before the first user message's content (template head + system prompt + the user turn's
opening) — is found by rendering the branch with two different probe messages and taking the common
start; it is the same for every request, so its KV is computed once per branch. The *suffix* (the
request's own messages and the generation prompt) is what each request prefills.

A conversation's earlier turns (everything before its last user message: a few-shot prompt, a
chat's history) join the prefix once a request with the same history under the same branch has
been seen before: from the second such request on, the history's KV is computed once and reused
(a history seen once costs nothing more). :meth:`PromptBuilder.expect` counts a call's requests
ahead, so the first of several sharing a history in one call shares it too. A chat that grows —
a request whose messages are an earlier request's plus that request's answer and a new user
turn — shares its history at once, and its prefix extends what is stored of the earlier turn
(``Prefix.bases``, over their longest common start): the earlier request's whole prompt and
answer where the engine kept them (``KeptTurns.keep``), else its history; only the rest is
computed, on top of the stored KV. Not for
branches whose hooks act on the request's own prompt positions (``BranchHook(positions=
"prompt")``: the history is part of that prompt).

Any request's leading tokens are shared too (``TokenRuns``; ``PromptBuilder.share_tokens``
switches it; what vLLM calls automatic prefix caching): its suffix is cut into blocks of
``TOKEN_BLOCK`` ids, each named by a digest chained from the branch's prefix through the blocks
before it; where two requests (of one call, or one earlier) have at least ``MIN_SHARED_TOKENS``
of those blocks in common, the run joins the prefix — a few-shot completion, a document several
questions follow, a context scored against several continuations. A run's KV extends the longest
stored run of the same chain it starts like (or is cut from a longer one), so only new blocks
are computed.

Templates without a system role (Gemma's, early Mistral's: they raise, or drop the message) get
the system text at the start of the first user message, followed by a blank line — what Gemma
3's own template does with a system message — so every method with a system prompt runs on them.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .branches import Branch
from .cache import LRU

Message = dict
Prompt = str | Sequence[Message]

_PROBES = ("Alpha probe message", "Bravo probe message")
_SOFT = "\ue000"  # stands in for a soft prompt while rendering (a private-use character)
TOKEN_BLOCK = 16  # ids per block of a request's leading tokens (shared whole blocks only)
# a shorter common run is not worth a prefix of its own: one block already pays on the CPU
# (1.10-1.35x per call for 2-8 requests sharing 16 tokens: benchmarks/results/min_shared_cpu.md)
MIN_SHARED_TOKENS = TOKEN_BLOCK
FINISHED_PER_TURN = 8  # a chat turn's answers kept for its next turn (n choices)


@dataclass
class Prefix:
    """A branch's shared prefix: token ids, or ids around a soft prompt."""

    key: str
    ids: list[int]  # text branches: all ids; soft branches: ids before the soft prompt
    soft: torch.Tensor | None = None
    tail_ids: tuple[int, ...] = ()
    # earlier prefixes this one starts like, the longest common start first: (key, positions
    # in common, spent: a chat's earlier turn, rarely wanted again once extended). The first
    # still stored is the base: only the columns after the common start are computed
    bases: tuple[tuple[str, int, bool], ...] = ()
    # (key, length) of the branch's own prefix (its system text and template head) this one
    # is or extends by a request's leading tokens (``TokenRuns``); None: neither (a history)
    chain: tuple[str, int] | None = None

    @property
    def head(self) -> bool:
        """Whether this is a branch's own prefix, which leading tokens may extend."""
        return self.chain is not None and self.chain[0] == self.key

    def as_head(self) -> Prefix:
        """Mark this as a branch's own prefix; returns it."""
        self.chain = (self.key, len(self))
        return self

    def after(self, n: int) -> list[int]:
        """The token ids of the positions from ``n`` on (``n`` past any soft prompt)."""
        if self.soft is None:
            return list(self.ids[n:])
        return list(self.tail_ids[n - len(self.ids) - self.soft.shape[0]:])

    def __len__(self) -> int:
        n = len(self.ids) + len(self.tail_ids)
        return n + (self.soft.shape[0] if self.soft is not None else 0)

    def cut(self, n: int, key: str) -> Prefix:
        """The first ``n`` positions of this prefix, named ``key`` (a soft prompt is not cut:
        at least the ids before it and all of it are kept)."""
        if self.soft is None:
            return Prefix(key, self.ids[:n])
        head = len(self.ids) + self.soft.shape[0]
        return Prefix(key, list(self.ids), self.soft, self.tail_ids[:max(0, n - head)])

    def embeds(self, embed: torch.nn.Module) -> torch.Tensor:
        """[P, d] input embeddings of the prefix."""
        dev = embed.weight.device
        parts = [embed(torch.tensor(self.ids, dtype=torch.long, device=dev))]
        if self.soft is not None:
            parts.append(self.soft.to(dev, embed.weight.dtype))
            parts.append(embed(torch.tensor(self.tail_ids, dtype=torch.long, device=dev)))
        return torch.cat(parts, dim=0)


def normalise_prompt(prompt: Prompt, index: int) -> list[Message]:
    """A prompt (string or chat messages) as a validated message list."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"prompts[{index}]: empty prompt")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, dict) or not isinstance(prompt, Sequence) or not prompt:
        raise ValueError(f"prompts[{index}]: expected a string or a non-empty list of "
                         "{'role', 'content'} messages")
    msgs = []
    for j, m in enumerate(prompt):
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
            raise ValueError(f"prompts[{index}][{j}]: expected a dict with 'role' and 'content'")
        if m["role"] != "system" and not m["content"].strip():
            raise ValueError(f"prompts[{index}][{j}]: empty {m['role']} message")
        msgs.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in msgs):
        raise ValueError(f"prompts[{index}]: needs at least one user message")
    return msgs


def is_token_ids(prompt) -> bool:
    """Whether ``prompt`` is a non-empty list of token ids (a raw prompt given as ids)."""
    return isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes)) \
        and bool(prompt) and all(isinstance(t, int) for t in prompt)


def fold_system(system: str, messages: list[Message]) -> list[Message]:
    """``messages`` with ``system`` at the start of the first user message (for templates
    without a system role)."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    out = list(messages)
    out[first] = {"role": "user", "content": f"{system}\n\n{messages[first]['content']}"}
    return out


def split_system(messages: list[Message], index: int) -> tuple[str | None, list[Message]]:
    """A request's own system message (None: none) and its other messages."""
    own = [m for m in messages if m["role"] == "system"]
    if len(own) > 1:
        raise ValueError(f"prompts[{index}]: more than one system message")
    return (own[0]["content"] if own else None), [m for m in messages if m["role"] != "system"]


def _common_prefix(a: str, b: str) -> str:
    return os.path.commonprefix([a, b])


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _shared(prefix: Prefix, base: Prefix) -> int:
    """How many leading positions ``prefix`` has in common with ``base`` (ids, then the soft
    prompt and the ids after it), at most one short of ``prefix``'s length."""
    if (base.soft is None) != (prefix.soft is None):
        return 0
    if base.soft is None:
        n = _common(prefix.ids, base.ids)
    elif prefix.ids != base.ids or base.soft is not prefix.soft and not torch.equal(
            base.soft, prefix.soft):
        return 0
    else:
        n = len(prefix.ids) + prefix.soft.shape[0] + _common(prefix.tail_ids, base.tail_ids)
    return min(n, len(prefix) - 1)


def _link_bases(prefix: Prefix, bases: Sequence[tuple[Prefix | None, bool]]) -> None:
    """Give ``prefix`` the ones of ``bases`` (prefix or None, spent once extended) it starts
    like, the longest common start first (ids compared: a template may tokenise a boundary
    differently, and a kept answer's ids may differ from its text's)."""
    found = [(_shared(prefix, b), b.key, spent) for b, spent in bases if b is not None]
    prefix.bases = tuple((key, n, spent) for n, key, spent in
                         sorted(found, key=lambda x: -x[0]) if n > 0)


def _chain(seed: str, suffix: Sequence[int], last: bool = False) -> list[bytes]:
    """Digests of ``suffix``'s whole blocks of ``TOKEN_BLOCK`` ids (its last id left out
    unless ``last``), each chained from ``seed`` through the blocks before it."""
    out, d = [], hashlib.blake2b(seed.encode(), digest_size=16).digest()
    end = len(suffix) if last else len(suffix) - 1
    for i in range(0, end // TOKEN_BLOCK * TOKEN_BLOCK, TOKEN_BLOCK):
        block = array("q", suffix[i:i + TOKEN_BLOCK]).tobytes()
        d = hashlib.blake2b(d + block, digest_size=16).digest()
        out.append(d)
    return out


class TokenRuns:
    """Requests' common leading tokens, shared as prefixes (see the module doc): which blocks
    were seen how often, and the runs made of them (bounded LRUs)."""

    def __init__(self) -> None:
        self._blocks: LRU = LRU(1 << 16)  # a token block's chained digest -> requests seen
        self._through: LRU = LRU(1 << 16)  # a block's digest -> the longest run made through it
        self._runs: LRU = LRU(4096)  # (head key, last block's digest) -> the run's prefix

    def share(self, branches: Sequence[Branch], requests: list[list[tuple[Prefix, list[int]]]]
              ) -> list[list[tuple[Prefix, list[int]]]]:
        """``requests`` (per request, (prefix, suffix) per branch) with each suffix's leading
        blocks that another request — of these or one seen before — starts with too moved into
        the prefix, where they are at least ``MIN_SHARED_TOKENS`` ids and the prefix is the
        branch's own (``Prefix.head``: not a history; not a branch hooked on the prompt
        positions). The last suffix id always stays: the request's first token is drawn from
        its output."""
        hooked = [any(h.positions == "prompt" for h in br.hooks) for br in branches]
        chains = []
        for req in requests:  # count every request's blocks first: one call's share at once
            row = []
            for (prefix, suffix), skip in zip(req, hooked, strict=True):
                digests = [] if skip or not prefix.head else _chain(prefix.key, suffix)
                for d in digests:
                    self._blocks[d] = self._blocks.get(d, 0) + 1
                row.append(digests)
            chains.append(row)
        out = []
        for req, row in zip(requests, chains, strict=True):
            new = []
            for (prefix, suffix), digests in zip(req, row, strict=True):
                n = 0
                while n < len(digests) and self._blocks.get(digests[n], 0) >= 2:
                    n += 1
                new.append(self._extend(prefix, suffix, digests[:n])
                           if n * TOKEN_BLOCK >= MIN_SHARED_TOKENS else (prefix, suffix))
            out.append(new)
        return out

    def _extend(self, head: Prefix, suffix: list[int], digests: list[bytes]
                ) -> tuple[Prefix, list[int]]:
        """(``head`` + the suffix's first ``len(digests)`` blocks, the rest of the suffix)."""
        n = len(digests) * TOKEN_BLOCK
        key = (head.key, digests[-1])
        if key not in self._runs:
            run = tuple(suffix[:n])
            name = PromptBuilder._name(("tokens", head.key, digests[-1].hex()))
            prefix = Prefix(name, head.ids + list(run)) if head.soft is None else \
                Prefix(name, list(head.ids), head.soft, head.tail_ids + run)
            prefix.chain = head.chain
            # what it may extend or be cut from: a longer run made through its last block,
            # the longest shorter runs of the same chain, the branch's own prefix
            found = [self._through.get(digests[-1])] + [
                (head.key, d) for d in reversed(digests[:-1]) if (head.key, d) in self._runs][:3]
            _link_bases(prefix, [(self._runs.get(f), False) for f in found if f] +
                        [(head, False)])
            self._runs[key] = prefix
            for d in digests[:-1]:  # the longest run made through each block
                longer = self._runs.get(self._through.get(d))
                if longer is None or len(longer) < len(prefix):
                    self._through[d] = key
        return self._runs[key], list(suffix[n:])

    def kept(self, sequence: Prefix) -> None:
        """Record ``sequence`` (a finished request's prompt and answer, its KV kept under
        ``sequence.key``; ``chain``: the branch prefix it starts with) as seen: a later run of
        its chain may be cut from it, and a request that starts like it — the answer
        included — shares that start from its first sighting."""
        head_key, n = sequence.chain
        digests = _chain(head_key, sequence.after(n), last=True)
        if not digests:
            return
        key = (head_key, "kept", digests[-1])
        self._runs[key] = sequence
        for d in digests:
            self._blocks[d] = max(self._blocks.get(d, 0), 1)
            longer = self._runs.get(self._through.get(d))
            if longer is None or len(longer) <= len(sequence):
                self._through[d] = key


class PromptBuilder:
    """Renders branch prefixes and request suffixes for one tokenizer; ``share_history``: a
    conversation's earlier turns join the prefix once seen twice; ``share_tokens``: so do
    requests' common leading tokens (see the module doc)."""

    def __init__(self, tokenizer, share_history: bool = True, share_tokens: bool = True
                 ) -> None:
        self.tok = tokenizer
        self.share_history = share_history
        self.share_tokens = share_tokens
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self._system_role: bool | None = None  # whether the template renders a system message
        # Bounded: requests may bring any number of distinct system messages.
        self._prefix_text: LRU = LRU(1024)
        self._prefixes: LRU = LRU(1024)
        self._histories: LRU = LRU(4096)  # conversation histories seen: how often
        self._turns: LRU = LRU(4096)  # requests' messages seen, to recognise a growing chat
        self._built_turns: LRU = LRU(4096)  # (prefix key, suffix) -> the turn's digest
        # a turn's digest -> its finished sequences (ids): a request's n choices, each one
        self._finished: LRU = LRU(1024)
        self.runs = TokenRuns()  # requests' common leading tokens

    # -- rendering ---------------------------------------------------------------------------
    def render(self, system: str | None, messages: list[Message], raw: bool = False,
               generation: bool = True) -> str:
        """The prompt text (``generation``: with the template's generation prompt)."""
        if raw:  # a completion: the text as it is, after the branch's system text
            head = f"{system}\n\n" if system else ""
            return head + "\n\n".join(m["content"] for m in messages)
        if self.has_template:
            if system is None:
                msgs = messages
            elif self.system_role:
                msgs = [{"role": "system", "content": system}] + messages
            else:  # no system role: the text opens the first user message
                msgs = fold_system(system, messages) if system else messages
            return self.tok.apply_chat_template(msgs, tokenize=False,
                                                add_generation_prompt=generation)
        head = f"{system}\n\n" if system else ""
        return head + "\n\n".join(m["content"] for m in messages) + "\n\n"

    @property
    def system_role(self) -> bool:
        """Whether the chat template renders a system message (checked once: it may raise, as
        Gemma's does, or leave the text out)."""
        if self._system_role is None:
            probe = "System probe text"
            try:
                text = self.tok.apply_chat_template(
                    [{"role": "system", "content": probe}, {"role": "user", "content": "Hi"}],
                    tokenize=False, add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - a template's own error (jinja2's TemplateError)
                text = ""
            self._system_role = probe in text
        return self._system_role

    def encode(self, text: str, first: bool, raw: bool = False) -> list[int]:
        special = first and (raw or not self.has_template)  # BOS for raw prompts only
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def prefix_text(self, system: str | None, raw: bool = False) -> str:
        """The text every request under ``system`` starts with, cut where tokenising it apart
        from the rest gives the same ids as tokenising the whole (a cut inside a run of
        whitespace, as after a system text folded into the user turn, may not: the cut moves
        before that whitespace, or to the start)."""
        if (system, raw) not in self._prefix_text:
            renders = [self.render(system, [{"role": "user", "content": p}], raw)
                       for p in _PROBES]
            common = _common_prefix(*renders)
            for cut in (common, common.rstrip(), ""):
                if all(self._splits_cleanly(r, cut, raw) for r in renders):
                    break
            self._prefix_text[system, raw] = cut
        return self._prefix_text[system, raw]

    def _splits_cleanly(self, text: str, cut: str, raw: bool) -> bool:
        if not cut:
            return True
        return self.encode(cut, first=True, raw=raw) + \
            self.encode(text[len(cut):], first=False, raw=raw) == \
            self.encode(text, first=True, raw=raw)

    # -- per branch and request ---------------------------------------------------------------
    @staticmethod
    def system_text(branch: Branch, own: str | None) -> str | None:
        """The system message of ``branch`` for a request whose own system message is ``own``:
        the branch's soft prompt (its placeholder), then its text, then the request's (a
        deployment's system prompt joins every branch, after the branch's own prompt, so the
        contrast stays between the branches' prompts). None: the template's default."""
        if branch.soft_prompt is None and branch.system is None:
            return own  # the plain branch: the request's system message as it is
        parts = [_SOFT] if branch.soft_prompt is not None else []
        parts += [t for t in (branch.system, own) if t]
        return "\n".join(parts)

    def build(self, branch: Branch, messages: list[Message], index: int,
              raw: bool = False) -> tuple[Prefix, list[int]]:
        """(shared prefix, suffix token ids) of ``messages`` under ``branch``; ``raw``: one
        user message continued as it is (no chat template)."""
        own, rest = split_system(messages, index)
        system = self.system_text(branch, own)
        if raw and (own is not None or len(rest) != 1):
            raise ValueError(f"prompts[{index}]: a raw prompt is one user text")
        full = self.render(system, rest, raw)
        ptext = self.prefix_text(system, raw)
        if not full.startswith(ptext):  # template depends on the request: no sharing
            ptext = ""
        turn, before = self._turn(branch, system, rest, raw)
        history = self._history(branch, system, rest, full, raw, before is not None)
        bases = []  # what a history's prefix may extend, and whether that one is then spent
        if history is not None:
            if before is not None:  # the chat's request before: its whole sequence, if kept
                bases += [(done, True) for done in  # (KeptTurns.keep) ...
                          self._finished.get(before, ())]
                if len(rest) >= 4:  # ... and its history
                    found = self._history_of(branch, system, rest[:-2], raw)
                    bases += [(self._prefixes.get((branch.key(), system, found[0], raw)),
                               True)] if found else []
            if ptext:  # the branch's own prefix
                bases.append((self._prefixes.get((branch.key(), system, ptext, raw)), False))
            ptext = history
        if branch.soft_prompt is not None and _SOFT not in ptext:
            raise ValueError("soft prompts need a chat template whose head does not depend "
                             "on the user's messages")
        key = (branch.key(), system, ptext, raw)
        if key not in self._prefixes:
            prefix = self._make_prefix(branch, ptext, self._name(key), raw)
            if history is None:
                prefix.as_head()
            _link_bases(prefix, bases)
            self._prefixes[key] = prefix
        suffix = self.encode(full[len(ptext):], first=not ptext, raw=raw)
        prefix = self._prefixes[key]
        if turn is not None:
            self._built_turns[prefix.key, tuple(suffix)] = turn
        return prefix, suffix

    def turn_of(self, prefix: Prefix, suffix: Sequence[int]) -> bytes | None:
        """The digest of the chat request :meth:`build` split into ``prefix`` and ``suffix``
        (None: not a chat request, or forgotten)."""
        return self._built_turns.get((prefix.key, tuple(suffix)))

    def finished(self, turn: bytes, sequence: Prefix) -> None:
        """Remember ``sequence`` (a finished request's prompt and answer, its KV stored
        under ``sequence.key``) as one the chat's next turn may extend: of a request's several
        answers (``n`` choices) the next turn extends the one it continues (the
        ``FINISHED_PER_TURN`` latest kept)."""
        kept = [s for s in self._finished.get(turn, ()) if s.key != sequence.key]
        self._finished[turn] = [*kept[max(0, len(kept) + 1 - FINISHED_PER_TURN):], sequence]

    def forget(self, turn: bytes, sequence: Prefix) -> None:
        """Forget ``sequence`` as one ``turn``'s next turn may extend (see :meth:`finished`)."""
        kept = [s for s in self._finished.get(turn, ()) if s is not sequence]
        if kept:
            self._finished[turn] = kept
        else:
            self._finished.pop(turn, None)

    def finished_sequences(self, turn: bytes) -> list[Prefix]:
        """What :meth:`finished` remembers for ``turn``, oldest first."""
        return list(self._finished.get(turn, ()))

    @staticmethod
    def _name(key: tuple) -> str:
        name = "|".join(map(str, key))
        if len(name) > 512:  # a long system text or history: named by its digest
            name = "prefix:" + hashlib.blake2b(name.encode(), digest_size=16).hexdigest()
        return name

    def _turn(self, branch: Branch, system: str | None, rest: list[Message], raw: bool
              ) -> tuple[bytes | None, bytes | None]:
        """Record ``rest`` as a chat request under ``branch``: (its digest, the digest of the
        request before it in the conversation — its messages less the last answer and user
        turn — where that was seen: the request grows a chat). (None, None) where histories
        are not shared."""
        if not self.share_history or raw or not self.has_template:
            return None, None

        def digest(msgs: list[Message]) -> bytes:
            text = json.dumps(msgs, sort_keys=True, default=str)
            return hashlib.blake2b(f"{branch.key()}|{system}|{text}".encode(),
                                   digest_size=16).digest()

        before = digest(rest[:-2]) if len(rest) >= 3 and rest[-2]["role"] == "assistant" \
            else None
        turn = digest(rest)
        self._turns[turn] = True
        return turn, before if before in self._turns else None

    def _history_of(self, branch: Branch, system: str | None, rest: list[Message],
                    raw: bool) -> tuple[str, bytes] | None:
        """The text of ``rest``'s turns before its last user message under ``branch`` and its
        digest (a history can be long), or None where no history is shared."""
        if not self.share_history or raw or not self.has_template or len(rest) < 2 \
                or rest[-1]["role"] != "user" \
                or any(h.positions == "prompt" for h in branch.hooks):
            return None
        try:
            text = self.render(system, rest[:-1], generation=False)
        except Exception:  # noqa: BLE001 - a template that wants a user turn last
            return None
        return text, hashlib.blake2b(f"{branch.key()}|{system}|{text}".encode(),
                                     digest_size=16).digest()

    def _history(self, branch: Branch, system: str | None, rest: list[Message], full: str,
                 raw: bool, growing: bool = False) -> str | None:
        """The history text (:meth:`_history_of`) when a request with the same history under
        this branch came before (or the request ``growing`` a chat) and the text splits off
        cleanly; else None."""
        found = self._history_of(branch, system, rest, raw)
        if found is None:
            return None
        text, key = found
        seen = self._histories.get(key, 0) + 1
        self._histories[key] = seen
        if (seen < 2 and not growing) or not full.startswith(text) \
                or not self._splits_cleanly(full, text, raw):
            return None
        return text

    def expect(self, branches: Sequence[Branch], prompts: Sequence, raw: bool = False) -> None:
        """Count the histories that two or more of ``prompts`` (one call's requests) share as
        seen already, so the first of them shares the prefix too (a few-shot batch)."""
        if not self.share_history or raw or len(prompts) < 2:
            return
        counts: dict[bytes, int] = {}
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str) or is_token_ids(prompt):
                continue
            try:
                own, rest = split_system(normalise_prompt(prompt, i), i)
            except ValueError:  # the build names it
                continue
            for branch in branches:
                system = self.system_text(branch, own)
                found = self._history_of(branch, system, rest, raw)
                if found is not None:
                    counts[found[1]] = counts.get(found[1], 0) + 1
        for key, n in counts.items():
            if n > 1 and key not in self._histories:
                self._histories[key] = 1

    def build_requests(self, branches: Sequence[Branch], prompts: Sequence, *,
                       raw: bool = False, vocab: int | None = None
                       ) -> list[list[tuple[Prefix, list[int]]]]:
        """One call's requests, each split as by :meth:`build_request`; histories and leading
        tokens that two or more of them share are shared from the first of them on."""
        self.expect(branches, prompts, raw)
        return self._share_leading(branches, [
            self._build_request(branches, p, i, raw=raw, vocab=vocab)
            for i, p in enumerate(prompts)])

    def build_request(self, branches: Sequence[Branch], prompt, index: int, *,
                      raw: bool = False, vocab: int | None = None
                      ) -> list[tuple[Prefix, list[int]]]:
        """A request (a string, chat messages, or — raw — token ids below ``vocab``) split
        into (shared prefix, suffix ids) for each branch, or a ``ValueError`` naming it."""
        return self._share_leading(branches, [self._build_request(
            branches, prompt, index, raw=raw, vocab=vocab)])[0]

    def _build_request(self, branches: Sequence[Branch], prompt, index: int, *,
                       raw: bool = False, vocab: int | None = None
                       ) -> list[tuple[Prefix, list[int]]]:
        if is_token_ids(prompt):
            if not raw:
                raise ValueError(f"prompts[{index}]: token ids are a raw (completion) prompt: "
                                 "pass raw=True")
            if vocab is not None and any(not 0 <= t < vocab for t in prompt):
                raise ValueError(f"prompts[{index}]: token ids must be in [0, {vocab})")
            return [self.build_ids(br, prompt, index) for br in branches]
        if raw and not isinstance(prompt, str):
            raise ValueError(f"prompts[{index}]: a raw (completion) prompt must be a string "
                             "or token ids")
        msgs = normalise_prompt(prompt, index)
        return [self.build(br, msgs, index, raw=raw) for br in branches]

    # -- leading tokens ----------------------------------------------------------------------
    def _share_leading(self, branches: Sequence[Branch],
                       requests: list[list[tuple[Prefix, list[int]]]]
                       ) -> list[list[tuple[Prefix, list[int]]]]:
        """``requests`` with their common leading tokens shared (:meth:`TokenRuns.share`); a
        chat request split anew keeps its turn (``turn_of``)."""
        if not self.share_tokens:
            return requests
        out = self.runs.share(branches, requests)
        for old, new in zip(requests, out, strict=True):
            for (pre, suf), (run, rest) in zip(old, new, strict=True):
                turn = self._built_turns.get((pre.key, tuple(suf))) if run is not pre else None
                if turn is not None:  # its finished turn is still worth keeping
                    self._built_turns[run.key, tuple(rest)] = turn
        return out

    def build_ids(self, branch: Branch, ids: Sequence[int], index: int
                  ) -> tuple[Prefix, list[int]]:
        """(prefix, suffix) of a raw prompt given as token ids: the branch's own system text
        (as a raw prompt starts with it) tokenised alone, then ``ids`` as they are (no BOS
        added: a client sending ids sends what it wants, as vLLM takes them)."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise ValueError(f"prompts[{index}]: expected a non-empty list of token ids")
        system = self.system_text(branch, None)
        head = self.render(system, [], raw=True) if system else ""
        key = (branch.key(), system, head, "ids")
        if key not in self._prefixes:
            self._prefixes[key] = self._make_prefix(branch, head, "|".join(map(str, key)),
                                                    raw=True)
            self._prefixes[key].as_head()
        return self._prefixes[key], list(ids)

    def _make_prefix(self, branch: Branch, ptext: str, key: str, raw: bool) -> Prefix:
        if branch.soft_prompt is None:
            return Prefix(key, self.encode(ptext, first=True, raw=raw) if ptext else [])
        head, tail = ptext.split(_SOFT, 1)
        return Prefix(key, self.encode(head, first=True, raw=raw), branch.soft_prompt.detach(),
                      tuple(self.encode(tail, first=False, raw=raw)))


def request_text(prompt, tokenizer=None) -> str:
    """The text a reward scores an answer against: a string prompt itself; of chat messages,
    the last user message (the last message where none is the user's); token ids, decoded."""
    if isinstance(prompt, str):
        return prompt
    msgs = list(prompt)
    if is_token_ids(msgs):
        if tokenizer is None:
            raise ValueError("prompt: token ids need the tokenizer to be scored")
        return tokenizer.decode(msgs, skip_special_tokens=True)
    users = [m for m in msgs if m.get("role") == "user"] or msgs
    if not users:
        raise ValueError("prompt: no message to score the answer against")
    return str(users[-1].get("content", ""))


def token_requests(branches: Sequence[Branch], ids: Sequence[Sequence[Sequence[int]]]
                   ) -> list[list[tuple[Prefix, list[int]]]]:
    """Already-rendered prompts as built requests: ``ids[k][b]`` is request b's token ids under
    branch k; each becomes ``(the branch's empty prefix, ids)`` — a head its leading tokens
    can be shared on (:meth:`TokenRuns.share`)."""
    k = len(branches)
    if len(ids) != k or not ids or any(len(x) != len(ids[0]) for x in ids):
        raise ValueError(f"expected prompt ids for {k} branches, the same number of requests "
                         "under each")
    heads = [Prefix(f"ids|{br.key()}", []).as_head() for br in branches]
    out = []
    for i in range(len(ids[0])):
        row = []
        for kk in range(k):
            seq = ids[kk][i]
            if not seq:
                raise ValueError(f"branch {kk}, request {i}: empty prompt")
            row.append((heads[kk], [int(t) for t in seq]))
        out.append(row)
    return out
