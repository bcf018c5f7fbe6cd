"""The OpenAI-compatible HTTP app (FastAPI) over one :class:`~.loop.EngineLoop`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON or server-sent events in
OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus). Every error is answered in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from safedecode.engine import Engine, GenerationResult, SamplingParams
from safedecode.engine.engine import ContextTooLong
from safedecode.engine.scheduler import QueueFull

from .loop import EngineLoop, Ticket
from .metrics import Metrics
from .protocol import (
    FINISH,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    chat_logprobs,
    completion_logprobs,
    new_id,
    now,
    usage,
)


def replica_id() -> str:
    """``host:pid`` of this server process (the ``x-safedecode-replica`` response header)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class ServedModel:
    """One model id (``base:method``) served by one engine."""

    id: str
    engine: Engine
    info: dict = field(default_factory=dict)
    router: Any = None  # a methods.route.Router or deal.Searcher: the engine runs a search

    @property
    def sequences_per_answer(self) -> int:
        """Sequences one answer holds at once (a routed answer two, a DeAL answer up to
        ``beam x (k + propose)``)."""
        return 1 if self.router is None else self.router.spec.sequences_per_request

    @property
    def max_choices(self) -> int:
        """Choices one request may ask for (``n``)."""
        return self.engine.state.max_seqs // self.sequences_per_answer


@dataclass
class ServerConfig:
    api_key: str | None = None
    request_timeout: float = 600.0  # seconds per request, queueing included
    default_max_tokens: int = 256  # chat requests without max_tokens (capped by the context)


# request fields whose errors found at admission (the model's vocabulary, the method) name them
_PARAM_FIELDS = {"logit_bias", "top_logprobs", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "echo", "min_tokens", "bad_words", "allowed_token_ids"}


