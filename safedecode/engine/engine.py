"""The request-level engine: add requests at any time, step them together, fork, abort.

``Engine.add_request(prompt, params) -> id`` queues a request; every ``step()`` first admits
waiting requests into free slots and prefills them (one forward for all admitted), runs one
decode forward over the running sequences, samples one token for every sequence with one op call
and reads the tokens and the op's row flags back with **one** device-to-host transfer, then
detokenises on the host and frees the slots of finished requests. ``step()`` returns the text
deltas (:class:`StepOutput`); a finished request's :class:`GenerationResult` waits in
:meth:`pop_result`. ``fork``, ``keep``, ``release`` and ``truncate`` act on sequences between
steps (DeAL's lookahead search); see :mod:`.state` for the slot layout and their costs.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

from safedecode.models import text_config
from safedecode.ops.params import STATUS_MESSAGES

from .branches import Method
from .cache import PrefixStore
from .detokenizer import IncrementalDetokenizer
from .masks import LayerMasks
from .ngrams import NGramBans
from .prompts import Prompt, PromptBuilder, TokenRuns, token_requests
from .sampling import SamplingParams
from .scheduler import QueueFull, Scheduler
from .state import DecodeState
from .step import Built, CompiledDecode, ModelStep, answer_positions
from .stops import sentence_stop
from .turns import KeptTurns, Plan

DEFAULT_MAX_LEN = 2048
# a scored answer's tokens fed with its prompt per admission step, at most (their logits kept:
# this many × K × vocabulary floats)
FORCED_PREFILL_TOKENS = 1024

__all__ = ["Engine", "GenerationResult", "StepOutput", "QueueFull", "ContextTooLong",
           "check_method_fits", "eos_ids"]


class ContextTooLong(ValueError):
    """A prompt plus ``max_new_tokens`` does not fit the model's context or the engine's
    ``max_len``."""


@dataclass
class GenerationResult:
    """One request's output."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop" (a stop string or stop token), "length" or "error"
    prompt_tokens: list[int]  # per branch: prefix + suffix length
    logprobs: list[float] | None = None
    timing: dict = field(default_factory=dict)
    error: str | None = None
    # per token, with SamplingParams.top_logprobs: the best (id, log-prob) pairs of its step
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class StepOutput:
    """What one step added to a request: a text delta (stop strings held back until they can be
    ruled out) and the sampled token; ``finish_reason`` is set on its last output."""

    request_id: int
    text: str
    token_id: int
    finish_reason: str | None = None
    logprob: float | None = None
    parent: int | None = None  # set on a sequence forked by ``step(expand=...)``
    top_logprobs: list[tuple[int, float]] | None = None


