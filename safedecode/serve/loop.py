"""One engine loop per process: a thread that owns every :class:`Engine` and steps them.

The engines are not thread-safe, so only this thread touches them. HTTP handlers (on the asyncio
event loop) send commands — add a request, abort one — through a thread-safe queue; the thread
runs them at the next step boundary, so a request joins the running batch between two steps.
Each step's outputs are handed back to the asyncio side in one ``call_soon_threadsafe`` per
request (a :class:`Ticket`'s queue). When nothing runs, the thread sleeps on the command queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from safedecode.engine import Engine, GenerationResult, SamplingParams, StepOutput
from safedecode.engine.prompts import request_text
from safedecode.engine.scheduler import QueueFull

from .metrics import Metrics

log = logging.getLogger("safedecode.serve")


@dataclass
class Event:
    """A step's output for one choice of a ticket; ``result`` set when the choice finished."""

    choice: int
    output: StepOutput
    result: GenerationResult | None = None


@dataclass
class Ticket:
    """One HTTP request's sequences in one engine (``n`` choices of each prompt)."""

    model: str
    ids: list[int]
    prompt_tokens: int
    events: asyncio.Queue
    aio: asyncio.AbstractEventLoop
    created: float = field(default_factory=time.perf_counter)
    last: dict[int, float] = field(default_factory=dict)  # choice -> last token time
    open: int = 0  # choices not finished yet


_STOP = object()


def fill_to_context(engine: Engine, built: list, params: SamplingParams) -> SamplingParams:
    """``params`` with ``max_new_tokens`` lowered to the room the longest prompt leaves."""
    longest = max(len(p) + len(s) for req in built for p, s in req)
    room = engine.max_len - longest
    context = engine.runner.max_positions
    if context:
        room = min(room, context - longest)
    return replace(params, max_new_tokens=max(1, min(params.max_new_tokens, room)))