def _one(top):
    """One streamed token's best tokens as the per-token list the logprobs builders take."""
    return None if top is None else [top]


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def create_app(models: list[ServedModel], config: ServerConfig | None = None) -> FastAPI:
    """The app; its lifespan starts the engine loop and stops it after uvicorn has drained
    in-flight requests (SIGTERM)."""
    cfg = config or ServerConfig()
    if not models:
        raise ValueError("models: serve at least one model")
    by_id = {m.id: m for m in models}
    if len(by_id) != len(models):
        raise ValueError("models: duplicate model ids")
    metrics = Metrics()
    loop = EngineLoop({m.id: m.engine for m in models}, metrics,
                      {m.id: m.router for m in models if m.router is not None})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start()
        try:
            yield
        finally:
            loop.stop()

    app = FastAPI(title="safedecode", lifespan=lifespan)
    app.state.loop, app.state.metrics, app.state.models = loop, metrics, by_id

    # -- errors in OpenAI's shape ----------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        _count(request, f"http_{exc.status}")
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            param, msg = None, "the body is not valid JSON"
        _count(request, "http_400")
        return _error_response(APIError(400, f"{param}: {msg}" if param else msg, param=param,
                                        code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    def _count(request: Request, outcome: str) -> None:
        model = getattr(request.state, "model", None)
        if model is not None:
            metrics.requests.labels(model, outcome).inc()

    replica = replica_id()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if cfg.api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
                response = _error_response(APIError(
                    401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                    code="invalid_api_key"))
                response.headers["x-safedecode-replica"] = replica
                return response
        response = await call_next(request)
        response.headers["x-safedecode-replica"] = replica
        return response

    # -- helpers -----------------------------------------------------------------------------
    def _model(name: str, request: Request) -> ServedModel:
        served = by_id.get(name)
        if served is None:
            raise APIError(404, f"model: {name!r} is not served here; GET /v1/models lists "
                                f"{sorted(by_id)}", type="not_found_error", param="model",
                           code="model_not_found")
        request.state.model = name
        return served

    async def _submit(served: ServedModel, prompts: list, params: SamplingParams, n: int,
                      raw: bool, fill: bool, score: bool = False) -> Ticket:
        if n > served.max_choices:
            per = served.sequences_per_answer
            routed = (f" / {per}: a {served.router.spec.name} answer holds {per} sequences"
                      if per > 1 else "")
            raise APIError(400, f"n: at most {served.max_choices} choices (the server's "
                                f"--max-seqs{routed})", param="n", code="invalid_value")
        if not loop.alive:
            raise APIError(503, "the engine loop is not running", type="server_error")
        try:
            return await asyncio.wrap_future(loop.submit(served.id, prompts, params, n, raw,
                                                         fill=fill, score=score))
        except QueueFull as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        except ValueError as exc:
            field = str(exc).partition(":")[0]
            if field in _PARAM_FIELDS:  # a parameter the model or method cannot honour
                raise APIError(400, str(exc), param=field, code="invalid_value") from None
            param = "prompt" if raw else "messages"
            msg = str(exc).replace("max_new_tokens", "max_tokens")
            code = "context_length_exceeded" if isinstance(exc, ContextTooLong) \
                else "invalid_value"
            raise APIError(400, f"{param}: {msg}", param=param, code=code) from None

    async def _next(ticket: Ticket, deadline: float, request: Request | None):
        """The ticket's next batch of events; polls for a client that went away (non-stream
        requests) and enforces the deadline."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                loop.abort(ticket)
                raise APIError(408, f"request timed out after {cfg.request_timeout:g} s "
                                    "(the server's --request-timeout)", type="timeout_error",
                               code="request_timeout")
            try:
                item = await asyncio.wait_for(ticket.events.get(), min(left, 0.5))
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    loop.abort(ticket)
                    raise asyncio.CancelledError from None
                continue
            if isinstance(item, BaseException):
                raise APIError(500, f"the engine failed: {item}", type="server_error")
            return item

    async def _collect(ticket: Ticket, request: Request) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(ticket.ids)
        deadline = time.monotonic() + cfg.request_timeout
        try:
            while any(r is None for r in results):
                for ev in await _next(ticket, deadline, request):
                    if ev.result is not None:
                        results[ev.choice] = ev.result
        except BaseException:
            loop.abort(ticket)
            raise
        bad = [r for r in results if r.finish_reason == "error"]
        if bad:
            raise APIError(500, bad[0].error or "generation failed", type="server_error")
        return results  # type: ignore[return-value]

    def _sse(obj) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    async def _stream(ticket: Ticket, chunk, final_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per choice per step with text (or a logprob), a last
        chunk per choice with its finish reason, usage if asked, then ``[DONE]``."""
        deadline = time.monotonic() + cfg.request_timeout
        open_, completion = len(ticket.ids), 0
        try:
            for c in range(len(ticket.ids)):
                first = chunk(c, "", None, None, True)
                if first is not None:
                    yield _sse(first)
            while open_:
                try:
                    events = await _next(ticket, deadline, None)
                except APIError as exc:
                    yield _sse(exc.body())
                    break
                for ev in events:
                    out = ev.output
                    if out.token_id >= 0:
                        completion += 1
                    reason = None
                    if ev.result is not None:
                        open_ -= 1
                        reason = FINISH.get(ev.result.finish_reason, "error")
                        if ev.result.finish_reason == "error":
                            yield _sse(APIError(500, ev.result.error or "generation failed",
                                                type="server_error").body())
                    lp = (out.token_id, out.logprob, out.top_logprobs) \
                        if out.logprob is not None else None
                    if out.text or lp is not None or reason:
                        yield _sse(chunk(ev.choice, out.text, lp, reason, False))
            if final_usage:
                yield _sse(chunk(None, "", None, None, False) | {
                    "choices": [], "usage": usage(ticket.prompt_tokens, completion)})
            yield "data: [DONE]\n\n"
        finally:
            if open_:
                loop.abort(ticket)

    def _streaming(gen: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- routes ------------------------------------------------------------------------------
    async def _answer(req, request: Request, ticket: Ticket, *, prefix: str, obj: str,
                      chunk_obj: str, choice, chunk_choice):
        """The response (JSON or SSE) around per-choice builders: ``choice(i, result)`` and
        ``chunk_choice(i, text, (token, logprob, top) | None, finish_reason, first) ->
        dict | None`` (``top``: the step's best ``(id, logprob)`` pairs, or None)."""
        rid, created = new_id(prefix), now()

        def envelope(kind: str, choices: list) -> dict:
            return {"id": rid, "object": kind, "created": created, "model": req.model,
                    "choices": choices}

        if req.stream:
            def chunk(c, text, lp, reason, first):
                if c is None:
                    return envelope(chunk_obj, [])
                ch = chunk_choice(c, text, lp, reason, first)
                return None if ch is None else envelope(chunk_obj, [ch])
            include = bool(req.stream_options and req.stream_options.include_usage)
            _count(request, "stream")
            return _streaming(_stream(ticket, chunk, include))
        results = await _collect(ticket, request)
        _count(request, "ok")
        body = envelope(obj, [choice(i, r) for i, r in enumerate(results)])
        body["usage"] = usage(ticket.prompt_tokens, sum(len(r.token_ids) for r in results))
        return body

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        served = _model(req.model, request)
        msgs = req.prompt()
        params = req.params(cfg.default_max_tokens)
        fill = req.max_tokens is None and req.max_completion_tokens is None
        ticket = await _submit(served, [msgs], params, req.n, raw=False, fill=fill)
        tok = served.engine.tok

        def choice(i, r):
            return {"index": i, "message": {"role": "assistant", "content": r.text},
                    "logprobs": chat_logprobs(tok, r.token_ids, r.logprobs, r.top_logprobs)
                    if req.logprobs else None,
                    "finish_reason": FINISH.get(r.finish_reason, "stop")}

        def chunk_choice(c, text, lp, reason, first):
            delta = {"role": "assistant", "content": ""} if first else (
                {"content": text} if text or not reason else {})
            return {"index": c, "delta": delta, "finish_reason": reason,
                    "logprobs": chat_logprobs(tok, [lp[0]], [lp[1]], _one(lp[2]))
                    if lp else None}

        return await _answer(req, request, ticket, prefix="chatcmpl", obj="chat.completion",
                             chunk_obj="chat.completion.chunk", choice=choice,
                             chunk_choice=chunk_choice)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        served = _model(req.model, request)
        prompts = req.prompts()
        params = req.params(cfg.default_max_tokens)
        if req.echo:
            return await _echo(req, request, served, prompts, params)
        ticket = await _submit(served, prompts, params, req.n, raw=True,
                               fill=req.max_tokens is None)
        tok = served.engine.tok

        def choice(i, r):
            return {"index": i, "text": r.text,
                    "logprobs": completion_logprobs(tok, r.token_ids, r.logprobs,
                                                    r.top_logprobs)
                    if req.logprobs is not None else None,
                    "finish_reason": FINISH.get(r.finish_reason, "stop")}

        def chunk_choice(c, text, lp, reason, first):
            if first:
                return None
            return {"index": c, "text": text, "finish_reason": reason,
                    "logprobs": completion_logprobs(tok, [lp[0]], [lp[1]], _one(lp[2]))
                    if lp else None}

        return await _answer(req, request, ticket, prefix="cmpl", obj="text_completion",
                             chunk_obj="text_completion", choice=choice,
                             chunk_choice=chunk_choice)

    async def _echo(req: CompletionRequest, request: Request, served: ServedModel,
                    prompts: list, params: SamplingParams) -> dict:
        """``echo``: each prompt, tokenised once, scored under the method (its tokens after
        the first, as :meth:`Engine.add_scored` does), then continued from those ids unless
        ``max_tokens`` is 0; the prompt's log-probs lead the choice's (the first ``None``)."""
        eng = served.engine
        tok = eng.tok
        ids = [p if isinstance(p, list) else eng.builder.encode(p, first=True, raw=True)
               for p in prompts]
        # the prompt is scored only when log-probs are asked (else echo is the text alone)
        longer = [x for x in ids if len(x) > 1] if req.logprobs is not None else []
        scored = []
        if longer:
            scored = await _collect(await _submit(served, longer, params, 1, raw=True,
                                                  fill=False, score=True), request)
        gen = None
        if not req.scores_only:
            gen = await _collect(await _submit(served, ids, params, req.n, raw=True,
                                               fill=req.max_tokens is None), request)
        it = iter(scored)
        choices, completion = [], 0
        for i, (p, x) in enumerate(zip(prompts, ids, strict=True)):
            s = next(it) if len(x) > 1 and longer else None
            lps = [None, *(s.logprobs if s else [])]
            tops = [None, *(s.top_logprobs or [] if s else [])] if params.top_logprobs else None
            head = p if isinstance(p, str) else tok.decode(x)
            for c in range(req.n):
                g = gen[i * req.n + c] if gen is not None else None
                out_ids = x + (g.token_ids if g else [])
                logprobs = None
                if req.logprobs is not None:
                    logprobs = completion_logprobs(
                        tok, out_ids, lps + ((g.logprobs or []) if g else []),
                        None if tops is None else tops + ((g.top_logprobs or []) if g else []))
                completion += len(g.token_ids) if g else 0
                choices.append({"index": len(choices), "text": head + (g.text if g else ""),
                                "logprobs": logprobs,
                                "finish_reason": FINISH.get(g.finish_reason, "stop")
                                if g else "length"})
        _count(request, "ok")
        return {"id": new_id("cmpl"), "object": "text_completion", "created": now(),
                "model": req.model, "choices": choices,
                "usage": usage(sum(map(len, ids)), completion)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [ModelCard(id=m.id, safedecode=m.info).model_dump()
                                           for m in models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        served = _model(model_id, request)
        return ModelCard(id=served.id, safedecode=served.info).model_dump()

    @app.get("/health")
    async def health():
        if not loop.alive:
            return JSONResponse({"status": "engine loop stopped"}, status_code=503)
        occ, cache = await asyncio.wrap_future(loop.call(lambda: (
            {mid: {"running": e.num_running(), "waiting": e.num_waiting(),
                   "free_slots": e.state.free_slots} for mid, e in loop.engines.items()},
            # prefix KV: stored prefixes, the columns the model computed for them, and the
            # finished chat turns kept for their next turn
            {mid: {"prefixes": len(e.runner.prefixes),
                   "computed_tokens": e.runner.prefixes.computed_tokens,
                   "turns": len(e.runner.turns)} for mid, e in loop.engines.items()})))
        return {"status": "ok", "steps": loop.steps, "models": occ, "prefix_cache": cache}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
