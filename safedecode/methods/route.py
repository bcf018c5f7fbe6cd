"""The reward router: a safety method or the plain model, chosen per request by a reward model.

A contrast method such as ACD refuses nearly every harmful request and too many harmless ones,
mostly with a canned refusal in its first tokens; the plain model answers both. The router
decodes both side by side for the first ``horizon`` tokens — one prefill, two choices of one
request (:meth:`Engine.add_built` ``gates=(True, False)``: the base's contrast, and its plain
fallback branch) — then lets a reward model (:mod:`.rewards`; the ``harmless`` one by default)
score the two beginnings against the request and keeps the base's answer when
``h(base) - h(plain) > margin``, else the plain model's. The loser's slot is freed at once and
the winner goes on alone, so a request costs two sequences for ``horizon`` tokens, one reward
call, then one. With greedy decoding the answer is exactly the winner's own greedy answer;
sampled, the base's answer draws with the request's seed and the plain model's with seed + 1
(two choices of one request). :class:`Router` holds that state per request inside an engine
that other requests may share (``safedecode serve --method route`` drives one per engine);
:func:`stream` (``SafeDecoder.stream``) runs one and yields the kept answer's text once the
reward has chosen it (its first ``horizon`` tokens at once), then as decoded. Once decided, a
sequence decodes only the rows its side reads (the engine's ``drop_rows``).

The knobs shipped for the default model (``horizon`` 16, ``margin`` -2, base ``acd``) were
chosen on the anchor set's validation part (``benchmarks/results/route_s31``).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from functools import cached_property

from safedecode.engine.branches import Branch, Method
from safedecode.engine.engine import Engine, GenerationResult, StepOutput
from safedecode.engine.sampling import SamplingParams
from safedecode.engine.search import Search
from safedecode.engine.step import Built

from .deal import _plain_branch
from .rewards import Reward, make_reward, timed


@dataclass(frozen=True)
class Route(Search):
    """Route each request to ``base`` or the plain model by ``reward`` on their first
    ``horizon`` tokens (see the module docstring)."""

    base: Method
    reward: Reward
    horizon: int = 16
    margin: float = -2.0
    name: str = "route"

    def __post_init__(self) -> None:
        if not isinstance(self.base, Method):
            raise ValueError(f"base: expected a Method, got {type(self.base).__name__}")
        if self.base.contrast_gate is not None:
            raise ValueError(f"base: {self.base.name!r} is already gated; route the ungated "
                             "method (the router is its gate)")
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) \
                or self.horizon < 1:
            raise ValueError(f"horizon: must be an integer >= 1, got {self.horizon!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) \
                or not math.isfinite(self.margin):
            raise ValueError(f"margin: must be a finite number, got {self.margin!r}")
        if not isinstance(self.reward, Reward):
            raise ValueError("reward: expected a Reward (see safedecode.methods.rewards; "
                             "methods.get('route', reward=...) also takes a spec or a callable)")
        self.engine_method  # noqa: B018 - the base must take a contrast gate: fail here

    @cached_property
    def engine_method(self) -> Method:
        """The base with its contrast gated per choice (on: the base's distribution; off: the
        plain model's) — its own plain branch as the fallback where it has one, else a weight-0
        plain branch added."""
        m = self.base
        plain = _plain_branch(m)
        try:
            if plain is not None:
                return dataclasses.replace(m, contrast_gate=m.anchor, fallback=plain)
            return dataclasses.replace(m, branches=(*m.branches, Branch(name="plain")),
                                       weights=(*m.weights, 0.0), contrast_gate=m.anchor,
                                       fallback=m.k)
        except ValueError as exc:
            raise ValueError(f"base: {m.name!r} cannot be routed ({exc})") from exc

    sequences_per_request = 2
    drop_rows = True  # the kept answer's rows read no branch's own logits once chosen

    def events(self, engine: Engine, built: Sequence[Built], texts: Sequence[str],
               params: SamplingParams | Sequence[SamplingParams],
               on_step: Callable[[int, int], None] | None = None):
        """:func:`stream`'s outputs as ``(i, token_id, text, result)`` (the :class:`Search`
        contract)."""
        for i, out, result in stream(engine, built, texts, params, self, on_step):
            yield i, (out.token_id if out.token_id >= 0 else None), out.text, result

    def describe(self) -> str:
        return (f"{self.name}: horizon={self.horizon}, margin={self.margin}, "
                f"reward={self.reward.key()}; base {self.base.describe()}")


def route(base: str | Method = "acd", reward=None, horizon: int = 16, margin: float = -2.0,
          **base_kwargs) -> Route:
    """``methods.get("route", base="acd", reward="harmless", horizon=16, margin=-2)``: the
    reward router over the named base method (its keyword arguments pass through). ``reward``
    as :func:`~.rewards.make_reward` takes it; default ``"harmless"``."""
    if isinstance(base, str):
        from safedecode import methods

        if base in ("deal", "route"):
            raise ValueError(f"base: the router's base must be a decoding method, not {base!r}")
        base = methods.get(base, **base_kwargs)
    elif base_kwargs:
        raise ValueError(f"{sorted(base_kwargs)[0]}: not a route parameter")
    return Route(base, make_reward("harmless" if reward is None else reward),
                 horizon=horizon, margin=margin)


class Router:
    """Routed requests inside an engine on ``spec.engine_method`` that other requests may share.

    :meth:`add` queues a request as two choices of one prefill per answer asked for (the base's
    contrast and the plain fallback, :meth:`Engine.add_built` ``gates``); feed every engine
    step's outputs to :meth:`feed`, which holds a request's outputs until the reward has chosen
    its answer, frees the loser's slot, and returns the kept answer's outputs under the
    request's id (the id :meth:`add` returned) with the finished result. Outputs of sequences
    not added here pass through untouched (their results stay in ``engine.pop_result``). The
    server's engine loop and :func:`stream` both drive one.

    The reward model scores, in one batched call, the requests that reach ``horizon`` tokens in
    a step: by default inside :meth:`feed`, on the caller's thread. With ``scorer`` (an
    executor, e.g. one worker thread) the call runs there instead and the engine goes on
    stepping meanwhile — both sides of a request keep decoding (their outputs held) until a
    later :meth:`feed` finds its score done — so the other requests' tokens are not held up by
    the reward model (the server's inter-token latency). The texts scored are the same first
    ``horizon`` tokens either way, so the decisions, and the answers, are the same."""

    def __init__(self, engine: Engine, spec: Route, *, scorer: Executor | None = None) -> None:
        if engine.method is not spec.engine_method:
            raise ValueError("engine: the router needs an engine on spec.engine_method")
        if scorer is not None and not isinstance(scorer, Executor):
            raise ValueError(f"scorer: expected a concurrent.futures.Executor, got "
                             f"{type(scorer).__name__}")
        self.engine, self.spec, self.scorer = engine, spec, scorer
        self._pair: dict[int, tuple[int, int]] = {}  # request id -> (base, plain) undecided
        self._scoring: dict[Future, list[int]] = {}  # reward calls in flight -> request ids
        self._prompt: dict[int, str] = {}
        self._owner: dict[int, int] = {}  # live sequence id -> request id
        self._held: dict[int, list[StepOutput]] = {}  # undecided sequence -> outputs so far
        self._ended: dict[int, GenerationResult] = {}  # finished undecided sequences
        self.decisions = {"base": 0, "plain": 0}
        self.reward_times: deque[float] = deque(maxlen=4096)  # s per reward call (a server drains)

    def add(self, built: Built, prompt: str, params: SamplingParams | None = None, *,
            index: int = 0, n: int = 1) -> list[int]:
        """Queue ``n`` routed answers of one request (``built`` for the engine, ``prompt`` the
        text the reward scores against); returns their ids. Answer ``c`` decodes the base with
        seed ``seed + 2c`` and the plain model with ``seed + 2c + 1``."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: the reward scores text, got {type(prompt).__name__}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: must be an integer >= 1, got {n!r}")
        if 2 * n > self.engine.state.max_seqs:
            raise ValueError(f"n: {n} routed answers need {2 * n} sequences at once (two per "
                             f"answer); this engine has max_seqs={self.engine.state.max_seqs}")
        ids = self.engine.add_built(built, params, index=index, n=2 * n,
                                    gates=(True, False) * n)
        out = []
        for c in range(n):
            base, plain = ids[2 * c], ids[2 * c + 1]
            self._pair[base] = (base, plain)
            self._prompt[base] = prompt
            self._owner[base] = self._owner[plain] = base
            self._held[base], self._held[plain] = [], []
            out.append(base)
        return out

    def pending(self) -> int:
        """Requests whose answer is not chosen yet."""
        return len(self._pair)

    def num_waiting(self) -> int:
        """Requests queued here for slots: none (they wait in the engine's queue)."""
        return 0

    def step_args(self) -> dict:
        """Keyword arguments of the next :meth:`Engine.step`: none (a routed request's two
        sides decode as sampled)."""
        return {}

    def scoring(self) -> int:
        """Reward calls in flight on ``scorer`` (their requests may have no sequence left to
        step: :meth:`feed` with ``wait`` collects them)."""
        return len(self._scoring)

    def abort(self, request_id: int) -> None:
        """Drop a routed request: every live sequence of it (its slots are free at once)."""
        seqs = [s for s, r in self._owner.items() if r == request_id]
        if not seqs:
            raise ValueError(f"request_id: no unfinished routed request {request_id!r}")
        for s in seqs:
            del self._owner[s]
            self._held.pop(s, None)
            if self._ended.pop(s, None) is None:
                self.engine.abort(s)
            else:  # ended before the choice: what it kept is no one's answer
                self.engine.discard_turn(s)
        self._pair.pop(request_id, None)
        self._prompt.pop(request_id, None)

    def feed(self, outputs: Sequence[StepOutput], *, wait: float = 0.0
             ) -> list[tuple[StepOutput, GenerationResult | None]]:
        """One engine step's outputs in; the outputs to pass on out, ``(output, result)`` with
        ``result`` set on a request's last one (see the class docstring). ``wait``: with a
        ``scorer``, seconds to wait for a reward call in flight when none is done yet (for a
        caller with nothing to step meanwhile)."""
        eng, spec = self.engine, self.spec
        out: list[tuple[StepOutput, GenerationResult | None]] = []
        for o in outputs:
            rid = self._owner.get(o.request_id)
            if rid is None:
                out.append((o, None))
                continue
            result = eng.pop_result(o.request_id) if o.finish_reason else None
            if o.request_id in self._held:
                self._held[o.request_id].append(o)
                if result is not None:
                    self._ended[o.request_id] = result
                continue
            if result is not None:
                del self._owner[o.request_id]
            out.append((dataclasses.replace(o, request_id=rid), result))
        busy = {r for rids in self._scoring.values() for r in rids}
        ready = [r for r, pair in self._pair.items() if r not in busy
                 and all(s in self._ended or eng.num_tokens(s) >= spec.horizon for s in pair)]
        if ready:
            texts = [self._ended[s].text if s in self._ended else eng.text(s)
                     for r in ready for s in self._pair[r]]
            prompts = [self._prompt[r] for r in ready for _ in range(2)]
            if self.scorer is None:
                self._decide(ready, timed(spec.reward, prompts, texts, self.reward_times), out)
            else:
                self._scoring[self.scorer.submit(timed, spec.reward, prompts, texts,
                                                 self.reward_times)] = ready
        if self._scoring:
            if wait > 0 and not any(f.done() for f in self._scoring):
                futures_wait(self._scoring, timeout=wait, return_when=FIRST_COMPLETED)
            for f in [f for f in self._scoring if f.done()]:
                self._decide(self._scoring.pop(f), f.result(), out)
        return out

    def _decide(self, rids: list[int], h, out: list) -> None:
        """Keep each request's base or plain answer by its two scores in ``h`` (requests
        aborted while scored are skipped); the kept answer's held outputs go to ``out``."""
        for n, r in enumerate(rids):
            if r not in self._pair:
                continue
            base, plain = self._pair.pop(r)
            del self._prompt[r]
            keep = h[2 * n] - h[2 * n + 1] > self.spec.margin
            self.decisions["base" if keep else "plain"] += 1
            win, lose = (base, plain) if keep else (plain, base)
            if self._ended.pop(lose, None) is None:
                self.engine.release(lose)
            else:  # ended before the choice: what it kept for the chat's next turn goes
                self.engine.discard_turn(lose)
            del self._owner[lose], self._held[lose]
            for o in self._held.pop(win):
                result = self._ended.pop(win) if o.finish_reason else None
                if result is not None:
                    del self._owner[win]
                out.append((dataclasses.replace(o, request_id=r), result))


