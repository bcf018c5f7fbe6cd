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

:func:`stream` (``SafeDecoder.stream``) yields each answer's tokens as they become final: the
ones a search step commits (with a beam, the prefix every kept sequence shares), then, past the
horizon, each token as decoded; :func:`search` collects its results.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from safedecode.engine.branches import Branch, Method
from safedecode.engine.engine import Engine, GenerationResult
from safedecode.engine.sampling import SamplingParams
from safedecode.engine.step import Built

from .rewards import Reward, make_reward


@dataclass(frozen=True)
class DeAL:
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
        raise ValueError("reward: DeAL needs a reward (e.g. 'keywords:include=sorry|cannot', "
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


def stream(engine: Engine, built: Sequence[Built], prompts: Sequence[str],
           params: SamplingParams | Sequence[SamplingParams], spec: DeAL,
           on_step: Callable[[int, int], None] | None = None
           ) -> Iterator[tuple[int, int | None, str, GenerationResult | None]]:
    """Run DeAL for every request (``built[i]``, scored against ``prompts[i]``, decoded with
    ``params`` or ``params[i]``) in ``engine`` (which must hold ``len(built) x
    spec.sequences_per_request`` sequences), yielding ``(i, token_id, text, result)`` for each
    token of request ``i``'s answer once it is final — committed by a search step (with a beam,
    the part every kept sequence shares), decoded past the horizon, or the winning rollout's
    rest — with its text delta; ``result`` is set on the request's last event (``token_id``
    ``None`` where it carries no token of its own). ``on_step(requests_done, requests)`` after
    each search step."""
    if engine.has_unfinished():
        raise ValueError("engine: DeAL's search needs an engine with no other requests (each "
                         "search step must expand every frontier sequence at once)")
    need = len(built) * spec.sequences_per_request
    if engine.state.max_seqs < need:
        raise ValueError(f"max_seqs: DeAL needs {need} sequences ({len(built)} requests x beam "
                         f"{spec.beam} x (k {spec.k} + propose {spec.propose})"
                         f"{' x 2 rollouts' if spec.rollout == 'both' else ''}); the engine "
                         f"has {engine.state.max_seqs}")
    if isinstance(params, SamplingParams):
        params = [params] * len(built)
    if len(params) != len(built) or len(prompts) != len(built):
        raise ValueError(f"params, prompts: expected {len(built)} of each")
    if engine.method is not spec.engine_method:
        raise ValueError("engine: DeAL's search needs an engine on spec.engine_method (the base "
                         "method, with the proposal branch when propose > 0)")
    roots = [engine.add_built(b, replace(p, logprobs=True), index=i)[0]
             for i, (b, p) in enumerate(zip(built, params, strict=True))]
    frontier = {i: [r] for i, r in enumerate(roots)}
    committed = dict.fromkeys(roots, 0)
    free: dict[int, int] = {}  # sequence -> request: past the horizon, decoded by the base
    finished: dict[int, GenerationResult] = {}
    done = 0
    detok = {i: engine.detokenizer(r) for i, r in enumerate(roots)}
    sent = dict.fromkeys(range(len(built)), 0)  # tokens of each answer already yielded
    events: list[tuple[int, int | None, str, GenerationResult | None]] = []

    def final(i: int, tokens: Sequence[int], result: GenerationResult | None = None) -> None:
        """``tokens`` (request ``i``'s answer so far, or ``result``'s) are final: queue the
        ones not yielded yet."""
        nonlocal done
        if result is not None:
            tokens = result.token_ids
        new = [(i, t, detok[i].add(t), None) for t in tokens[sent[i]:]]
        sent[i] = max(sent[i], len(tokens))
        if result is not None:
            done += 1
            last = new.pop() if new else (i, None, "", None)
            new.append((last[0], last[1], last[2] + detok[i].flush(), result))
        events.extend(new)

    def run(expand: dict[int, int] | None = None, rolling=()):
        follow = spec.follow(rolling) if rolling else None
        for o in engine.step(expand, spec.proposal if expand else None, follow):
            if o.request_id in free:
                i = free[o.request_id]
                if o.finish_reason:
                    del free[o.request_id]
                    final(i, (), engine.pop_result(o.request_id))
                elif o.token_id >= 0:  # past the horizon every token is final
                    events.append((i, o.token_id, detok[i].add(o.token_id), None))
                    sent[i] += 1
                continue
            if o.finish_reason:
                finished[o.request_id] = engine.pop_result(o.request_id)
            yield o

    while frontier or free:
        if not frontier:
            for _ in run():
                pass
            yield from events
            events.clear()
            continue
        owner = {sid: i for i, seqs in frontier.items() for sid in seqs}
        cands: dict[int, list[_Cand]] = {i: [] for i in frontier}
        for o in run({sid: spec.k for sid in owner}):
            base = o.parent if o.parent is not None else o.request_id
            cands[owner[base]].append(_Cand(o.request_id, committed[base]))
        if spec.rollout == "both":  # a copy of every candidate, rolled out by the plain model
            followed = set()
            for cs in cands.values():
                copies = [_Cand(engine.fork(c.id, 1)[0], c.committed) for c in cs
                          if c.id not in finished]
                followed.update(c.id for c in copies)
                cs.extend(copies)
        else:
            followed = {c.id for cs in cands.values() for c in cs}
        for _ in range(spec.lookahead):
            rolling = [c.id for cs in cands.values() for c in cs
                       if c.id not in finished and c.id in followed]
            if all(c.id in finished for cs in cands.values() for c in cs):
                break
            for _o in run(rolling=rolling):
                pass
        for i, chosen in _select(engine, cands, prompts, spec, finished).items():
            cs = cands[i]
            if chosen[0].id in finished:  # the best rollout ended: that is the answer
                final(i, (), finished[chosen[0].id])
                for c in cs:
                    if c.id not in finished:
                        engine.release(c.id)
                del frontier[i]
                continue
            keep = [c for c in chosen if c.id not in finished]
            ends = spec.horizon is not None and min(
                keep[0].committed + spec.chunk, engine.num_tokens(keep[0].id)) >= spec.horizon
            if ends:  # the search is over for this request: the best goes on alone
                keep = keep[:1]
            engine.keep([c.id for c in keep])
            for c in keep:
                n = min(c.committed + spec.chunk, engine.num_tokens(c.id))
                engine.truncate(c.id, n)
                committed[c.id] = n
            final(i, os.path.commonprefix([engine.tokens(c.id) for c in keep]))
            if ends:
                free[keep[0].id] = i
                del frontier[i]
            else:
                frontier[i] = [c.id for c in keep]
        for cs in cands.values():  # this step's losers and winners are settled
            for c in cs:
                finished.pop(c.id, None)
        yield from events
        events.clear()
        if on_step is not None:
            on_step(done, len(built))
    yield from events


def search(engine: Engine, built: Sequence[Built], prompts: Sequence[str],
           params: SamplingParams | Sequence[SamplingParams], spec: DeAL,
           on_step: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
    """:func:`stream`'s results, one per request; ``on_step(requests_done, requests)`` after
    each search step."""
    results = {i: r for i, _, _, r in stream(engine, built, prompts, params, spec, on_step)
               if r is not None}
    return [results[i] for i in range(len(built))]


def _select(engine: Engine, cands: dict[int, list[_Cand]], prompts: Sequence[str],
            spec: DeAL, finished: dict[int, GenerationResult]) -> dict[int, list[_Cand]]:
    """Each request's best ``spec.beam`` candidates by ``log P + lam * h`` (ties: the likelier
    token); the candidates of all requests in one reward call."""
    texts, logp, who = [], [], []
    for i, cs in cands.items():
        for c in cs:
            if c.id in finished:
                r = finished[c.id]
                lps, text = r.logprobs or [], r.text
            else:
                lps, text = engine.logprobs(c.id), engine.text(c.id)
            logp.append(sum(lps[:c.committed + 1]))
            texts.append(text)
            who.append(i)
    h = spec.reward([prompts[i] for i in who], texts)
    out, at = {}, 0
    for i, cs in cands.items():
        score = [logp[at + j] + spec.lam * h[at + j] for j in range(len(cs))]
        order = sorted(range(len(cs)), key=lambda j: (-score[j], j))
        out[i] = [cs[j] for j in order[:spec.beam]]
        at += len(cs)
    return out
