"""OpenAI's request and response shapes for ``/v1/chat/completions`` and ``/v1/completions``.

Requests are pydantic models: fields that would change what the answer is — tool calling, a
structured ``response_format``, audio — are a 400 naming them (answering them with free text
would break the client silently); other unknown fields (``user``, ``metadata``, ``store``, ...)
are ignored, as vLLM does. Each request turns into a prompt and a :class:`SamplingParams` with
:meth:`sampling_params`, raising :class:`APIError` (400, naming the parameter) for values the
engine cannot honour. vLLM's extra sampling fields (``top_k``, ``min_p``, ``ignore_eos``,
``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``bad_words``,
``allowed_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens``) are accepted
as extra body fields, as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from safedecode.engine import SamplingParams


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_param(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept to be checked (_refuse_output_changes)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # safedecode / vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool = False
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def _refuse_output_changes(self) -> None:
        """A 400 for a field asking for output safedecode does not produce."""
        extra = self.model_extra or {}
        for name in ("tools", "functions", "audio", "prediction"):
            if extra.get(name):
                raise bad_param(name, "not supported by safedecode (text generation only)")
        for name in ("tool_choice", "function_call"):
            if extra.get(name) not in (None, "none"):
                raise bad_param(name, "not supported by safedecode (text generation only)")
        fmt = extra.get("response_format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
            raise bad_param("response_format", "only {\"type\": \"text\"} is supported "
                                               "(no JSON mode or schema)")
        modalities = extra.get("modalities")
        if modalities is not None and list(modalities) != ["text"]:
            raise bad_param("modalities", "only [\"text\"] is supported")

    def _logit_bias(self) -> dict[int, float]:
        """OpenAI's ``{"token id": bias}`` with integer ids."""
        out = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                out[int(key)] = value
            except ValueError:
                raise bad_param("logit_bias", f"keys are token ids, got {key!r}") from None
        return out

    def sampling_params(self, *, max_tokens: int | None, default_max_tokens: int,
                        logprobs: bool, top_logprobs: int = 0) -> SamplingParams:
        """The request's :class:`SamplingParams`; ``max_tokens`` None: ``default_max_tokens``."""
        self._refuse_output_changes()
        if isinstance(self.n, bool) or self.n < 1:
            raise bad_param("n", f"must be >= 1, got {self.n!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise bad_param("stop", f"at most 4 stop sequences, got {len(stop)}")
        if any(not s for s in stop):
            raise bad_param("stop", "stop sequences must be non-empty")
        kw: dict[str, Any] = {
            "max_new_tokens": default_max_tokens if max_tokens is None else max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": self.top_k or 0, "min_p": self.min_p or 0.0, "seed": self.seed,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "logit_bias": self._logit_bias(),
            "repetition_penalty": 1.0 if self.repetition_penalty is None
            else self.repetition_penalty,
            "stop": tuple(stop), "logprobs": logprobs, "top_logprobs": top_logprobs,
            "ignore_eos": self.ignore_eos, "min_tokens": self.min_tokens,
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "bad_words": tuple(self.bad_words or ()),
            "allowed_token_ids": None if self.allowed_token_ids is None
            else tuple(self.allowed_token_ids),
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens}
        names = {"max_new_tokens": "max_tokens"}
        try:
            return SamplingParams(**kw)
        except ValueError as exc:
            field, _, msg = str(exc).partition(": ")
            if "[" in field:  # logit_bias[id]: the parameter, the message naming the entry
                raise APIError(400, str(exc), param=field.split("[")[0],
                               code="invalid_value") from None
            param = names.get(field, field)
            raise bad_param(param, msg or str(exc)) from None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def prompt(self) -> list[dict]:
        """The messages as ``{"role", "content"}`` dicts (text parts joined)."""
        if not self.messages:
            raise bad_param("messages", "must be a non-empty list")
        out = []
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role
            if role not in ("system", "user", "assistant"):
                raise bad_param(f"messages[{i}].role",
                                f"{m.role!r} is not supported (system, developer, user, "
                                "assistant)")
            content = m.content
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise bad_param(f"messages[{i}].content[{j}]",
                                        "only text parts are supported")
                    parts.append(part["text"])
                content = "".join(parts)
            if content is None:
                raise bad_param(f"messages[{i}].content", "must be a string")
            out.append({"role": role, "content": content})
        return out

    def params(self, default_max_tokens: int) -> SamplingParams:
        top = self.top_logprobs or 0
        if top and not self.logprobs:
            raise bad_param("top_logprobs", "needs logprobs=true")
        mt = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        param = "max_completion_tokens" if self.max_completion_tokens is not None \
            else "max_tokens"
        try:
            return self.sampling_params(max_tokens=mt, default_max_tokens=default_max_tokens,
                                        logprobs=self.logprobs, top_logprobs=top)
        except APIError as exc:
            if exc.param == "max_tokens":
                exc.param = param
                exc.message = exc.message.replace("max_tokens", param, 1)
            raise


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    max_tokens: int | None = 16  # OpenAI's default for completions

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s): strings, or token ids (one list, or a list of lists)."""
        p = self.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
            p = [p]
        if not p or not all(isinstance(x, str) or (isinstance(x, list) and x and all(
                isinstance(t, int) for t in x)) for x in p):
            raise bad_param("prompt", "expected a string, a list of strings, token ids or a "
                                      "list of token id lists (none empty)")
        for i, x in enumerate(p):
            if isinstance(x, str) and not x.strip():
                raise bad_param("prompt", f"prompt {i} is empty")
        return list(p)

    @property
    def scores_only(self) -> bool:
        """``echo`` with ``max_tokens`` 0: the prompt's log-probs, nothing generated."""
        return self.echo and self.max_tokens == 0

    def params(self, default_max_tokens: int) -> SamplingParams:
        if self.echo and self.stream:
            raise bad_param("echo", "not supported with stream")
        if self.suffix:
            raise bad_param("suffix", "not supported")
        if self.best_of not in (None, 1) and self.best_of != self.n:
            raise bad_param("best_of", "not supported (only best_of == n)")
        try:
            return self.sampling_params(max_tokens=1 if self.scores_only else self.max_tokens,
                                        default_max_tokens=default_max_tokens,
                                        logprobs=self.logprobs is not None,
                                        top_logprobs=self.logprobs or 0)
        except APIError as exc:  # completions name the number of alternatives `logprobs`
            if exc.param == "top_logprobs":
                exc.param = "logprobs"
                exc.message = exc.message.replace("top_logprobs", "logprobs", 1)
            raise