def stream(engine: Engine, built: Sequence[Built], prompts: Sequence[str],
           params: SamplingParams | Sequence[SamplingParams], spec: Route,
           on_step: Callable[[int, int], None] | None = None
           ) -> Iterator[tuple[int, StepOutput, GenerationResult | None]]:
    """Route every request (``built[i]``, scored against ``prompts[i]``) in ``engine`` (on
    ``spec.engine_method``, with no other requests; two sequences per request decoded at once,
    the others queued), yielding
    ``(i, output, result)`` for each step output of request ``i``'s kept answer — held back until
    the reward has chosen it, then as decoded; ``result`` is set on the last one.
    ``on_step(requests_done, requests)`` after each engine step."""
    if engine.has_unfinished():
        raise ValueError("engine: the router needs an engine with no other requests")
    if isinstance(params, SamplingParams):
        params = [params] * len(built)
    if len(params) != len(built) or len(prompts) != len(built):
        raise ValueError(f"params, prompts: expected {len(built)} of each")
    if engine.state.max_seqs < 2:
        raise ValueError(f"max_seqs: the router needs two sequences per request; the engine "
                         f"has {engine.state.max_seqs}")
    router = Router(engine, spec)
    index = {router.add(b, t, p, index=i)[0]: i
             for i, (b, t, p) in enumerate(zip(built, prompts, params, strict=True))}
    done = 0
    while engine.has_unfinished():
        for o, result in router.feed(engine.step()):
            done += result is not None
            yield index[o.request_id], o, result
        if on_step is not None:
            on_step(done, len(built))


def search(engine: Engine, built: Sequence[Built], prompts: Sequence[str],
           params: SamplingParams | Sequence[SamplingParams], spec: Route,
           on_step: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
    """:func:`stream`'s results, one per request; ``on_step(requests_done, requests)`` after
    each engine step."""
    results = {i: r for i, _, r in stream(engine, built, prompts, params, spec, on_step)
               if r is not None}
    return [results[i] for i in range(len(built))]
