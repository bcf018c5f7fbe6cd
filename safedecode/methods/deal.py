"""DeAL (arXiv 2402.06147): decoding as reward-guided lookahead search, on forked decode states.

At each search step every frontier sequence of every request takes its top-``k`` next tokens from
the base method's final distribution (so DeAL composes with ACD, Self-CD, ...); each candidate is
a fork of the sequence (its KV shared, no forward), rolled out ``lookahead`` tokens ahead —
greedy, or sampled with the request's seed when ``temperature`` > 0 — all candidates of all
requests in **one** batched forward per lookahead step; the prompt is never prefilled again.
Candidate ``c`` scores ``log P(y_1..c) + lam * h(prompt, y_1..c+lookahead)`` (``log P`` under the
final distribution at temperature 1; ``h`` a :mod:`~.rewards` reward); the best ``beam`` are kept
and rolled back to the candidate (``chunk=1``: one token per step, the paper) or to the first
``chunk`` tokens of their rollout (fewer search steps). A winning candidate whose rollout ended
(EOS, a stop, or ``max_new_tokens``) is the answer as rolled out.

``horizon`` (an extension; ``None`` = the whole answer, the paper) ends the search once a
request's best sequence has ``horizon`` committed tokens: the rest of its answer is decoded by
the base method alone, in the same batched steps as the other requests' searches. Whether an
answer refuses is settled in its first tokens, so a short horizon keeps most of the effect at
close to the base method's cost. The candidates of all requests are scored in one reward call
per search step.

``propose`` (an extension; 0 = off, the paper) adds the top-``propose`` tokens of the *plain*
model (no system prompt) to each search step's candidates. A contrast method's plausibility mask
can leave no answer among its top-k for a safe request it over-refuses; the plain model's
proposals let the reward pick one. The plain model is the base's own plain branch where it has
one (Self-CD), otherwise a weight-0 branch added to the base (the final distribution is
unchanged; the forward carries one more branch). ``log P`` of every candidate is then under the
mixture ``(1 - mix) p_base + mix p_plain`` (``mix`` 0.5 by default): a smaller ``mix`` makes a
token only the plain model proposes need a larger reward margin to win.

``rollout`` (an extension; ``"base"`` = the paper) chooses who rolls the candidates out:
``"plain"`` the plain model's greedy tokens instead of the base method's, so the reward judges an
answer candidate as the undefended model would go on with it rather than as the base's (perhaps
over-refusing or garbled) continuation; ``"both"`` rolls every candidate out twice, by the base
and by the plain model (a fork of the candidate, twice the sequences), and the reward picks among
all of them, so a refusal stays reachable (the plain model rarely continues one) beside a fluent
answer. Rollout tokens' log P is under the proposals' mixture; past the horizon the base method
decodes, as before.

A :class:`Searcher` holds every answer's search as its own phase machine (expand, roll out,
score, commit), so answers added at any time share one engine's batched steps (``safedecode serve
-m deal``). :func:`stream` (``SafeDecoder.stream``) runs one and yields each answer's tokens as
they become final: the ones a search step commits (with a beam, the prefix every kept sequence
shares), then, past the horizon, each token as decoded; :func:`search` collects its results.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field, replace

from safedecode.engine.branches import Branch, Method
from safedecode.engine.detokenizer import IncrementalDetokenizer
from safedecode.engine.engine import Engine, GenerationResult, StepOutput, checked_params
from safedecode.engine.sampling import SamplingParams
from safedecode.engine.search import Search
from safedecode.engine.step import Built

from .rewards import Reward, make_reward, timed


@dataclass(frozen=True)
class DeAL(Search):
    """Search settings around a base :class:`Method` (see the module docstring)."""

    base: Method
    reward: Reward
    k: int = 4
    lookahead: int = 8
    lam: float = 1.0
    beam: int = 1
    chunk: int = 1
    horizon: int | None = None
    propose: int = 0
    mix: float = 0.5
    rollout: str = "base"
    name: str = "deal"

    def __post_init__(self) -> None:
        if not isinstance(self.base, Method):
            raise ValueError(f"base: expected a Method, got {type(self.base).__name__}")
        for field_, value, lo in (("k", self.k, 1), ("lookahead", self.lookahead, 0),
                                  ("beam", self.beam, 1), ("chunk", self.chunk, 1),
                                  ("propose", self.propose, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{field_}: must be an integer >= {lo}, got {value!r}")
        if self.horizon is not None and (isinstance(self.horizon, bool)
                                         or not isinstance(self.horizon, int) or self.horizon < 1):
            raise ValueError(f"horizon: must be an integer >= 1 or None, got {self.horizon!r}")
        if self.chunk > self.lookahead + 1:
            raise ValueError(f"chunk: at most lookahead + 1 = {self.lookahead + 1} tokens can "
                             f"be committed per step, got {self.chunk}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) \
                or not math.isfinite(self.lam):
            raise ValueError(f"lam: must be a finite number, got {self.lam!r}")
        if not isinstance(self.reward, Reward):
            raise ValueError("reward: expected a Reward (see safedecode.methods.rewards)")
        if isinstance(self.mix, bool) or not isinstance(self.mix, (int, float)) \
                or not 0 < self.mix < 1:
            raise ValueError(f"mix: the plain model's weight in the proposals' mixture, in "
                             f"(0, 1), got {self.mix!r}")
        if self.rollout not in ROLLOUTS:
            raise ValueError(f"rollout: expected one of {', '.join(ROLLOUTS)}, got "
                             f"{self.rollout!r}")
        if self.propose and _plain_branch(self.base) is None and self.base.rule != "linear":
            raise ValueError(f"propose: the base {self.base.name!r} has no plain branch and its "
                             f"{self.base.rule!r} rule takes no added branch; use propose=0")
        if self.rollout != "base" and _plain_branch(self.base) is None \
                and self.base.rule != "linear":
            raise ValueError(f"rollout: the base {self.base.name!r} has no plain branch and its "
                             f"{self.base.rule!r} rule takes no added branch; use "
                             "rollout='base'")

    @functools.cached_property
    def engine_method(self) -> Method:
        """The method the engine runs: the base, plus a weight-0 plain branch when ``propose``
        or a plain rollout needs one the base lacks (its final distribution is the base's)."""
        if not (self.propose or self.rollout != "base") or _plain_branch(self.base) is not None:
            return self.base
        b = self.base
        return Method(b.name, (*b.branches, Branch(name="proposal")), (*b.weights, 0.0),
                      b.rule, b.anchor, b.beta, b.contrast_gate, b.fallback)

    @property
    def proposal(self) -> tuple[int, int, float] | None:
        """``(branch, kp, mix)`` for :meth:`Engine.step`'s ``propose``, or None."""
        if not self.propose:
            return None
        return _plain_branch(self.engine_method), self.propose, float(self.mix)

    @property
    def proposal_branch(self) -> int | None:
        """The engine method's plain branch (proposals and plain rollouts), or None."""
        return _plain_branch(self.engine_method)

    def follow(self, ids) -> tuple[int, frozenset[int], float] | None:
        """``(branch, ids, mix)`` for :meth:`Engine.step`'s ``follow`` in a rollout step, or
        None (the base method's own tokens)."""
        if self.rollout == "base":
            return None
        return self.proposal_branch, frozenset(ids), float(self.mix)

    def describe(self) -> str:
        return (f"{self.name}: k={self.k}, lookahead={self.lookahead}, lam={self.lam}, "
                f"beam={self.beam}, chunk={self.chunk}, "
                f"{'' if self.horizon is None else f'horizon={self.horizon}, '}"
                f"{f'propose={self.propose}, ' if self.propose else ''}"
                f"{f'mix={self.mix}, ' if self.propose or self.rollout != 'base' else ''}"
                f"{f'rollout={self.rollout}, ' if self.rollout != 'base' else ''}"
                f"reward={self.reward.key()}; base "
                f"{self.base.describe()}")

    @property
    def sequences_per_request(self) -> int:
        """Sequences a request holds at once during a search step (``beam x (k + propose)``,
        twice that with ``rollout="both"``)."""
        return self.beam * (self.k + self.propose) * (2 if self.rollout == "both" else 1)

    def events(self, engine: Engine, built: Sequence[Built], texts: Sequence[str],
               params: SamplingParams | Sequence[SamplingParams],
               on_step: Callable[[int, int], None] | None = None):
        """:func:`stream` (the :class:`Search` contract)."""
        return stream(engine, built, texts, params, self, on_step)


ROLLOUTS = ("base", "plain", "both")


def _plain_branch(method: Method) -> int | None:
    """The first branch of ``method`` that is the plain model (no system or soft prompt, hook or
    adapter), or None."""
    for i, b in enumerate(method.branches):
        if b.system is None and b.soft_prompt is None and not b.hooks and b.adapter is None:
            return i
    return None


def deal(k: int = 4, lookahead: int = 8, lam: float = 1.0, reward=None, beam: int = 1,
         chunk: int = 1, horizon: int | None = None, propose: int = 0, mix: float = 0.5,
         rollout: str = "base", base: str | Method = "plain", **base_kwargs) -> DeAL:
    """``methods.get("deal", k=4, lookahead=8, lam=1.0, reward="keywords:include=sorry",
    base="acd-text", alpha=0.5)``: DeAL over the named base method (its keyword arguments
    pass through). ``reward``: a :class:`Reward`, a callable ``(prompts, texts) -> scores`` or a
    spec string (:func:`~.rewards.make_reward`)."""
    if reward is None:
        raise ValueError("reward: DeAL needs a reward (e.g. 'harmless', the shipped "
                         "harmlessness reward model, 'keywords:include=sorry|cannot', "
                         "'length:target=64', 'classifier:path=DIR', or a callable)")
    if isinstance(base, str):
        from safedecode import methods

        if base == "deal":
            raise ValueError("base: DeAL's base must be a decoding method, not DeAL")
        base = methods.get(base, **base_kwargs)
    elif base_kwargs:
        raise ValueError(f"{sorted(base_kwargs)[0]}: not a DeAL parameter")
    return DeAL(base, make_reward(reward), k=k, lookahead=lookahead, lam=lam, beam=beam,
                chunk=chunk, horizon=horizon, propose=propose, mix=mix, rollout=rollout)


@dataclass
class _Cand:
    id: int
    committed: int  # tokens committed before this candidate's token


@dataclass
class _Answer:
    """One answer's search (see :class:`Searcher`)."""

    id: int
    built: Built
    prompt: str
    params: SamplingParams  # the caller's
    index: int
    phase: str = "queued"  # queued -> expand <-> rollout (-> scoring) -> (free) -> done
    frontier: list[int] = field(default_factory=list)  # sequences the next step expands
    committed: dict[int, int] = field(default_factory=dict)  # sequence -> committed tokens
    cands: list[_Cand] = field(default_factory=list)  # this search step's candidates
    followed: set[int] = field(default_factory=set)  # candidates the plain model rolls out
    finished: dict[int, GenerationResult] = field(default_factory=dict)  # ended candidates
    left: int = 0  # rollout steps left
    free: int | None = None  # past the horizon: the sequence decoding on alone
    detok: IncrementalDetokenizer | None = None
    sent: int = 0  # tokens of the answer already handed out
    forks: int = 0  # copies forked for plain rollouts (their seeds)

    def live(self) -> list[int]:
        """The answer's sequences still in the engine."""
        if self.phase == "free":
            return [self.free]
        if self.phase in ("rollout", "scoring"):
            return [c.id for c in self.cands if c.id not in self.finished]
        return list(self.frontier)


_DEFAULTS = SamplingParams()


class Searcher:
    """DeAL's search, one answer at a time, inside an engine on ``spec.engine_method``.

    Every answer moves through its own phases — its frontier expanded to the top-``k``
    candidates in one engine step, the candidates rolled out ``lookahead`` steps, the reward
    called, the best kept and rolled back to what is committed — so answers added at any time
    share the engine's batched steps (the server), each at its own phase. Drive it with
    :meth:`step` (or ``engine.step(**searcher.step_args())`` then :meth:`feed`); it returns
    each answer's tokens once final, as :class:`StepOutput` under the answer's id (the id
    :meth:`add` returned; ``token_id`` -1 on a last output that carries no token of its own)
    with the :class:`GenerationResult` on its last one. Answers whose candidates reach the
    reward in the same step are scored in one batched call.

    An answer holds up to ``spec.sequences_per_request`` sequences at once (one once past its
    horizon); the searcher starts one only when that many slots are sure to be free (it queues
    the others), so an expansion never lacks a slot. Every sequence of the engine must come
    from this searcher (a request added to the engine behind its back could take the slots an
    expansion counts on).

    By default the reward runs inside :meth:`feed`, on the caller's thread, every other answer
    waiting for it. With ``scorer`` (an executor, e.g. one worker thread) the call runs there:
    the scored answers' candidates sit the engine's steps out (``hold``) while the other
    answers go on, and a later :meth:`feed` that finds the score done commits them. The same
    texts are scored and the held candidates do not move, so the answers are the same.
    """

    def __init__(self, engine: Engine, spec: DeAL, *, scorer: Executor | None = None) -> None:
        if scorer is not None and not isinstance(scorer, Executor):
            raise ValueError(f"scorer: expected a concurrent.futures.Executor, got "
                             f"{type(scorer).__name__}")
        if engine.method is not spec.engine_method:
            raise ValueError("engine: DeAL's search needs an engine on spec.engine_method (the "
                             "base method, with the proposal branch when propose > 0)")
        if spec.sequences_per_request > engine.state.max_seqs:
            raise ValueError(f"max_seqs: a DeAL answer holds up to {spec.sequences_per_request} "
                             f"sequences (beam {spec.beam} x (k {spec.k} + propose "
                             f"{spec.propose}){' x 2 rollouts' if spec.rollout == 'both' else ''}"
                             f"); the engine has {engine.state.max_seqs}")
        self.engine, self.spec, self.scorer = engine, spec, scorer
        self._scoring: dict[Future, tuple[list[_Answer], list[float]]] = {}  # calls in flight
        self.reward_times: deque[float] = deque(maxlen=4096)  # s per reward call (a server drains)
        self._ids = itertools.count()
        self._answers: dict[int, _Answer] = {}  # unfinished answers by id
        self._queue: deque[_Answer] = deque()
        self._owner: dict[int, _Answer] = {}  # engine sequence -> its answer
        self.search_steps = 0  # reward calls made (one per step in which some search chose)

    # -- requests ----------------------------------------------------------------------------
    def add(self, built: Built, prompt: str, params: SamplingParams | None = None, *,
            index: int = 0, n: int = 1) -> list[int]:
        """Queue ``n`` answers of one request (``built`` for the engine, ``prompt`` the text the
        reward scores against); returns their ids. Answer ``c`` draws with seed ``seed + c``
        (each its own prefill: one answer's fork family is released as a whole)."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: the reward scores text, got {type(prompt).__name__}")
        params = checked_params(params, n)
        for name in ("top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias",
                     "repetition_penalty", "min_tokens", "bad_words", "bad_words_ids",
                     "allowed_token_ids", "no_repeat_ngram_size"):
            if getattr(params, name) != getattr(_DEFAULTS, name):
                raise ValueError(f"{name}: not supported by deal (its tokens are chosen by a "
                                 "search over rollouts, not drawn from one distribution)")
        self.engine.check_fits(built, params.max_new_tokens, index)
        if params.seed is not None and params.seed + n - 1 >= 2**63:
            raise ValueError(f"seed: seed + n - 1 must be < 2**63, got {params.seed} with n={n}")
        ids = []
        for c in range(n):
            p = params if params.seed is None else replace(params, seed=params.seed + c)
            a = _Answer(next(self._ids), built, prompt, p, index)
            self._answers[a.id] = a
            self._queue.append(a)
            ids.append(a.id)
        return ids

    def pending(self) -> int:
        """Answers not finished yet (queued or searching)."""
        return len(self._answers)

    def num_waiting(self) -> int:
        """Answers queued for their slots."""
        return len(self._queue)

    def scoring(self) -> int:
        """Reward calls in flight on ``scorer`` (:meth:`feed` with ``wait`` collects them)."""
        return len(self._scoring)

    def abort(self, request_id: int) -> None:
        """Drop an unfinished answer: every live sequence of it (its slots are free at once)."""
        a = self._answers.pop(request_id, None) if isinstance(request_id, int) else None
        if a is None:
            raise ValueError(f"request_id: no unfinished DeAL answer {request_id!r}")
        if a.phase == "queued":
            self._queue.remove(a)
            return
        for sid in a.live():
            try:
                self.engine.abort(sid)
            except ValueError:
                pass  # ended in a step whose outputs never reached feed() (a failed step)
        for sid in a.finished:  # ended candidates: what they kept is no one's answer
            self.engine.discard_turn(sid)
        for sid in [s for s, owner in self._owner.items() if owner is a]:
            del self._owner[sid]

    # -- the step ----------------------------------------------------------------------------
    def step(self) -> list[tuple[StepOutput, GenerationResult | None]]:
        """One engine step with this searcher's arguments, its outputs fed back."""
        return self.feed(self.engine.step(**self.step_args()))

    def step_args(self) -> dict:
        """Start the queued answers that fit, then the keyword arguments of the next
        :meth:`Engine.step`: the frontiers to expand (with the proposals) and the rollouts
        the plain model follows."""
        eng, spec = self.engine, self.spec
        peak = spec.sequences_per_request  # past its horizon an answer holds one for good
        reserved = sum(1 if a.phase == "free" else peak for a in self._answers.values()
                       if a.phase != "queued")
        while self._queue and reserved + peak <= eng.state.max_seqs:
            a = self._queue.popleft()
            root = eng.add_built(a.built, replace(a.params, logprobs=True), index=a.index)[0]
            a.phase, a.frontier, a.committed = "expand", [root], {root: 0}
            a.detok = eng.detokenizer(root)
            self._owner[root] = a
            reserved += peak
        expand = {sid: spec.k for a in self._answers.values() if a.phase == "expand"
                  for sid in a.frontier}
        args: dict = {}
        if expand:
            args["expand"], args["propose"] = expand, spec.proposal
        rolling = [c.id for a in self._answers.values() if a.phase == "rollout"
                   for c in a.cands if c.id in a.followed and c.id not in a.finished]
        if rolling and spec.rollout != "base":
            args["follow"] = spec.follow(rolling)
        held = [sid for a in self._answers.values() if a.phase == "scoring" for sid in a.live()]
        if held:
            args["hold"] = held
        return args

    def feed(self, outputs: Sequence[StepOutput], *, wait: float = 0.0
             ) -> list[tuple[StepOutput, GenerationResult | None]]:
        """One engine step's outputs in; the answers' final tokens out (see the class
        docstring). Outputs of sequences not started here pass through untouched. ``wait``:
        with a ``scorer``, seconds to wait for a reward call in flight when none is done yet
        (for a caller whose step had nothing to decode)."""
        eng, spec = self.engine, self.spec
        out: list[tuple[StepOutput, GenerationResult | None]] = []
        rolled = [a for a in self._answers.values() if a.phase == "rollout"]
        expanded: dict[int, _Answer] = {}
        for o in outputs:
            a = self._owner.get(o.request_id if o.parent is None else o.parent)
            if a is None:
                out.append((o, None))
                continue
            result = eng.pop_result(o.request_id) if o.finish_reason else None
            if a.phase == "free":
                if result is not None:
                    self._final(a, (), out, result)
                elif o.token_id >= 0:  # past the horizon every token is final
                    lp = o.logprob if a.params.logprobs else None
                    out.append((StepOutput(a.id, a.detok.add(o.token_id), o.token_id,
                                           logprob=lp), None))
                    a.sent += 1
                continue
            if a.phase == "expand":  # the frontier's (and their forks') candidate tokens
                base = o.parent if o.parent is not None else o.request_id
                a.cands.append(_Cand(o.request_id, a.committed[base]))
                self._owner[o.request_id] = a
                expanded[a.id] = a
            if result is not None:
                a.finished[o.request_id] = result
        for a in rolled:
            a.left -= 1
        for a in expanded.values():
            a.phase, a.left = "rollout", spec.lookahead
            if spec.rollout == "both":  # a copy of every candidate, rolled out by the plain model
                copies = [_Cand(eng.fork(c.id, 1, self._fork_seed(a))[0], c.committed)
                          for c in a.cands if c.id not in a.finished]
                for c in copies:
                    self._owner[c.id] = a
                a.followed = {c.id for c in copies}
                a.cands += copies
            else:
                a.followed = {c.id for c in a.cands}
        ready = [a for a in self._answers.values() if a.phase == "rollout" and (
            a.left <= 0 or all(c.id in a.finished for c in a.cands))]
        if ready:
            finished = {sid: r for a in ready for sid, r in a.finished.items()}
            cands = {a.id: a.cands for a in ready}
            if self.scorer is None:
                chosen = _select(eng, cands, {a.id: a.prompt for a in ready}, spec, finished,
                                 self.reward_times)
                self.search_steps += 1
                for a in ready:
                    self._commit(a, chosen[a.id], out)
            else:  # scored beside the engine; the candidates sit the steps out until then
                texts, logp = _gather(eng, cands, finished)
                prompts = [a.prompt for a in ready for _ in a.cands]
                self._scoring[self.scorer.submit(timed, spec.reward, prompts, texts,
                                                 self.reward_times)] = (ready, logp)
                for a in ready:
                    a.phase = "scoring"
        if self._scoring:
            if wait > 0 and not any(f.done() for f in self._scoring):
                futures_wait(self._scoring, timeout=wait, return_when=FIRST_COMPLETED)
            for f in [f for f in self._scoring if f.done()]:
                scored, logp = self._scoring.pop(f)
                chosen = _rank({a.id: a.cands for a in scored}, logp, f.result(), spec)
                self.search_steps += 1
                for a in scored:
                    if a.id in self._answers:  # not aborted meanwhile
                        self._commit(a, chosen[a.id], out)
        return out

    @staticmethod
    def _fork_seed(a: _Answer) -> list[int] | None:
        """A seeded answer's next fork seed, from its own seed and forks so far (not from
        engine ids, which depend on what else runs: the same draws served as alone)."""
        if a.params.seed is None:
            return None
        a.forks += 1
        return [(a.params.seed * 1_000_003 + 7919 * a.forks) % 2**62]

    def _commit(self, a: _Answer, chosen: list[_Cand], out: list) -> None:
        """Keep an answer's chosen candidates, rolled back to what is committed; hand out what
        became final."""
        eng, spec = self.engine, self.spec
        for sid in a.finished:  # ended candidates not chosen: their kept turn is no answer
            if sid != chosen[0].id:
                eng.discard_turn(sid)
        if chosen[0].id in a.finished:  # the best rollout ended: that is the answer
            for c in a.cands:
                if c.id not in a.finished:
                    eng.release(c.id)
            self._final(a, (), out, a.finished[chosen[0].id])
            return
        keep = [c for c in chosen if c.id not in a.finished]
        ends = spec.horizon is not None and min(
            keep[0].committed + spec.chunk, eng.num_tokens(keep[0].id)) >= spec.horizon
        if ends:  # the search is over for this answer: the best goes on alone
            keep = keep[:1]
        kept = {c.id for c in keep}
        eng.keep(kept)
        for c in a.cands:
            if c.id not in kept:
                self._owner.pop(c.id, None)
        a.committed = {}
        for c in keep:
            n = min(c.committed + spec.chunk, eng.num_tokens(c.id))
            eng.truncate(c.id, n)
            a.committed[c.id] = n
        a.cands, a.finished, a.followed = [], {}, set()
        self._final(a, os.path.commonprefix([eng.tokens(c.id) for c in keep]), out,
                    logprobs=eng.logprobs(keep[0].id))
        if ends:
            a.phase, a.free, a.frontier = "free", keep[0].id, []
        else:
            a.phase, a.frontier = "expand", [c.id for c in keep]

    def _final(self, a: _Answer, tokens: Sequence[int], out: list,
               result: GenerationResult | None = None, logprobs: Sequence[float] = ()) -> None:
        """``tokens`` (the answer so far, or ``result``'s) are final: hand out the ones not
        handed out yet; with ``result`` the answer is over."""
        if result is not None:
            tokens, logprobs = result.token_ids, result.logprobs or ()
        want = a.params.logprobs
        new = [StepOutput(a.id, a.detok.add(t), t,
                          logprob=logprobs[j] if want and j < len(logprobs) else None)
               for j, t in enumerate(tokens[a.sent:], start=a.sent)]
        a.sent = max(a.sent, len(tokens))
        if result is None:
            out += [(o, None) for o in new]
            return
        last = new.pop() if new else StepOutput(a.id, "", -1)
        out += [(o, None) for o in new]
        out.append((replace(last, text=last.text + a.detok.flush(),
                            finish_reason=result.finish_reason), result))
        a.phase = "done"
        del self._answers[a.id]
        for sid in [s for s, owner in self._owner.items() if owner is a]:
            del self._owner[sid]


def stream(engine: Engine, built: Sequence[Built], prompts: Sequence[str],
           params: SamplingParams | Sequence[SamplingParams], spec: DeAL,
           on_step: Callable[[int, int], None] | None = None
           ) -> Iterator[tuple[int, int | None, str, GenerationResult | None]]:
    """Run DeAL for every request (``built[i]``, scored against ``prompts[i]``, decoded with
    ``params`` or ``params[i]``) in ``engine`` (as many at once as it holds answers of
    ``spec.sequences_per_request`` sequences; the others queued), yielding
    ``(i, token_id, text, result)`` for each token of request ``i``'s answer once it is final —
    committed by a search step (with a beam, the part every kept sequence shares), decoded past
    the horizon, or the winning rollout's rest — with its text delta; ``result`` is set on the
    request's last event (``token_id`` ``None`` where it carries no token of its own).
    ``on_step(requests_done, requests)`` after each search step. Runs a :class:`Searcher`."""
    if engine.has_unfinished():
        raise ValueError("engine: DeAL's search needs an engine with no other requests (the "
                         "searcher counts on every free slot; serve requests through one "
                         "Searcher instead)")
    if isinstance(params, SamplingParams):
        params = [params] * len(built)
    if len(params) != len(built) or len(prompts) != len(built):
        raise ValueError(f"params, prompts: expected {len(built)} of each")
    searcher = Searcher(engine, spec)
    index = {searcher.add(b, t, p, index=i)[0]: i
             for i, (b, t, p) in enumerate(zip(built, prompts, params, strict=True))}
    done = 0
    while searcher.pending():
        steps = searcher.search_steps
        for o, result in searcher.step():
            done += result is not None
            yield index[o.request_id], (o.token_id if o.token_id >= 0 else None), o.text, result
        if on_step is not None and searcher.search_steps > steps:
            on_step(done, len(built))


def search(engine: Engine, built: Sequence[Built], prompts: Sequence[str],
           params: SamplingParams | Sequence[SamplingParams], spec: DeAL,
           on_step: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
    """:func:`stream`'s results, one per request; ``on_step(requests_done, requests)`` after
    each search step."""
    results = {i: r for i, _, _, r in stream(engine, built, prompts, params, spec, on_step)
               if r is not None}
    return [results[i] for i in range(len(built))]


def _gather(engine: Engine, cands: dict[int, list[_Cand]],
            finished: dict[int, GenerationResult]) -> tuple[list[str], list[float]]:
    """Every candidate's text so far (its rollout's) and ``log P`` of its committed part and
    its own token, in ``cands`` order."""
    texts, logp = [], []
    for cs in cands.values():
        for c in cs:
            if c.id in finished:
                r = finished[c.id]
                lps, text = r.logprobs or [], r.text
            else:
                lps, text = engine.logprobs(c.id), engine.text(c.id)
            logp.append(sum(lps[:c.committed + 1]))
            texts.append(text)
    return texts, logp


def _rank(cands: dict[int, list[_Cand]], logp: Sequence[float], h: Sequence[float],
          spec: DeAL) -> dict[int, list[_Cand]]:
    """Each request's best ``spec.beam`` candidates by ``log P + lam * h`` (ties: the likelier
    token)."""
    out, at = {}, 0
    for i, cs in cands.items():
        score = [logp[at + j] + spec.lam * h[at + j] for j in range(len(cs))]
        order = sorted(range(len(cs)), key=lambda j: (-score[j], j))
        out[i] = [cs[j] for j in order[:spec.beam]]
        at += len(cs)
    return out


def _select(engine: Engine, cands: dict[int, list[_Cand]], prompts: Mapping[int, str],
            spec: DeAL, finished: dict[int, GenerationResult],
            times: deque | None = None) -> dict[int, list[_Cand]]:
    """Each request's best ``spec.beam`` candidates by ``log P + lam * h`` (ties: the likelier
    token); the candidates of all requests in one reward call (its time appended to
    ``times``)."""
    texts, logp = _gather(engine, cands, finished)
    h = timed(spec.reward, [prompts[i] for i, cs in cands.items() for _ in cs], texts,
              deque() if times is None else times)
    return _rank(cands, logp, h, spec)