# -- responses ---------------------------------------------------------------------------------
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


Tops = list[list[tuple[int, float]]] | None  # per token: its step's best (id, log-prob)


def _token(tokenizer, t: int) -> str:
    return tokenizer.decode([t], skip_special_tokens=False)


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[float],
                  tops: Tops = None) -> dict:
    """Chat's ``logprobs`` object: each token with its log-prob and its step's best tokens."""
    content = []
    for i, (t, lp) in enumerate(zip(token_ids, logprobs, strict=False)):
        text = _token(tokenizer, t)
        best = []
        for u, ulp in (tops[i] if tops is not None and i < len(tops) else ()):
            utext = _token(tokenizer, u)
            best.append({"token": utext, "logprob": ulp, "bytes": list(utext.encode())})
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                        "top_logprobs": best})
    return {"content": content}


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[float],
                        tops: Tops = None) -> dict:
    """Completions' ``logprobs`` object (``top_logprobs``: per token ``{text: log-prob}``)."""
    tokens = [_token(tokenizer, t) for t in token_ids]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    best = None
    if tops is not None:
        best = [None if step is None else {_token(tokenizer, u): _finite(ulp) for u, ulp in step}
                for step in tops[:len(tokens)]]
    return {"tokens": tokens, "token_logprobs": [_finite(x) for x in logprobs[:len(tokens)]],
            "top_logprobs": best, "text_offset": offsets}


NEG_INF_LOGPROB = -9999.0  # JSON has no -inf: a token the method's distribution excludes


def _finite(lp: float | None) -> float | None:
    return NEG_INF_LOGPROB if lp == float("-inf") else lp


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "safedecode"
    safedecode: dict = Field(default_factory=dict)