def checked_params(params: SamplingParams | None, n: int = 1) -> SamplingParams:
    """``params`` (None: the defaults) for ``n`` choices of one request, or a ``ValueError``
    naming what is wrong."""
    if params is None:
        params = SamplingParams()
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params: expected a SamplingParams, got {type(params).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: must be an integer >= 1, got {n!r}")
    return params


@dataclass
class _Seq:
    id: int
    params: SamplingParams
    seed: int
    prompt_len: list[int]
    eos: frozenset[int]
    detok: IncrementalDetokenizer
    root: int
    built: list | None = None  # until prefilled
    kids: list[_Seq] = field(default_factory=list)  # choices forked from it at its prefill
    slot: int = -1
    fed: int = 0  # prompt tokens (longest row) prefilled so far, while in chunks
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None
    gate: bool | None = None  # the contrast gate's decision, set by the caller (add_built)
    context: list[list[int]] | None = None  # prompt ids per branch (repetition penalty)
    forced: list[int] | None = None  # the tokens it takes instead of sampling (add_scored)
    # forced tokens fed with the prompt, scored from the prefill's logits (Engine._feed_forced)
    extra: int = 0
    # of those, scored so far (a prompt fed in chunks), and their scores not yet reported
    scored: list = field(default_factory=list)
    prompt_built: list | None = None  # its prompt before they were appended
    # banned words (SamplingParams.bad_words*): one-token ones, always banned; longer ones as
    # (the tokens before the last, the last), banned where the context ends in the former;
    # the context is the anchor branch's prompt tail (bad_ctx) and the answer
    bad_one: tuple[int, ...] = ()
    bad_seqs: tuple[tuple[list[int], int], ...] = ()
    bad_ctx: list[int] = field(default_factory=list)
    # SamplingParams.sequence_bias as (the tokens before the last, the last, bias), added where
    # the context (bad_ctx and the answer) ends in the former
    bias_seqs: tuple[tuple[list[int], int, float], ...] = ()
    ngrams: NGramBans | None = None  # SamplingParams.no_repeat_ngram_size
    # what of its prompt + answer KV to keep for the chat's next turn or requests starting
    # like it (KeptTurns.plan; None: nothing)
    turn: Plan | None = None
    t_add: float = 0.0
    t_first: float = 0.0
    t_done: float = 0.0


def check_method_fits(model, method: Method) -> None:
    """Raise ``ValueError`` if ``method``'s soft prompts or adapters do not fit ``model``, or
    the model has attention layers the engine cannot mask (:class:`~.masks.LayerMasks`)."""
    if not isinstance(method, Method):
        raise ValueError(f"method: expected a safedecode Method, got {type(method).__name__}; "
                         "see safedecode.methods.get()")
    LayerMasks.of(model)
    width = model.get_input_embeddings().weight.shape[1]
    for i, br in enumerate(method.branches):
        if br.adapter is not None:
            br.adapter.check_model(model)
        if br.soft_prompt is not None and br.soft_prompt.shape[1] != width:
            raise ValueError(f"method {method.name!r}: branch {i}'s soft prompt has width "
                             f"{br.soft_prompt.shape[1]}, the model's embeddings {width}")
        if br.fingerprint is not None:
            from safedecode.models import embedding_fingerprint, model_name

            here = embedding_fingerprint(model)
            if here != br.fingerprint:
                soft = br.soft_prompt is not None
                what, verb, fix = (("soft prompt", "optimised", "optimise prompts for it with "
                                    "`safedecode optimize --model ...`") if soft else
                                   ("steering vector", "computed", "compute one for it with "
                                    "`safedecode safeinfer-vector --model ...`"))
                raise ValueError(
                    f"method {method.name!r}: branch {i} ({br.name or what})'s {what} was "
                    f"{verb} for {br.trained_for or 'another model'} (embedding fingerprint "
                    f"{br.fingerprint}), but this model is {model_name(model)} (fingerprint "
                    f"{here}); {fix}")


def mixture_logprob(lp: torch.Tensor, q: torch.Tensor, w: float = 0.5) -> torch.Tensor:
    """``log((1 - w) exp(lp) + w exp(q))``: log-probs under a mixture of two distributions
    (DeAL's proposals); exactly ``logaddexp(lp, q) - log 2`` at ``w`` = 0.5."""
    return torch.logaddexp(lp, q + math.log(w / (1 - w))) + math.log(1 - w)


def default_max_len(model) -> int:
    """An engine's context when none is given: the model's positions, at most
    ``DEFAULT_MAX_LEN``."""
    context = getattr(text_config(model), "max_position_embeddings", None)
    return min(context or DEFAULT_MAX_LEN, DEFAULT_MAX_LEN)


def output_vocab(model) -> int:
    """The number of logits the model gives per position."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(text_config(model).vocab_size)


def eos_ids(model, tokenizer) -> frozenset[int]:
    """End-of-sequence ids of the model's generation config and the tokenizer."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return frozenset(ids)


class Engine:
    """Continuous batching of requests for one model and one :class:`Method`.

    ``max_seqs`` sequences (requests and fork children) run at once, each up to ``max_len``
    tokens (prompt + generated; default the model's context, at most 2048); more requests wait
    in a queue of ``max_queue``. The KV buffers are allocated at the first forward:
    ``max_seqs x K x max_len`` columns. ``compiled``: run decode forwards under
    ``torch.compile`` (see :class:`~.step.CompiledDecode`; ``SafeDecoder(compile=True)``).
    ``max_prefill_tokens``: while sequences decode, a step feeds at most this many prompt
    tokens (all branches) of the requests that join: with packed forwards a long prompt is
    prefilled in chunks over several steps (its rows aligned at their ends, its choices forked
    after the last chunk), oldest first, instead of stalling every running stream in one long
    step (lower inter-token latency tails, later first tokens). Without packing it admits
    whole requests up to that many tokens (at least one). None: every prompt whole at once.
    ``packed``: a step that admits requests runs the running sequences' decode and the new
    prompts' prefill as one packed forward (:mod:`.packed`; methods without branch hooks or
    adapters) instead of two. ``drop_rows``: a method with a contrast gate
    (:attr:`Method.contrast_gate`) decodes only the rows a decided sequence's op reads (gate
    on: the weighted branches; off: the fallback) — False keeps every row (a caller that reads
    other branches' logits: DeAL's ``propose`` / ``follow``).
    """

    def __init__(self, model, tokenizer, method: Method, *, max_seqs: int = 8,
                 max_len: int | None = None, max_queue: int = 1024, backend: str = "auto",
                 prefix_cache: bool = True, small_gemm: bool = True,
                 prefixes: PrefixStore | None = None, builder: PromptBuilder | None = None,
                 compiled: CompiledDecode | None = None,
                 max_prefill_tokens: int | None = None, packed: bool = True,
                 drop_rows: bool = True, turns: PrefixStore | None = None,
                 runs: TokenRuns | None = None) -> None:
        check_method_fits(model, method)
        if max_prefill_tokens is not None and (isinstance(max_prefill_tokens, bool) or not
                                               isinstance(max_prefill_tokens, int)
                                               or max_prefill_tokens < 1):
            raise ValueError(f"max_prefill_tokens: must be an integer >= 1 or None, got "
                             f"{max_prefill_tokens!r}")
        self.max_prefill_tokens = max_prefill_tokens
        if isinstance(max_seqs, bool) or not isinstance(max_seqs, int) or max_seqs < 1:
            raise ValueError(f"max_seqs: must be an integer >= 1, got {max_seqs!r}")
        self.model, self.tok, self.method = model, tokenizer, method
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None) or 0
        self.runner = ModelStep(model, method, backend=backend, prefix_cache=prefix_cache,
                                small_gemm=small_gemm, prefixes=prefixes, pad_id=pad,
                                compiled=compiled, pack=packed, turns=turns)
        self.runner.drop_rows &= bool(drop_rows)
        context = self.runner.max_positions
        if max_len is None:
            max_len = default_max_len(model)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len: must be an integer >= 2, got {max_len!r}")
        if context and max_len > context:
            raise ValueError(f"max_len: {max_len} exceeds the model's context of {context} "
                             "tokens")
        self.max_len = max_len
        self.builder = builder or (PromptBuilder(tokenizer) if tokenizer is not None else None)
        # requests' common leading tokens (token-id requests too: add_tokens)
        self.runs = runs or (self.builder.runs if self.builder is not None else TokenRuns())
        self.state = DecodeState(num_layers=self.runner.num_layers, k=method.k,
                                 max_seqs=max_seqs, max_len=max_len, device=self.runner.device,
                                 dtype=self.runner.dtype, sliding=self.runner.masks.sliding,
                                 vocab=output_vocab(model))
        self.scheduler: Scheduler[_Seq] = Scheduler(max_queue)
        self.kept = KeptTurns(self.runner, self.state, method, self.builder, self.runs)
        self.true_eos = eos_ids(model, tokenizer)
        if any(h.stop for br in method.branches for h in br.hooks):
            self.runner.stop = sentence_stop(method, model, tokenizer, self.true_eos,
                                             self.runner.device)
        self._ids = itertools.count()
        self._live: dict[int, _Seq] = {}  # waiting or running
        self._done: dict[int, GenerationResult] = {}
        self._prefilling: list[_Seq] = []  # holding slots, prompt fed in chunks (FIFO)
        self.steps = 0
        # scored answers' tokens fed with their prompts per step (0: one per step, decoded)
        self.forced_prefill_tokens = FORCED_PREFILL_TOKENS

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, *,
                    raw: bool = False) -> int:
        """Queue a request (a string or chat messages); returns its id. ``raw``: a string
        continued as it is (no chat template; a completion). Raises ``ValueError`` for a bad
        prompt, :class:`ContextTooLong`, or :class:`QueueFull`; nothing runs here."""
        return self.add_choices(prompt, params, 1, raw=raw)[0]

    def add_choices(self, prompt: Prompt, params: SamplingParams | None, n: int, *,
                    raw: bool = False) -> list[int]:
        """Queue ``n`` sequences of one prompt, prefilled once and forked before their first
        token (OpenAI's ``n``); choice ``i`` draws with seed ``params.seed + i``. Returns their
        ids; they are admitted together when ``n`` slots are free."""
        return self.add_built(self.build(prompt, raw=raw), params, n=n)

    def build(self, prompt: Prompt | Sequence[int], *, raw: bool = False,
              index: int = 0) -> Built:
        """``prompt`` split into (shared prefix, suffix ids) per branch; a raw prompt may be
        token ids (after each branch's own system text, as they are)."""
        if self.builder is None:
            raise ValueError("prompt: this engine has no tokenizer; use add_tokens()")
        return self.builder.build_request(self.method.branches, prompt, index, raw=raw,
                                          vocab=self.state.vocab)

    def build_many(self, prompts: Sequence, *, raw: bool = False) -> list[Built]:
        """:meth:`build` for one call's prompts: what two or more of them share (a history,
        leading tokens) is shared from the first of them on."""
        if self.builder is None:
            raise ValueError("prompt: this engine has no tokenizer; use add_tokens()")
        return self.builder.build_requests(self.method.branches, prompts, raw=raw,
                                           vocab=self.state.vocab)

    def add_scored(self, prompt: Prompt, continuation: Sequence[int],
                   params: SamplingParams | None = None, *, raw: bool = False) -> int:
        """Queue a request that takes the tokens ``continuation`` instead of sampling: its
        result's ``logprobs`` are theirs under the method's final distribution, through the
        same branches as a generated answer (branch prompts, soft prompts, hooks, adapters),
        ``-inf`` where that distribution excludes the token (the plausibility mask, top-k /
        top-p). Where a prefill gives what decode steps would (no penalties, bias or bans; no
        hooks, adapters or gate) the tokens are fed with the prompt and scored from that
        forward (:attr:`forced_prefill_tokens` per step), else one step each. ``params``: the
        distribution's knobs (temperature, top_*, penalties, ``top_logprobs``); its length,
        EOS and log-prob settings are set here."""
        return self.add_scored_built(self.build(prompt, raw=raw), continuation, params)

    def add_scored_built(self, built: Built, continuation: Sequence[int],
                         params: SamplingParams | None = None) -> int:
        """:meth:`add_scored` for a request already split (:meth:`build_many`)."""
        if isinstance(continuation, (str, bytes)) or not isinstance(continuation, Sequence) \
                or not continuation:
            raise ValueError("continuation: expected a non-empty list of token ids")
        v = self.state.vocab
        for t in continuation:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < v:
                raise ValueError(f"continuation: token ids in [0, {v}), got {t!r}")
        p = checked_params(params)
        p = replace(p, max_new_tokens=len(continuation), ignore_eos=True, logprobs=True,
                    stop=(), stop_token_ids=(), min_tokens=min(p.min_tokens, len(continuation)))
        rid = self.add_built(built, p)[0]
        self._live[rid].forced = list(continuation)
        return rid

    def add_tokens(self, ids: Sequence[Sequence[int]], params: SamplingParams | None = None
                   ) -> int:
        """Queue a request given as token ids per branch (rendered by the caller, each branch's
        system text included); the leading tokens it shares with other requests under a branch
        are shared as a prefix, as a text request's (:class:`TokenRuns`)."""
        if len(ids) != self.method.k or any(not seq for seq in ids):
            raise ValueError(f"ids: expected {self.method.k} non-empty token id lists (one per "
                             "branch)")
        built = token_requests(self.method.branches, [[seq] for seq in ids])
        if self.runner.prefix_cache:
            built = self.runs.share(self.method.branches, built)
        return self.add_built(built[0], params)[0]

    def add_built(self, built: Built, params: SamplingParams | None = None, *,
                  index: int = 0, n: int = 1, gates: Sequence[bool] | None = None) -> list[int]:
        """Queue ``n`` choices of a request already split into (prefix, suffix) per branch;
        returns their ids (see :meth:`add_choices`). ``gates``: one :attr:`Method.contrast_gate`
        decision per choice, in place of the gated hook's (a method whose gate branch has no
        gated hook needs them): ``(True, False)`` decodes the contrast and the fallback side by
        side from one prefill (the reward router's two answers)."""
        self._check_gates(gates, n)
        params = checked_params(params, n)
        if n > self.state.max_seqs:
            raise ValueError(f"n: {n} choices need {n} slots at once; this engine has "
                             f"max_seqs={self.state.max_seqs}")
        self.check_fits(built, params.max_new_tokens, index)
        self.check_params(params)
        words = self.bad_word_ids(params)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
        if seed + n - 1 >= 2**63:
            raise ValueError(f"seed: seed + n - 1 must be < 2**63, got {seed} with n={n}")
        eos = (frozenset() if params.ignore_eos else self.true_eos) \
            | frozenset(params.stop_token_ids)
        if params.min_tokens and params.allowed_token_ids is not None \
                and set(params.allowed_token_ids) <= eos:
            raise ValueError("min_tokens: every token in allowed_token_ids ends the request, so "
                             "none is left before min_tokens; allow a token that does not end "
                             "it, or drop min_tokens")
        lens = [len(p) + len(s) for p, s in built]
        longer = tuple((list(w[:-1]), w[-1]) for w in words if len(w) > 1)
        biased = tuple((list(w[:-1]), w[-1], b) for w, b in params.sequence_bias)
        # the anchor branch's prompt (after a soft prompt): a banned word, a biased sequence
        # or a repeated n-gram may start there
        pre, suf = built[self.method.anchor]
        context = ([*pre.tail_ids] if pre.soft is not None else [*pre.ids]) + list(suf)
        heads = [len(h) for h, _ in longer] + [len(h) for h, _, _ in biased]
        ctx = context[max(0, len(context) - max(heads)):] if any(heads) else []
        ngrams = NGramBans(params.no_repeat_ngram_size, context) \
            if params.no_repeat_ngram_size else None
        seqs = []
        for i in range(n):
            rid = next(self._ids)
            seqs.append(_Seq(rid, params, seed + i, lens, eos,
                             self._detok(params, eos),
                             root=seqs[0].id if seqs else rid,
                             built=list(built) if i == 0 else None, t_add=time.perf_counter(),
                             gate=None if gates is None else bool(gates[i]),
                             bad_one=tuple(w[0] for w in words if len(w) == 1),
                             bad_seqs=longer, bad_ctx=ctx, bias_seqs=biased,
                             ngrams=ngrams.copy() if ngrams is not None and i else ngrams))
        head = seqs[0]
        head.kids = seqs[1:]
        self.scheduler.add(head)
        for seq in seqs:
            self._live[seq.id] = seq
        return [seq.id for seq in seqs]

    def _check_gates(self, gates: Sequence[bool] | None, n: int) -> None:
        g = self.method.contrast_gate
        if gates is None:
            if g is not None and not any(h.gate is not None for h in self.method.branches[g].hooks):
                raise ValueError(f"gates: method {self.method.name!r} has no gated hook to "
                                 "decide its contrast gate; give one decision per choice")
            return
        if g is None:
            raise ValueError(f"gates: method {self.method.name!r} has no contrast_gate to decide")
        if isinstance(gates, (str, bytes)) or not isinstance(gates, Sequence) \
                or len(gates) != n or not all(isinstance(x, bool) for x in gates):
            raise ValueError(f"gates: expected {n} booleans (one per choice), got {gates!r}")

    def check_params(self, params: SamplingParams) -> None:
        """Raise ``ValueError`` for parameters this model cannot honour (a token id outside
        its vocabulary in ``logit_bias``, ``allowed_token_ids``, ``bad_words_ids``; bad words
        without a tokenizer)."""
        v = self.state.vocab
        for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]),
                          ("allowed_token_ids", params.allowed_token_ids or ()),
                          ("bad_words_ids", [t for w in params.bad_words_ids for t in w]),
                          ("sequence_bias", [t for w, _ in params.sequence_bias for t in w])):
            bad = [t for t in ids if t >= v]
            if bad:
                raise ValueError(f"{name}: token id {bad[0]} is outside the model's "
                                 f"vocabulary of {v} tokens")
        if params.bad_words and self.tok is None:
            raise ValueError("bad_words: this engine has no tokenizer to tokenise them; give "
                             "bad_words_ids")

    def bad_word_ids(self, params: SamplingParams) -> list[tuple[int, ...]]:
        """``params``' banned words as token-id sequences: ``bad_words_ids`` as given, and
        each of ``bad_words`` tokenised as it is and after a space where that gives another
        first token and as many tokens (vLLM's rule: the word at the start of the text and
        inside it)."""
        out = list(params.bad_words_ids)
        v = self.state.vocab
        for word in params.bad_words:
            first = None
            for space in ("", " "):
                ids = tuple(self.tok(space + word.lstrip(), add_special_tokens=False)
                            ["input_ids"])
                if not ids:
                    continue
                if any(t >= v for t in ids):
                    raise ValueError(f"bad_words: {word!r} tokenises to ids outside the "
                                     f"model's vocabulary of {v} tokens: {list(ids)}")
                if first is None or (ids[0] != first[0] and len(ids) == len(first)):
                    out.append(ids)
                    first = first or ids
        return out

    def check_fits(self, built: Built, max_new_tokens: int, index: int = 0) -> None:
        """Raise ``ValueError`` unless the prompt + ``max_new_tokens`` fit the context."""
        context = self.runner.max_positions
        for k, (prefix, suffix) in enumerate(built):
            n = len(prefix) + len(suffix)
            if context and n + max_new_tokens > context:
                raise ContextTooLong(f"prompts[{index}]: {n} prompt tokens (branch {k}) + "
                                 f"max_new_tokens={max_new_tokens} exceeds the model's context "
                                 f"of {context} tokens")
            if n + max_new_tokens > self.max_len:
                raise ContextTooLong(f"prompts[{index}]: {n} prompt tokens (branch {k}) + "
                                 f"max_new_tokens={max_new_tokens} exceeds the engine's "
                                 f"max_len={self.max_len} (its context)")

    def _get(self, request_id: int) -> _Seq:
        seq = self._live.get(request_id) if isinstance(request_id, int) else None
        if seq is None:
            raise ValueError(f"request_id: no unfinished request {request_id!r}")
        return seq

    def abort(self, request_id: int) -> None:
        """Drop a waiting or running request (no result); its slot is free at once."""
        if isinstance(request_id, int) and request_id in self._done:
            del self._done[request_id]
            return
        self.release(request_id)

    def release(self, request_id: int) -> None:
        """Free a live sequence's slot and forget it (no result)."""
        seq = self._get(request_id)
        if seq.slot < 0:
            head = self.scheduler.remove(lambda s: s.id == request_id)
            if head is not None and head.kids:  # its choices wait on: the next one leads
                kid, rest = head.kids[0], head.kids[1:]
                kid.built, kid.kids, head.kids = head.built, rest, []
                self.scheduler.add_front(kid)
            for s in self.scheduler.waiting():
                s.kids = [k for k in s.kids if k.id != request_id]
        else:
            self.state.release(seq.slot)
            self._hand_over_turn(seq)
            if any(q is seq for q in self._prefilling):  # aborted mid-prefill: its choices
                self._prefilling = [q for q in self._prefilling if q is not seq]  # start over
                if seq.kids:
                    kid, rest = seq.kids[0], seq.kids[1:]
                    kid.built, kid.kids, seq.kids = seq.built, rest, []
                    self.scheduler.add_front(kid)
        for s in self._prefilling:
            s.kids = [k for k in s.kids if k.id != request_id]
        del self._live[request_id]

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def num_running(self) -> int:
        return sum(1 for s in self._live.values() if s.slot >= 0)

    def num_waiting(self) -> int:
        return len(self.scheduler)

    def pop_result(self, request_id: int) -> GenerationResult:
        """The result of a finished request (once)."""
        if request_id not in self._done:
            state = "still running" if request_id in self._live else "unknown"
            raise ValueError(f"request_id: no finished request {request_id!r} ({state})")
        return self._done.pop(request_id)

    # -- fork / keep / truncate ----------------------------------------------------------------
    def _running(self, request_id: int, what: str) -> _Seq:
        seq = self._get(request_id)
        if seq.slot < 0 or seq.built is not None:
            raise ValueError(f"request_id: {what} needs a running request; {request_id} has "
                             "not been prefilled yet (call step() first)")
        return seq

    def _hand_over_turn(self, seq: _Seq) -> None:
        """A fork family's kept turn goes on with another running member that has none (a
        search's candidate ending or dropped while its siblings go on)."""
        if seq.turn is None:
            return
        heir = next((s for s in self._live.values() if s.root == seq.root
                     and s is not seq and s.slot >= 0 and s.turn is None), None)
        if heir is not None:
            heir.turn = seq.turn

    def discard_turn(self, request_id: int) -> None:
        """Forget what a finished sequence kept for its chat's next turn and for requests
        starting like it (:class:`KeptTurns`): a search's losing candidate or choice that ended
        before the search chose. A no-op for a sequence that kept nothing."""
        self.kept.discard(request_id)

    def fork(self, request_id: int, n: int, seeds: Sequence[int] | None = None) -> list[int]:
        """``n`` children of a running request that share its tokens and KV so far (copied into
        their slots, no prefill). Each child draws with its own seed (``seeds`` or derived from
        the parent's); returns their ids. Needs ``n`` free slots."""
        parent = self._running(request_id, "fork")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: must be an integer >= 1, got {n!r}")
        if n > self.state.free_slots:
            raise ValueError(f"n: forking {n} children needs {n} free slots, "
                             f"{self.state.free_slots} are free (max_seqs="
                             f"{self.state.max_seqs})")
        if seeds is None:
            seeds = [(parent.seed * 1_000_003 + parent.id * 7919 + i + 1) % 2**62
                     for i in range(n)]
        elif len(seeds) != n or not all(isinstance(s, int) and not isinstance(s, bool)
                                        and 0 <= s < 2**63 for s in seeds):
            raise ValueError(f"seeds: expected {n} integers in [0, 2**63)")
        kids = []
        for s in seeds:
            kid = copy.copy(parent)
            kid.id, kid.seed, kid.slot = next(self._ids), s, self.state.acquire()
            kid.out, kid.logprobs, kid.tops = list(parent.out), list(parent.logprobs), \
                list(parent.tops)
            kid.detok = parent.detok.clone()
            kid.turn = None  # one of many continuations: the parent's is the one kept
            if parent.ngrams is not None:
                kid.ngrams = parent.ngrams.copy()
            kids.append(kid)
            self._live[kid.id] = kid
        self.state.fork(parent.slot, [c.slot for c in kids])
        self.state.seed[torch.tensor([c.slot for c in kids])] = torch.tensor(
            list(seeds), dtype=torch.long).to(self.state.device)
        return [c.id for c in kids]

    def keep(self, request_ids: Iterable[int]) -> None:
        """Keep these sequences of one fork family (a request and its forks); release the
        family's other live sequences."""
        keep = set(request_ids)
        seqs = [self._running(i, "keep") for i in keep]
        roots = {s.root for s in seqs}
        if len(roots) != 1:
            raise ValueError(f"request_ids: expected sequences of one fork family, got "
                             f"{sorted(keep)}")
        root = roots.pop()
        for s in [s for s in self._live.values() if s.root == root and s.id not in keep]:
            self.release(s.id)

    def truncate(self, request_id: int, n: int) -> None:
        """Roll a running sequence back to its first ``n >= 1`` generated tokens (its text,
        KV, step and seed stream follow)."""
        seq = self._running(request_id, "truncate")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(seq.out):
            raise ValueError(f"n: must be an integer in [1, {len(seq.out)}], got {n!r}")
        seq.out, seq.logprobs, seq.tops = seq.out[:n], seq.logprobs[:n], seq.tops[:n]
        seq.detok = self._detok(seq.params, seq.eos)
        for t in seq.out:
            seq.detok.add(t)
        self.state.truncate(seq.slot, [p + n - 1 for p in seq.prompt_len], seq.out[-1], n)
        if seq.params.adjusts_logits:
            self.state.recount(seq.slot, seq.out)
        if seq.context is not None:
            self.state.reseen(seq.slot, seq.context, seq.out)
        if seq.ngrams is not None:
            seq.ngrams = seq.ngrams.rebuilt(seq.out)

    def detokenizer(self, request_id: int) -> IncrementalDetokenizer:
        """A fresh detokeniser with a live request's stop strings and end tokens: its tokens
        fed to it stream the same text deltas as the engine's own (for a caller that decides
        later which tokens are final, as DeAL's search does)."""
        seq = self._get(request_id)
        return self._detok(seq.params, seq.eos)

    def _detok(self, params: SamplingParams, eos: frozenset[int]) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tok, stop=params.stop, skip_ids=eos,
                                      min_tokens=params.min_tokens,
                                      keep_stop=params.include_stop_str_in_output,
                                      skip_special=params.skip_special_tokens)

    def tokens(self, request_id: int) -> list[int]:
        """The tokens a live request has generated so far."""
        return list(self._get(request_id).out)

    def num_tokens(self, request_id: int) -> int:
        """How many tokens a live request has generated so far (:meth:`tokens` without the
        copy)."""
        return len(self._get(request_id).out)

    def text(self, request_id: int) -> str:
        """The text a live request has generated so far (stop strings cut, nothing held
        back)."""
        return self._get(request_id).detok.text

    def logprobs(self, request_id: int) -> list[float]:
        """The log-probabilities of a live request's tokens (its params need ``logprobs``)."""
        return list(self._get(request_id).logprobs)

    # -- the step -------------------------------------------------------------------------------
    def _check_expand(self, expand: dict[int, int], propose: tuple | None) -> int:
        extra = 0
        if propose is not None:
            ok = isinstance(propose, tuple) and len(propose) in (2, 3) and not any(
                isinstance(x, bool) or not isinstance(x, int) for x in propose[:2])
            ok = ok and 0 <= propose[0] < self.method.k and propose[1] >= 1
            if ok and len(propose) == 3:
                w = propose[2]
                ok = not isinstance(w, bool) and isinstance(w, (int, float)) and 0 < w < 1
            if not ok:
                raise ValueError(f"propose: expected (branch in [0, {self.method.k}), k >= 1"
                                 f"[, weight in (0, 1)]), got {propose!r}")
            if not expand:
                raise ValueError("propose: proposals join the candidates of expanded sequences; "
                                 "give expand={id: k} too")
            extra = propose[1]
        need = 0
        for rid, k in expand.items():
            self._get(rid)
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"expand: k must be an integer >= 1, got {k!r} for {rid}")
            need += k - 1 + extra
        if need > self.state.free_slots:
            raise ValueError(f"expand: {need} more sequences need free slots; "
                             f"{self.state.free_slots} are free (max_seqs="
                             f"{self.state.max_seqs})")
        return need

    @torch.no_grad()
    def step(self, expand: dict[int, int] | None = None,
             propose: tuple | None = None, follow: tuple | None = None,
             hold: Iterable[int] = ()) -> list[StepOutput]:
        """Admit, prefill, decode and sample once; returns this step's outputs.

        ``expand`` ({id: k}): those sequences do not sample; they take the top-``k`` tokens of
        the method's final distribution (temperature 1, ties to the lower id): the sequence
        continues with the best and ``k - 1`` forks (sharing its KV, no forward) with the
        others, reported as outputs with ``parent`` set (DeAL's candidates). Costs one more
        device-to-host read in that step. ``propose`` = ``(branch, kp[, w])``: also the
        top-``kp`` tokens of that branch's own distribution (softmax of its logits) not among
        them; every candidate's log-prob is then under the mixture ``(1 - w) p_final + w
        p_branch`` (``w`` 0.5 by default; a weight-0 branch proposes tokens the final
        distribution has masked). ``follow`` = ``(branch, ids[, w])``: those sequences (not
        expanded this step) take the greedy token of that branch's own distribution instead of
        the sampled one, its log-prob under the same mixture (DeAL's rollouts by the plain
        model). ``hold`` (ids): those running sequences sit this step out — no forward row,
        no token, their KV, position and seed stream as they were (a search waiting for its
        reward while the others decode)."""
        expand = dict(expand or {})
        sitting = self._check_hold(hold, expand) if hold else frozenset()
        if (propose is not None or follow is not None) and self.runner.drop_rows:
            raise ValueError("propose, follow: they read a branch's own logits, which a gated "
                             "method's decided sequences no longer compute; make the engine "
                             "with drop_rows=False")
        reserve = self._check_expand(expand, propose) if expand or propose is not None else 0
        if follow is not None:
            follow = self._check_follow(follow)
        running = self._running_slots(sitting)
        feeding, chunks = self._admit(reserve, running)
        parts, order, admitted, extras = self._forward(running, feeding, chunks)
        if not order:  # no token this step; a scored answer's chunk may have been fed
            fed = self._forced_scores(feeding, extras, set()) if extras else None
            if fed is not None:
                self._keep_fed(feeding, fed[0](fed[1].flatten().tolist()))
            return []
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        # the contrast gate, before DeAL's expansion reads the final distribution
        logits = self.runner.gate_contrast(self.state, tuple(order), logits)
        by_slot = {s.slot: s for s in self._live.values() if s.slot >= 0}
        seqs = [by_slot[s] for s in order]
        rows, tops, early = self._sample(seqs, order, logits, feeding, extras, admitted)
        now = time.perf_counter()
        if expand:
            rows = self._expand(rows, logits, expand, propose)
        if follow is not None:
            rows = self._follow(rows, logits, expand, *follow)
        return self._emit(rows, tops, early, now)

    def _running_slots(self, sitting: frozenset[int]) -> tuple[int, ...]:
        """Compact the decode state (moving sequences to its first slots) and return the slots
        of the running sequences that decode this step (not ``sitting`` it out)."""
        moves = self.state.compact()
        if moves:
            by_slot = {s.slot: s for s in self._live.values() if s.slot >= 0}
            for src, dst in moves:
                by_slot[src].slot = dst
        return tuple(sorted(s.slot for s in self._live.values()
                            if s.slot >= 0 and s.built is None and s.id not in sitting))

    def _admit(self, reserve: int, running: tuple[int, ...]
               ) -> tuple[list[_Seq], list[tuple[int, int]] | None]:
        """Admit waiting requests into free slots (``reserve`` kept free), set their sampling
        state, and plan what of the prompts is fed this step: ``(feeding, chunks)`` — chunks
        (per sequence, its prompt positions fed) on a packed engine, None for whole prompts."""
        st = self.state
        # packed forwards feed prompts in chunks: within max_prefill_tokens while others decode,
        # and a scored answer's positions at most forced_prefill_tokens per step
        if self.runner.can_pack:  # every request that fits takes a slot; fed within budget
            held = sum(len(s.kids) for s in self._prefilling)  # slots its choices will take
            admitted = self.scheduler.admit(st.free_slots - reserve - held,
                                            lambda s: 1 + len(s.kids))
        else:
            admitted = self.scheduler.admit(
                st.free_slots - reserve, lambda s: 1 + len(s.kids),
                lambda s: sum(len(x) for _, x in s.built),
                self.max_prefill_tokens if st.in_use() > 0 else None)
            admitted = self._defer_scored(admitted)  # scored answers fed with their prompts
        for seq in admitted:
            seq.slot = st.acquire()
            p = seq.params
            st.set_params(seq.slot, seed=seq.seed, temperature=p.temperature, top_k=p.top_k,
                          top_p=p.top_p, min_p=p.min_p)
            if p.repetition_penalty != 1.0:  # each branch's prompt ids, kept for truncate
                seq.context = [list(pre.ids) + list(suf) for pre, suf in seq.built]
            st.set_adjust(seq.slot, p.presence_penalty, p.frequency_penalty, p.logit_bias,
                          p.repetition_penalty, seq.context)
            st.set_bans(seq.slot, banned=seq.bad_one, allowed=p.allowed_token_ids,
                        ends=sorted(seq.eos), min_tokens=p.min_tokens)
        if self.runner.can_pack:
            self._prefilling += admitted
            return self._plan_chunks(self.max_prefill_tokens if running else None)
        # whole prompts (any left mid-prefill, should packing have stopped, included)
        feeding = self._prefilling + admitted
        self._feed_forced(feeding)
        return feeding, None

    def _forward(self, running: tuple[int, ...], feeding: list[_Seq],
                 chunks: list[tuple[int, int]] | None
                 ) -> tuple[list[torch.Tensor], list[int], list[_Seq], list | None]:
        """This step's forward(s): the running slots decode, ``feeding``'s prompts (or their
        chunks) are fed — in one packed forward, else a decode and a prefill. Starts the
        sequences whose prompt is done (:meth:`_start`). Returns the logits' parts, the slot
        of each of their rows, those sequences, and the fed answers' score extras."""
        st = self.state
        extra = [q.extra for q in feeding] if any(q.extra for q in feeding) else None
        parts, order = [], []
        new = tuple(s.slot for s in feeding)
        built = [s.built for s in feeding]
        mixed = extras = None
        if feeding and self.runner.can_pack:  # decode + prefill in one forward
            mixed = self.runner.packed(st, running, new, built, chunks, extra)
        if running:
            parts.append(mixed[0] if mixed is not None else self.runner.decode(st, running))
            order += list(running)
        if mixed is not None:
            prefilled, extras = mixed[1], mixed[2]
            admitted = feeding
            if chunks is not None:  # the prefill ends for those whose chunk reached the end
                for q, (_, b) in zip(feeding, chunks, strict=True):
                    q.fed = b
                admitted = [q for q, b in zip(feeding, built, strict=True)
                            if q.fed == max(self.runner.prompt_lengths(b))]
        else:  # no packing (or the first packed try failed): whole prompts, two forwards
            admitted = feeding
            prefilled = None
            if extra is not None and sum(extra) > self.forced_prefill_tokens:
                for q in feeding:  # (the first try's answers, meant for chunks: decoded)
                    if q.extra:
                        q.built, q.prompt_built, q.extra = q.prompt_built, None, 0
                built, extra = [q.built for q in feeding], None
            if feeding and extra is not None:
                prefilled, extras = self.runner.prefill(st, new, built, extra)
            elif feeding:
                prefilled = self.runner.prefill(st, new, built)
        done = {q.id for q in admitted}
        self._prefilling = [q for q in self._prefilling if q.id not in done]
        if admitted:
            self._start(admitted, prefilled, parts, order)
        return parts, order, admitted, extras

    def _start(self, admitted: list[_Seq], prefilled: torch.Tensor, parts: list,
               order: list[int]) -> None:
        """Sequences whose prompt is done: their logits join ``parts`` (their slots
        ``order``), their turn is noted for keeping, their choices fork before their first
        token, and the caller's gate decisions are set."""
        st = self.state
        parts.append(prefilled)
        order += [q.slot for q in admitted]
        pick = []  # choices forked after the prefill, before their first token
        forced = [q for s in admitted for q in (s, *s.kids) if q.gate is not None]
        for i, s in enumerate(admitted):
            s.turn = self.kept.plan(s.prompt_built or s.built)
            s.built = s.prompt_built = None
            if s.kids:
                for kid in s.kids:  # each choice an answer to keep as the next turn's
                    kid.slot, kid.context, kid.turn = st.acquire(), s.context, s.turn
                st.fork(s.slot, [kid.slot for kid in s.kids])
                st.seed[torch.tensor([kid.slot for kid in s.kids])] = torch.tensor(
                    [kid.seed for kid in s.kids], dtype=torch.long).to(st.device)
                order += [kid.slot for kid in s.kids]
                pick += [i] * len(s.kids)
                s.kids = []
        if pick:
            parts.append(prefilled[torch.tensor(pick, device=prefilled.device)])
        if forced:  # the caller's gate decisions replace the hook's (or stand alone)
            g, k = self.method.contrast_gate, self.method.k
            st.gate_on[torch.tensor([q.slot * k + g for q in forced], device=st.device)] = \
                torch.tensor([q.gate for q in forced], device=st.device)
            for q in forced:
                st.host_gate[q.slot] = q.gate

    def _sample(self, seqs: list[_Seq], order: list[int], logits: torch.Tensor,
                feeding: list[_Seq], extras: list | None, admitted: list[_Seq]
                ) -> tuple[list, dict, dict]:
        """Sample every row and read the results in the step's one device-to-host transfer
        (the fed answers' scores and the gates with them). Returns the rows ``(seq, status,
        token, log-prob, parent)``, the top log-probs by sequence id, and the fed answer
        tokens' ``(token, log-prob, best)`` by sequence id."""
        st = self.state
        want_lp = any(s.params.logprobs for s in seqs)
        top = max(s.params.top_logprobs for s in seqs)
        forced = None
        if any(s.forced for s in seqs):
            forced = torch.tensor([s.forced[len(s.out) + s.extra] if s.forced else -1
                                   for s in seqs],
                                  dtype=torch.long).to(st.device)
        fed = self._forced_scores(feeding, extras, {q.id for q in admitted}) if extras else None
        packed = self.runner.sample(st, tuple(order), logits, want_lp, top, forced,
                                    *self._word_bans(seqs))
        early = {}  # per sequence id: its fed answer tokens' (token, log-prob, best)
        if fed is None:
            vals = packed.tolist()  # the step's one device-to-host transfer
        else:  # the fed answers' scores ride in the same transfer
            read, scores = fed
            flat = torch.cat([packed.flatten(), scores.flatten()]).tolist()
            cut = packed.numel()
            vals = [flat[i:i + packed.shape[1]] for i in range(0, cut, packed.shape[1])]
            early = read(flat[cut:])
            self._keep_fed(feeding, early)
        self.steps += 1
        if self.runner.drop_rows:  # the gates, read with the tokens: no read of their own
            gate = st.host_gate
            for s, on in zip(order, vals[-1], strict=True):
                if gate[s] is None:
                    gate[s] = bool(on)
        rows = [(seq, int(vals[1][j]), int(vals[0][j]), vals[2][j] if want_lp else None, None)
                for j, seq in enumerate(seqs)]
        tops = {}
        if top:  # the rows after the log-probs: `top` of ids, then `top` of log-probs
            base = 3 if want_lp else 2
            for j, seq in enumerate(seqs):
                if n := seq.params.top_logprobs:
                    tops[seq.id] = [(int(vals[base + i][j]), vals[base + top + i][j])
                                    for i in range(n)
                                    if vals[base + top + i][j] != float("-inf")]
        return rows, tops, early

    def _emit(self, rows: list, tops: dict, early: dict, now: float) -> list[StepOutput]:
        """Append each row's token (after its fed answer's, where it has one) to its
        sequence, detokenise, finish what ended (at ``now``); returns the step's outputs."""
        outs = []
        for seq, status, t, lp, parent in rows:
            if not seq.out:
                seq.t_first = now
            if seq.scored:  # fed with its prompt in chunks, scored there
                early[seq.id], seq.scored = [*seq.scored, *early.get(seq.id, ())], []
            for t0, lp0, best0 in early.get(seq.id, ()):  # fed with its prompt, scored there
                seq.out.append(t0)
                if seq.params.logprobs:
                    seq.logprobs.append(lp0)
                if best0 is not None:
                    seq.tops.append(best0)
                delta, _ = self._advance_text(seq, t0)
                outs.append(StepOutput(seq.id, delta, t0, None,
                                       lp0 if seq.params.logprobs else None, None, best0))
            if status:
                seq.error = f"request {seq.id}: {STATUS_MESSAGES.get(status, status)}"
                self._finish(seq, "error", now)
                outs.append(StepOutput(seq.id, seq.detok.flush(), -1, "error"))
                continue
            seq.out.append(t)
            if seq.ngrams is not None:
                seq.ngrams.add(t)
            if seq.params.logprobs:
                seq.logprobs.append(lp)
            best = tops.get(seq.id) if parent is None else None
            if best is not None:
                seq.tops.append(best)
            delta, reason = self._advance_text(seq, t)
            if reason:
                self._finish(seq, reason, now)
            outs.append(StepOutput(seq.id, delta, t, reason,
                                   lp if seq.params.logprobs else None, parent, best))
        return outs

    @staticmethod
    def _scores_early(s: _Seq) -> bool:
        """Whether scored sequence ``s`` may have its given tokens fed with its prompt: no
        penalties, logit bias, bans or forked choices (their state follows decoded tokens)."""
        p = s.params
        return bool(s.forced) and len(s.forced) > 1 and not s.out and not s.kids \
            and s.gate is None and s.ngrams is None and not s.bad_seqs and not s.bad_one \
            and not s.bias_seqs \
            and p.presence_penalty == 0 and p.frequency_penalty == 0 \
            and p.repetition_penalty == 1.0 and not p.logit_bias \
            and p.allowed_token_ids is None and not p.min_tokens

    def _defer_scored(self, admitted: list[_Seq]) -> list[_Seq]:
        """``admitted`` up to the first scored sequence whose given tokens would pass
        :attr:`forced_prefill_tokens` for this step (the first sequence always stays); the
        rest go back to the head of the queue, in order, to be fed whole in a later step
        rather than decoded one token per step."""
        budget = self.forced_prefill_tokens
        if not budget or not self.runner.scores_in_prefill:
            return admitted
        spent = 0
        for i, s in enumerate(admitted):
            spent += len(s.forced) - 1 if self._scores_early(s) else 0
            if i and spent > budget:
                for q in reversed(admitted[i:]):
                    self.scheduler.add_front(q)
                return admitted[:i]
        return admitted

    def _feed_forced(self, feeding: list[_Seq]) -> None:
        """Append the given tokens of the scored sequences among ``feeding``, whose prompts
        are fed whole this step (all but the last token, at most
        :attr:`forced_prefill_tokens` in all), to their prompts (``_Seq.extra``), so that one
        forward scores them instead of one decode step each. Only where a prefill and decode
        steps give the same distributions: no penalties, bans or logit bias (their state
        follows the decoded tokens), no forked choices, :attr:`ModelStep.scores_in_prefill`."""
        budget = self.forced_prefill_tokens
        if not budget or not self.runner.scores_in_prefill:
            return
        # the two-forward prefill keeps as many positions of every row as its longest needs
        most = budget if self.runner.can_pack else max(1, budget // max(1, len(feeding)))
        for s in feeding:
            if budget <= 0:
                break
            budget -= self._extend_forced(s, min(budget, most))

    @staticmethod
    def _keep_fed(feeding: list[_Seq], early: dict) -> None:
        """Move the fed answer scores of the sequences still mid-prefill out of ``early``
        onto them (``_Seq.scored``), to be reported with the rest once they are done."""
        for q in feeding:
            if q.id in early and q.extra:
                q.scored += early.pop(q.id)

    def _forced_scores(self, feeding: list[_Seq], extras: list, done: set[int]
                       ) -> tuple[Callable[[list[float]], dict], torch.Tensor] | None:
        """The scores of the given tokens just fed with their sequences' prompts (in order: a
        prompt fed in chunks brings the next ones with each chunk), from the prefill's logits,
        on the device (:meth:`ModelStep.forced_scores`), and a function that reads them back
        once transferred (flat): per sequence id, (token, log-prob, best alternatives or None)
        of each. The sequences' step counts are advanced; those in ``done`` (prefilled) are
        through with their fed tokens."""
        st = self.state
        seqs = [s for s, x in zip(feeding, extras, strict=True) if x is not None]
        if not seqs:
            return None
        logits = [x for x in extras if x is not None]
        top = max(s.params.top_logprobs for s in seqs)
        tokens = [s.forced[len(s.scored):len(s.scored) + len(x)]
                  for s, x in zip(seqs, logits, strict=True)]
        scores = self.runner.forced_scores(st, tuple(s.slot for s in seqs), logits, tokens, top)
        slots = torch.tensor([s.slot for s in seqs], device=st.device)
        st.step.index_add_(0, slots, torch.tensor([len(t) for t in tokens], device=st.device))
        for s in feeding:
            if s.id in done:
                s.extra = 0
        width = scores.shape[1]

        def read(flat: list[float]) -> dict[int, list[tuple[int, float, list | None]]]:
            vals = [flat[i:i + width] for i in range(0, len(flat), width)]
            out, at = {}, 0
            for s, ts in zip(seqs, tokens, strict=True):
                n, rows = s.params.top_logprobs, []
                for j, t in enumerate(ts):
                    best = None
                    if n:
                        best = [(int(vals[1 + i][at + j]), vals[1 + top + i][at + j])
                                for i in range(n) if vals[1 + top + i][at + j] != float("-inf")]
                    rows.append((t, vals[0][at + j], best))
                out[s.id], at = rows, at + len(ts)
            return out
        return read, scores

    @staticmethod
    def _word_bans(seqs: list[_Seq]) -> tuple[tuple | None, tuple | None]:
        """This step's bans ``(rows, tokens)`` — the sequences' longer bad words (a word's last
        token where the context ends in the tokens before it) and repeated n-grams — and
        biases ``(rows, tokens, values)`` — their sequence biases (the last token where the
        context ends in the tokens before it; a one-token sequence always); None where none."""
        rows, toks, b_rows, b_toks, b_vals = [], [], [], [], []

        def ends_in(seq: _Seq, head: list[int]) -> bool:
            n = len(head)
            if not n:
                return True
            tail = seq.out[-n:] if len(seq.out) >= n else (seq.bad_ctx + seq.out)[-n:]
            return tail == head

        for j, seq in enumerate(seqs):
            if seq.ngrams is not None:
                banned = seq.ngrams.banned()
                rows += [j] * len(banned)
                toks += sorted(banned)
            for head, last in seq.bad_seqs:
                if ends_in(seq, head):
                    rows.append(j)
                    toks.append(last)
            for head, last, value in seq.bias_seqs:
                if ends_in(seq, head):
                    b_rows.append(j)
                    b_toks.append(last)
                    b_vals.append(value)
        return (rows, toks) if rows else None, (b_rows, b_toks, b_vals) if b_rows else None

    def _plan_chunks(self, budget: int | None) -> tuple[list[_Seq], list[tuple[int, int]]]:
        """The sequences whose prompts are fed this step and their chunks ``(a, b)`` on the
        longest row (see :meth:`ModelStep.packed`): oldest first, at most ``budget`` tokens
        over all rows (None: every prompt to its end); the oldest gets at least one token.
        Under a budget, a sequence's prefixes that are not stored are computed first, within
        the budget and over as many steps as it takes (``ModelStep.advance_prefix``: a long
        history or common start is no single long stall for the sequences decoding); a scored
        sequence's given answer is appended to its prompt and fed in its chunks (scored from
        their logits: at most :attr:`forced_prefill_tokens` answer positions per step)."""
        feeding, chunks = [], []
        forced_left = self.forced_prefill_tokens \
            if self.forced_prefill_tokens and self.runner.scores_in_prefill else None
        for q in self._prefilling:
            if budget is not None and q.fed == 0:
                for k, prefix in self.runner.prefix_missing(q.built):
                    if budget <= 0:
                        break
                    budget -= self.runner.advance_prefix(k, prefix, budget)
                if self.runner.prefix_missing(q.built):
                    break  # its prefixes are not all computed yet: it and those after wait
            if q.fed == 0 and forced_left is not None and q.forced:
                self._extend_forced(q, len(q.forced))  # its whole answer, fed in chunks
            lens = self.runner.prompt_lengths(q.built)
            end = max(lens)
            if budget is None:
                b = end
            elif budget <= 0:
                break
            else:
                b = min(end, q.fed + max(1, budget // len(lens)))
            if q.extra and forced_left is not None:  # at most forced_left answer positions
                scored = answer_positions(q.fed, b, end, q.extra)
                if len(scored) > forced_left:
                    b = scored.start + forced_left
                    if b <= q.fed:
                        break
                    scored = answer_positions(q.fed, b, end, q.extra)
                forced_left -= len(scored)
            if budget is not None:
                budget -= sum(max(0, b - end + n) - max(0, q.fed - end + n) for n in lens)
            feeding.append(q)
            chunks.append((q.fed, b))
        return feeding, chunks

    def _extend_forced(self, q: _Seq, room: int) -> int:
        """Append up to ``room`` of scored sequence ``q``'s given tokens (all but the last) to
        its prompt (``_Seq.extra``), where they may be fed with it (:meth:`_scores_early`, and
        no penalty or ban state on its slot); returns how many (0: none)."""
        st = self.state
        if room <= 0 or q.extra or not self._scores_early(q) or st.adjusted[q.slot] \
                or st.banning[q.slot]:
            return 0
        e = min(len(q.forced) - 1, room)
        q.prompt_built = q.built
        q.built = [(pre, [*suf, *q.forced[:e]]) for pre, suf in q.built]
        q.extra = e
        return e

    def _expand(self, rows: list, logits: torch.Tensor, expand: dict[int, int],
                propose: tuple | None = None) -> list:
        """Replace the sampled token of each expanded sequence by its top-k candidates (the
        first for the sequence itself, the others for forks); see :meth:`step`."""
        from safedecode.ops import contrastive_logprobs

        picked = [j for j, (seq, status, *_) in enumerate(rows)
                  if seq.id in expand and not status]
        if not picked:
            return rows
        m, st = self.method, self.state
        z = logits[picked]
        lp = contrastive_logprobs(z.permute(1, 0, 2), self.runner.weights,
                                  rule=m.rule, anchor=m.anchor, beta=m.beta, temperature=1.0,
                                  backend=self.runner.backend, check_inputs=False)
        kmax = max(expand[rows[j][0].id] for j in picked)
        top_lp, top_tok = torch.sort(lp, dim=-1, descending=True, stable=True)
        tok, tok_lp = top_tok[:, :kmax], top_lp[:, :kmax]
        if propose is not None:
            q = torch.log_softmax(z[:, propose[0]].float(), dim=-1)
            q_tok = torch.sort(q, dim=-1, descending=True, stable=True).indices
            tok = torch.cat([tok, q_tok[:, :propose[1]]], dim=1)
            w = propose[2] if len(propose) == 3 else 0.5
            tok_lp = mixture_logprob(lp.gather(1, tok), q.gather(1, tok), w)
        host = torch.stack([tok.double(), tok_lp.double(),
                            lp.gather(1, tok).double()]).tolist()
        out = list(rows)
        for n, j in enumerate(picked):
            seq = rows[j][0]
            base = [(int(t), lp_) for t, lp_, b in zip(host[0][n][:kmax], host[1][n][:kmax],
                                                       host[2][n][:kmax], strict=True)
                    if b != float("-inf")][:expand[seq.id]]
            seen = {t for t, _ in base}
            extra = []
            for t, lp_ in zip(host[0][n][kmax:], host[1][n][kmax:], strict=True):
                if int(t) not in seen and lp_ != float("-inf"):
                    seen.add(int(t))
                    extra.append((int(t), lp_))
            cands = base + extra
            kids = []
            for i, (t, lp_) in enumerate(cands[1:], start=1):
                kid = copy.copy(seq)
                kid.id, kid.slot = next(self._ids), st.acquire()
                kid.seed = (seq.seed + i) % 2**62
                kid.out, kid.logprobs, kid.tops = list(seq.out), list(seq.logprobs), \
                    list(seq.tops)
                kid.detok = seq.detok.clone()
                if seq.ngrams is not None:
                    kid.ngrams = seq.ngrams.copy()
                self._live[kid.id] = kid
                kids.append((kid, t, lp_))
            if kids:
                st.fork(seq.slot, [k.slot for k, _, _ in kids])
                slots = torch.tensor([k.slot for k, _, _ in kids], device=st.device)
                st.seed[slots] = torch.tensor([k.seed for k, _, _ in kids],
                                              dtype=torch.long).to(st.device)
                st.last[slots] = torch.tensor([t for _, t, _ in kids],
                                              dtype=torch.long).to(st.device)
            st.last[seq.slot] = cands[0][0]
            out[j] = (seq, 0, cands[0][0], cands[0][1], None)
            out += [(kid, 0, tok, lp_, seq.id) for kid, tok, lp_ in kids]
        return out

    def _check_hold(self, hold: Iterable[int], expand: dict[int, int]) -> frozenset[int]:
        if isinstance(hold, (str, bytes)) or not hasattr(hold, "__iter__"):
            raise ValueError(f"hold: expected sequence ids, got {hold!r}")
        held = frozenset(hold)
        for rid in held:
            if isinstance(rid, bool) or not isinstance(rid, int):
                raise ValueError(f"hold: expected sequence ids, got {rid!r}")
            self._running(rid, "hold")
            if rid in expand:
                raise ValueError(f"hold: sequence {rid} is also expanded this step")
        return held

    def _check_follow(self, follow: tuple) -> tuple[int, frozenset[int], float]:
        ok = isinstance(follow, tuple) and len(follow) in (2, 3)
        if ok:
            b, ids, w = (*follow, 0.5)[:3]
            ok = not isinstance(b, bool) and isinstance(b, int) and 0 <= b < self.method.k
            ok = ok and not isinstance(ids, (str, bytes)) and hasattr(ids, "__iter__")
            ok = ok and not isinstance(w, bool) and isinstance(w, (int, float)) and 0 < w < 1
        if ok:
            ids = frozenset(ids)
            ok = all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        if not ok:
            raise ValueError(f"follow: expected (branch in [0, {self.method.k}), sequence ids"
                             f"[, weight in (0, 1)]), got {follow!r}")
        for i in ids:
            self._get(i)
        return b, ids, float(w)

    def _follow(self, rows: list, logits: torch.Tensor, expand: dict[int, int], branch: int,
                ids: frozenset[int], w: float) -> list:
        """Replace the sampled token of each followed sequence by the greedy token of
        ``branch``'s own distribution (log-prob under the mixture); see :meth:`step`."""
        from safedecode.ops import contrastive_logprobs

        picked = [j for j, (seq, status, *_) in enumerate(rows)
                  if seq.id in ids and seq.id not in expand and not status]
        if not picked:
            return rows
        m, st = self.method, self.state
        z = logits[picked]
        q = torch.log_softmax(z[:, branch].float(), dim=-1)
        tok = q.argmax(dim=-1, keepdim=True)  # ties: the lowest id, as the sort's first
        lp = contrastive_logprobs(z.permute(1, 0, 2), self.runner.weights,
                                  rule=m.rule, anchor=m.anchor, beta=m.beta, temperature=1.0,
                                  backend=self.runner.backend, check_inputs=False)
        tok_lp = mixture_logprob(lp.gather(1, tok), q.gather(1, tok), w)
        slots = torch.tensor([rows[j][0].slot for j in picked], device=st.device)
        st.last[slots] = tok[:, 0].to(st.last.dtype)
        host = torch.stack([tok[:, 0].double(), tok_lp[:, 0].double()]).tolist()
        out = list(rows)
        for n, j in enumerate(picked):
            seq, _, _, lp_, parent = rows[j]
            out[j] = (seq, 0, int(host[0][n]), host[1][n] if lp_ is not None else None, parent)
        return out

    def _advance_text(self, seq: _Seq, token: int) -> tuple[str, str | None]:
        """Feed the new token to the detokeniser; returns (delta, finish reason)."""
        if token in seq.eos:
            return seq.detok.flush(), "eos" if token in self.true_eos else "stop"
        delta = seq.detok.add(token)
        reason = "stop" if seq.detok.stopped else (
            "length" if len(seq.out) >= seq.params.max_new_tokens else None)
        if reason is not None:
            delta += seq.detok.flush()
        return delta, reason

    def _finish(self, seq: _Seq, reason: str, now: float) -> None:
        seq.finish, seq.t_done = reason, now
        if seq.turn is not None and seq.out:
            # alone: no other member of its fork family waits or runs
            self.kept.keep(seq.id, seq.turn, seq.out, seq.slot, alone=not any(
                s.root == seq.root and s is not seq for s in self._live.values()))
        self.state.release(seq.slot)
        self._hand_over_turn(seq)
        del self._live[seq.id]
        decode_s = seq.t_done - seq.t_first
        n = len(seq.out)
        self._done[seq.id] = GenerationResult(
            text=seq.detok.text, token_ids=seq.out, finish_reason=reason,
            prompt_tokens=seq.prompt_len, logprobs=seq.logprobs if seq.params.logprobs else None,
            top_logprobs=seq.tops if seq.params.top_logprobs else None,
            timing={"prefill_s": seq.t_first - seq.t_add, "decode_s": decode_s,
                    "total_s": seq.t_done - seq.t_add, "new_tokens": n,
                    "tokens_per_s": n / decode_s if decode_s > 0 else float("inf")},
            error=seq.error)
