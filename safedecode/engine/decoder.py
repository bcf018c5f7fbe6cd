"""``SafeDecoder``: batch generation and streaming as thin loops over the request-level
:class:`~.engine.Engine` (K branches x B requests in one forward pass per step over one KV
cache; branch prefixes computed once and shared by every request and call)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .branches import Branch, Method
from .cache import PREFIX_STORE_BYTES, TURN_STORE_BYTES, PrefixStore
from .engine import Engine, GenerationResult, check_method_fits, output_vocab
from .prompts import (
    Prefix,
    Prompt,
    PromptBuilder,
    TokenRuns,
    is_token_ids,
    request_text,
    token_requests,
)
from .sampling import SamplingParams
from .search import Search
from .state import round_up
from .step import CompiledDecode

__all__ = ["SafeDecoder", "GenerationResult", "StreamEvent", "TokenPrompts"]


@dataclass
class StreamEvent:
    """A text delta of one request (``finish_reason`` set on its last event)."""

    index: int
    text: str
    token_id: int | None
    finish_reason: str | None = None


@dataclass
class TokenPrompts:
    """Already-rendered prompts: ``ids[k][b]`` is request b's token ids under branch k (used by
    :func:`safedecode.custom_generate`): no branch prefix is split off, but the leading tokens
    two requests of a call have in common under a branch are shared (``TokenRuns``)."""

    ids: list[list[list[int]]]

    @property
    def batch(self) -> int:
        return len(self.ids[0])

    def built(self, branches: Sequence[Branch]) -> list[list[tuple[Prefix, list[int]]]]:
        """``[request][branch] -> (the branch's empty prefix, ids)``."""
        return token_requests(branches, self.ids)


def _check_max_batch(max_batch, on_result) -> int | None:
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int)
                                  or max_batch < 1):
        raise ValueError(f"max_batch: must be an integer >= 1 or None, got {max_batch!r}")
    if on_result is not None and not callable(on_result):
        raise ValueError(f"on_result: expected a callable (i, result), got "
                         f"{type(on_result).__name__}")
    return max_batch