class EngineLoop:
    """Steps ``engines`` (model id -> Engine) on one thread; see the module docstring."""

    def __init__(self, engines: dict[str, Engine], metrics: Metrics | None = None,
                 routers: dict | None = None) -> None:
        self.engines = engines
        self.metrics = metrics
        # model id -> the per-request state of a search method over its engine: a
        # methods.route.Router or a methods.deal.Searcher (add / abort / step_args / feed)
        self.routers = dict(routers or {})
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._owner: dict[tuple[str, int], tuple[Ticket, int]] = {}
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.error: BaseException | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="safedecode-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step (in-flight requests are dropped: drain first)."""
        if self._thread is not None:
            self._cmds.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
        for router in self.routers.values():
            if router.scorer is not None:  # the reward thread (shared by the searches)
                router.scorer.shutdown(wait=False, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- commands (any thread) ----------------------------------------------------------------
    def submit(self, model: str, prompts: list, params: SamplingParams, n: int,
               raw: bool, *, fill: bool = False, score: bool = False) -> Future:
        """Queue ``n`` choices of each prompt; the future resolves to a :class:`Ticket` (or
        raises the engine's ``ValueError`` / ``QueueFull``) at the next step boundary.
        ``fill``: ``params.max_new_tokens`` is a cap, lowered to the room the prompt leaves.
        ``score``: each prompt (token ids, at least 2) is scored instead — its first token the
        prompt, the rest forced (:meth:`Engine.add_scored`; ``n`` 1)."""
        fut: Future = Future()
        aio = asyncio.get_running_loop()
        self._cmds.put(("add", fut, model, prompts, params, n, raw, fill, aio, score))
        return fut

    def abort(self, ticket: Ticket) -> None:
        """Drop a ticket's unfinished sequences (client gone, timeout): their rows are free
        from the next step on."""
        self._cmds.put(("abort", ticket))

    def call(self, fn) -> Future:
        """Run ``fn()`` on the engine thread between steps (inspection in tests and health)."""
        fut: Future = Future()
        self._cmds.put(("call", fut, fn))
        return fut

    # -- the thread ---------------------------------------------------------------------------
    def _waiting(self, name: str) -> int:
        """Requests of a model queued for slots (the engine's queue and its searcher's)."""
        router = self.routers.get(name)
        return self.engines[name].num_waiting() + (router.num_waiting() if router else 0)

    def _has_work(self, name: str) -> bool:
        """Whether model ``name`` has sequences to step (or searches queued to start)."""
        router = self.routers.get(name)
        return self.engines[name].has_unfinished() or bool(router and router.num_waiting())

    def _busy(self) -> bool:
        return (any(self._has_work(name) for name in self.engines)
                or any(r.scoring() for r in self.routers.values()))

    def _run(self) -> None:
        while True:
            try:  # idle: sleep until a command comes; busy: take what is there
                cmd = self._cmds.get_nowait() if self._busy() else self._cmds.get()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd is _STOP:
                    return
                self._command(cmd)
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    cmd = None
            for name, eng in self.engines.items():
                if self._has_work(name):
                    self._step(name, eng)
                elif name in self.routers and self.routers[name].scoring():
                    self._step(name, eng, idle=True)  # only reward calls left: collect them

    def _command(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            _, fut, model, prompts, params, n, raw, fill, aio, score = cmd
            if not fut.set_running_or_notify_cancel():
                return
            try:
                add = self._add_scored if score else self._add
                fut.set_result(add(model, prompts, params, n, raw, fill, aio))
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)
        elif kind == "abort":
            self._abort(cmd[1])
        elif kind == "call":
            _, fut, fn = cmd
            try:
                fut.set_result(fn())
            except Exception as exc:  # noqa: BLE001
                fut.set_exception(exc)

    def _add(self, model: str, prompts: list, params: SamplingParams, n: int, raw: bool,
             fill: bool, aio) -> Ticket:
        eng = self.engines[model]
        built = eng.build_many(prompts, raw=raw)
        if fill:
            params = fill_to_context(eng, built, params)
        for i, b in enumerate(built):
            eng.check_fits(b, params.max_new_tokens, i)
        if self._waiting(model) + len(built) > eng.scheduler.max_queue:
            raise QueueFull(f"max_queue: {self._waiting(model)} requests already wait for a slot "
                            f"(max_queue={eng.scheduler.max_queue}); retry after some finish")
        anchor = eng.method.anchor
        ticket = Ticket(model, [], sum(len(b[anchor][0]) + len(b[anchor][1]) for b in built),
                        asyncio.Queue(), aio)
        router = self.routers.get(model)
        for i, b in enumerate(built):
            if router is None:
                ticket.ids += eng.add_built(b, params, index=i, n=n)
            else:  # a search: each answer's sequences are the router's / searcher's
                ticket.ids += router.add(b, request_text(prompts[i], eng.tok), params,
                                         index=i, n=n)
        for c, rid in enumerate(ticket.ids):
            self._owner[model, rid] = (ticket, c)
        ticket.open = len(ticket.ids)
        if self.metrics is not None:
            self.metrics.prompt_tokens.labels(model).inc(ticket.prompt_tokens)
        return ticket

    def _add_scored(self, model: str, prompts: list, params: SamplingParams, n: int,
                    raw: bool, fill: bool, aio) -> Ticket:
        eng = self.engines[model]
        if model in self.routers:
            raise ValueError("echo: a search method does not score a given text")
        if self._waiting(model) + len(prompts) > eng.scheduler.max_queue:
            raise QueueFull(f"max_queue: {self._waiting(model)} requests already wait for a slot "
                            f"(max_queue={eng.scheduler.max_queue}); retry after some finish")
        for i, ids in enumerate(prompts):  # every prompt checked before any is queued
            eng.check_fits(eng.build(ids, raw=True, index=i), 0, i)
        ticket = Ticket(model, [], sum(map(len, prompts)), asyncio.Queue(), aio)
        for i, ids in enumerate(prompts):
            ticket.ids.append(eng.add_scored(ids[:1], ids[1:], params, raw=True))
            self._owner[model, ticket.ids[-1]] = (ticket, i)
        ticket.open = len(ticket.ids)
        return ticket

    def _abort(self, ticket: Ticket) -> None:
        eng = self.routers.get(ticket.model) or self.engines[ticket.model]
        for rid in ticket.ids:
            if self._owner.pop((ticket.model, rid), None) is not None:
                try:
                    eng.abort(rid)
                except ValueError:
                    pass  # finished in the meantime

    def _step(self, name: str, eng: Engine, idle: bool = False) -> None:
        """One engine step and its outputs to their tickets; ``idle``: no step, only the
        router's reward calls in flight (waited for briefly, so commands still get in)."""
        router = self.routers.get(name)
        try:  # a search's reward model runs in feed() (or on the router's scorer thread)
            args = router.step_args() if router is not None and not idle else {}
            outs = [] if idle else eng.step(**args)
            if router is None:
                pairs = [(o, None) for o in outs]
            else:  # every sequence held for its score (or none left): wait rather than spin
                stalled = idle or (not outs and eng.num_running() == len(args.get("hold", ())))
                pairs = router.feed(outs, wait=0.05 if stalled else 0.0)
        except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the loop
            log.exception("engine %s: step failed", name)
            self.error = exc
            self._fail_all(name, eng, exc)
            return
        self.steps += not idle
        now = time.perf_counter()
        by_ticket: dict[int, tuple[Ticket, list[Event]]] = {}
        m = self.metrics
        while m is not None and router is not None and router.reward_times:  # (its thread's
            m.reward.labels(name).observe(router.reward_times.popleft())     # calls too)
        for out, result in pairs:
            owner = self._owner.get((name, out.request_id))
            if owner is None:
                continue
            ticket, choice = owner
            ev = Event(choice, out)
            if m is not None and out.token_id >= 0:
                m.generation_tokens.labels(name).inc()
                prev = ticket.last.get(choice)
                if prev is None:
                    m.ttft.labels(name).observe(now - ticket.created)
                else:
                    m.itl.labels(name).observe(now - prev)
            ticket.last[choice] = now
            if out.finish_reason:
                ev.result = result if router is not None else eng.pop_result(out.request_id)
                del self._owner[name, out.request_id]
                ticket.open -= 1
                if ticket.open == 0 and m is not None:
                    m.e2e.labels(name).observe(now - ticket.created)
            by_ticket.setdefault(id(ticket), (ticket, []))[1].append(ev)
        for ticket, events in by_ticket.values():
            ticket.aio.call_soon_threadsafe(ticket.events.put_nowait, events)
        if m is not None:
            m.queue_depth.labels(name).set(self._waiting(name))
            m.running.labels(name).set(eng.num_running())

    def _fail_all(self, name: str, eng: Engine, exc: BaseException) -> None:
        tickets = {id(t): t for (model, _), (t, _) in self._owner.items() if model == name}
        for t in tickets.values():
            self._abort(t)
            t.aio.call_soon_threadsafe(t.events.put_nowait, exc)