class SafeDecoder:
    """Generate with a :class:`Method` on a Hugging Face causal LM.

    ``prefix_cache=False`` prefills every row's whole prompt (for comparison);
    ``small_gemm=False`` leaves a CPU fp32 model's linear layers on torch's GEMM instead of
    safedecode's small-M GEMM for forwards of <= 64 rows (see :mod:`safedecode.ops.linear`).
    ``compile=True`` runs decode steps under ``torch.compile`` (static shapes; the first call
    of each batch shape compiles: minutes on a CPU). ``drop_rows=False`` decodes every branch
    row of a gated method's decided sequences too (see :class:`Engine`; for comparison). For
    requests that arrive and leave while others run, use :meth:`engine`. ``method`` may be a
    :class:`~safedecode.methods.DeAL` search or a :class:`~safedecode.methods.Route`:
    ``generate`` then runs it over the engine (``on_step`` reports progress).
    ``prefix_store_bytes``: the most prefix KV kept across calls (the least recently used
    branch prefix dropped first; see :class:`~safedecode.engine.cache.PrefixStore`).
    ``turn_store_bytes``: the most KV of finished requests kept (prompt and answer; a chat
    that grows extends it, a request that starts like one shares its start; 0: none kept).
    """

    def __init__(self, model, tokenizer, method: Method, *, backend: str = "auto",
                 prefix_cache: bool = True, small_gemm: bool = True,
                 compile: bool = False, drop_rows: bool = True,  # noqa: A002
                 prefix_store_bytes: int = PREFIX_STORE_BYTES,
                 turn_store_bytes: int = TURN_STORE_BYTES) -> None:
        self.search = None
        if isinstance(method, Search):  # a search around a base method (DeAL, route)
            self.search, method = method, method.engine_method
            param = next(model.parameters(), None)
            to = getattr(self.search.reward, "to", None)
            if param is not None and to is not None:  # its reward next to the policy (a GPU)
                to(param.device)
        check_method_fits(model, method)
        self.compiled = CompiledDecode(model, method, small_gemm) if compile else None
        self.model, self.tok, self.method = model, tokenizer, method
        self.backend, self.prefix_cache, self.small_gemm = backend, prefix_cache, small_gemm
        self.drop_rows = drop_rows
        self.builder = PromptBuilder(tokenizer) if tokenizer is not None else None
        # requests' common leading tokens (a rendered prompt's too: TokenPrompts)
        self.runs = self.builder.runs if self.builder is not None else TokenRuns()
        self.prefixes = PrefixStore(prefix_store_bytes)
        self.turns = PrefixStore(turn_store_bytes)

    def engine(self, *, max_seqs: int = 8, max_len: int | None = None,
               max_queue: int = 1024, max_prefill_tokens: int | None = None,
               packed: bool = True, drop_rows: bool | None = None) -> Engine:
        """A request-level :class:`Engine` on this decoder's model, method and prefix store."""
        return Engine(self.model, self.tok, self.method, max_seqs=max_seqs, max_len=max_len,
                      max_queue=max_queue, backend=self.backend, prefix_cache=self.prefix_cache,
                      small_gemm=self.small_gemm, prefixes=self.prefixes, builder=self.builder,
                      runs=self.runs, turns=self.turns,
                      compiled=self.compiled, max_prefill_tokens=max_prefill_tokens,
                      packed=packed,
                      drop_rows=self.drop_rows if drop_rows is None else drop_rows)

    # -- public API ------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt] | TokenPrompts, *,
                 streamer=None, raw: bool = False, max_batch: int | None = None,
                 on_result: Callable[[int, GenerationResult], None] | None = None,
                 **params) -> list[GenerationResult]:
        """Generate for each prompt (a string or chat messages); returns one result each.

        Keywords are :class:`SamplingParams` fields (``max_new_tokens``, ``temperature``,
        ``top_k``, ``top_p``, ``min_p``, ``ignore_eos``, ``top_logprobs``, the penalties,
        ``logit_bias``, the token bans ``min_tokens``, ``bad_words``, ``bad_words_ids``,
        ``allowed_token_ids``, ``no_repeat_ngram_size``, and ``include_stop_str_in_output``,
        ``skip_special_tokens``), plus ``stop`` (strings or token ids that end a request
        besides EOS),
        ``seed`` (one int for all requests, one per request, or None), ``return_logprobs``;
        ``streamer``: a transformers streamer (``put``/``end``) for a
        single prompt; ``raw``: string prompts continued as they are (no chat template), or
        token-id prompts (after each branch's own system text).
        ``max_batch``: at most this many requests decode at once, the others joining as earlier
        ones finish (continuous batching; default: all at once); ``on_result(i, result)``:
        called as each request finishes (so a long call's work is kept as it goes).
        """
        max_batch = _check_max_batch(max_batch, on_result)
        if self.search is not None:
            return self._search(prompts, params, streamer, raw, max_batch, on_result)
        results: dict[int, GenerationResult] = {}
        for _ in self._run(prompts, params, streamer, results, raw, max_batch, on_result):
            pass
        bad = [r for r in results.values() if r.error]
        if bad:
            raise ValueError(bad[0].error)
        return [results[i] for i in range(len(results))]

    def score(self, prompts: Prompt | Sequence[Prompt],
              continuations: str | Sequence[int] | Sequence[str | Sequence[int]], *,
              raw: bool = False, max_batch: int = 16, **params) -> list[GenerationResult]:
        """The log-probabilities of given answers under this method, token by token: each
        prompt's continuation (a string, tokenised without special tokens, or token ids) is
        fed as if decoded — the same branches, prompts, hooks and adapters as
        :meth:`generate`; in one forward with the prompt where that gives the same
        (:meth:`Engine.add_scored`) — and each result's ``logprobs`` are its tokens'
        log-probs under the final distribution (``-inf`` where the plausibility mask or top-k
        / top-p excludes one); their sum is the answer's log-likelihood under the method.
        Keywords: the distribution's :class:`SamplingParams` knobs (``temperature``,
        penalties, ``top_logprobs`` to see what it preferred). ``max_batch``: requests scored
        at once."""
        if self.search is not None:
            raise ValueError("score: not supported by a search method (deal, route: they "
                             "choose among answers rather than draw from one distribution)")
        if self.tok is None:
            raise ValueError("score: this decoder has no tokenizer (make it with "
                             "SafeDecoder(model, tokenizer, method))")
        single = isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and bool(prompts) and isinstance(prompts[0], dict))
        plist = [prompts] if single else list(prompts)
        if single:
            continuations = [continuations]
        elif isinstance(continuations, str):
            raise ValueError("continuations: give one per prompt (a list)")
        if len(continuations) != len(plist):
            raise ValueError(f"continuations: expected {len(plist)} (one per prompt), got "
                             f"{len(continuations)}")
        ids = [self.tok(c, add_special_tokens=False)["input_ids"] if isinstance(c, str)
               else list(c) for c in continuations]
        base = SamplingParams.from_kwargs(**{"return_logprobs": True, **params})
        eng = self.engine(max_seqs=max(1, min(max_batch, len(plist))))
        built = eng.build_many(plist, raw=raw)  # what the prompts share, shared from the first
        rids: list[int | None] = [None] * len(plist)
        done: dict[int, GenerationResult] = {}
        nxt = 0
        while nxt < len(plist) or eng.has_unfinished():
            while nxt < len(plist) and eng.state.free_slots - eng.num_waiting() > 0:
                rids[nxt] = eng.add_scored_built(built[nxt], ids[nxt], base)
                nxt += 1
            for out in eng.step():
                if out.finish_reason:
                    done[out.request_id] = eng.pop_result(out.request_id)
        results = [done[r] for r in rids]
        bad = [r for r in results if r.error]
        if bad:
            raise ValueError(bad[0].error)
        return results

    def stream(self, prompts: Prompt | Sequence[Prompt], *, raw: bool = False,
               max_batch: int | None = None, **params) -> Iterator[StreamEvent]:
        """Like :meth:`generate`, but yields text deltas as they are decoded (a ``route``
        request's once the reward has chosen its answer; a ``deal`` request's as its search
        commits them, and as decoded past its horizon)."""
        max_batch = _check_max_batch(max_batch, None)
        if self.search is None:
            yield from self._run(prompts, params, None, {}, raw, max_batch)
            return
        for i, token, text, result in self._search_stream(prompts, params, None, raw,
                                                          max_batch):
            yield StreamEvent(i, text, token, result and result.finish_reason)

    def _search_stream(self, prompts, params: dict, streamer, raw: bool,
                       max_batch: int | None
                       ) -> Iterator[tuple[int, int | None, str, GenerationResult | None]]:
        """A search's ``(i, token_id, text, result)`` events (``result`` on request ``i``'s
        last)."""
        eng, built, texts, per_request, on_step = self._search_setup(prompts, params, streamer,
                                                                     raw, max_batch)
        yield from self.search.events(eng, built, texts, per_request, on_step)

    def _search_setup(self, prompts, params: dict, streamer, raw: bool,
                      max_batch: int | None = None):
        """A search's engine and inputs: (engine, built prompts, the texts its reward scores,
        params per request, on_step)."""
        name = self.search.name
        params = dict(params)
        on_step = params.pop("on_step", None)
        if streamer is not None:
            raise ValueError(f"streamer: a {name} search commits tokens only after its "
                             "lookahead")
        if isinstance(prompts, TokenPrompts):
            raise ValueError(f"prompts: {name} scores text; give string or chat prompts")
        built, per_request = self._requests(prompts, params, raw)
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        texts = [request_text(p) for p in prompts]
        need = max(len(p) + len(s) for req in built for p, s in req) \
            + per_request[0].max_new_tokens
        context = getattr(self.model.config, "max_position_embeddings", None)
        at_once = min(len(built), max_batch or len(built))
        eng = self.engine(max_seqs=at_once * self.search.sequences_per_request,
                          max_len=max(2, min(need, context or need)),
                          drop_rows=self.drop_rows and self.search.drop_rows)
        return eng, built, texts, per_request, on_step

    def _search(self, prompts, params: dict, streamer, raw: bool, max_batch: int | None,
                on_result) -> list[GenerationResult]:
        t0 = time.perf_counter()
        got: dict[int, GenerationResult] = {}
        for i, _, _, result in self._search_stream(prompts, params, streamer, raw, max_batch):
            if result is not None:
                got[i] = result
                if on_result is not None:
                    on_result(i, result)
        results = [got[i] for i in range(len(got))]
        for r in results:
            r.timing["call_s"] = time.perf_counter() - t0
        bad = [r for r in results if r.error]
        if bad:
            raise ValueError(bad[0].error)
        return results

    # -- the loop ----------------------------------------------------------------------------
    def _requests(self, prompts, params: dict, raw: bool = False):
        """Validate everything before any forward pass: (built prompts, params per request)."""
        if isinstance(prompts, TokenPrompts):
            built = prompts.built(self.method.branches)
            if self.prefix_cache:
                built = self.runs.share(self.method.branches, built)
        else:
            if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                            and isinstance(prompts[0], dict)) \
                    or (raw and is_token_ids(prompts)):
                prompts = [prompts]
            if not isinstance(prompts, Sequence) or len(prompts) == 0:
                raise ValueError("prompts: expected a prompt or a non-empty list of prompts")
            vocab = output_vocab(self.model)
            if self.builder is None:
                raise ValueError("prompts: this decoder has no tokenizer: give TokenPrompts, or "
                                 "make it with SafeDecoder(model, tokenizer, method)")
            built = self.builder.build_requests(self.method.branches, prompts, raw=raw,
                                                vocab=vocab)
        b = len(built)
        params = dict(params)
        seed = params.pop("seed", None)
        if seed is None:
            seeds = torch.randint(0, 2**62, (b,)).tolist()
        elif isinstance(seed, int) and not isinstance(seed, bool):
            seeds = [seed] * b
        elif isinstance(seed, Sequence) and len(seed) == b and all(
                isinstance(s, int) and not isinstance(s, bool) for s in seed):
            seeds = list(seed)
        else:
            raise ValueError(f"seed: expected an int, None or {b} ints (one per prompt)")
        base = SamplingParams.from_kwargs(**params)
        return built, [base.with_seed(s) for s in seeds]

    def _run(self, prompts, params: dict, streamer, results: dict, raw: bool = False,
             max_batch: int | None = None, on_result=None) -> Iterator[StreamEvent]:
        built, per_request = self._requests(prompts, params, raw)
        b = len(built)
        if streamer is not None and b != 1:
            raise ValueError("streamer: transformers streamers take a single prompt (B=1)")
        need = max(len(p) + len(s) for req in built for p, s in req) \
            + per_request[0].max_new_tokens
        context = getattr(self.model.config, "max_position_embeddings", None)
        if self.compiled is not None:  # fewer distinct shapes: fewer compilations
            need = round_up(need, 256)
        eng = self.engine(max_seqs=min(b, max_batch or b),
                          max_len=max(2, min(need, context or need)))
        ids = [eng.add_built(req, sp, index=i)[0] for i, (req, sp) in enumerate(
            zip(built, per_request, strict=True))]
        index = {rid: i for i, rid in enumerate(ids)}
        if streamer is not None:
            p, s = built[0][self.method.anchor]
            streamer.put(torch.tensor([p.ids + list(p.tail_ids) + s]))
        t0 = time.perf_counter()
        while eng.has_unfinished():
            for out in eng.step():
                if streamer is not None and out.token_id >= 0:
                    streamer.put(torch.tensor([out.token_id]))
                if out.finish_reason:
                    i = index[out.request_id]
                    results[i] = eng.pop_result(out.request_id)
                    if on_result is not None:
                        on_result(i, results[i])
                yield StreamEvent(index[out.request_id], out.text, out.token_id,
                                  out.finish_reason)
        for r in results.values():
            r.timing["call_s"] = time.perf_counter() - t0
        if streamer is not None:
            streamer.end()
