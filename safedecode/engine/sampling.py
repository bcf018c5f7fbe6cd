"""Per-request decoding parameters, validated once when the request is added."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace


def _int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}: must be an integer >= {lo}, got {value!r}")
    return value


def _float(name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v) or v > hi or v < lo or (lo_open and v == lo):
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ValueError(f"{name}: must be in {rng}, got {value!r}")
    return v


MAX_TOP_LOGPROBS = 20  # OpenAI's bound


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. Requests with different parameters share one batch.

    ``temperature`` 0 is greedy (lowest token id on ties); ``top_k`` 0, ``top_p`` 1 and ``min_p``
    0 are off. ``seed`` keys the counter-based draw (None: a random seed when the request is
    added); the same seed gives the same tokens whatever else is in the batch. ``stop``: strings
    that end the request (cut from its text, never streamed; kept at its end with
    ``include_stop_str_in_output``); ``stop_token_ids``: ids that end it (kept in
    ``token_ids``). ``skip_special_tokens`` (default True): special tokens are left out of the
    text (the end tokens always are). ``ignore_eos`` keeps decoding past end-of-sequence tokens.
    ``logprobs`` records each chosen token's log-probability under the final distribution;
    ``top_logprobs`` (with ``logprobs``, at most :data:`MAX_TOP_LOGPROBS`) also records that
    many most likely tokens of it at each step, with their log-probabilities (fewer where the
    final set — after the plausibility mask, top-k, top-p and min-p — is smaller).
    ``repetition_penalty`` (transformers' / vLLM's, > 0, 1 = off) divides the positive logits
    of tokens already in a branch's context (its prompt and the answer so far) by itself and
    multiplies the negative ones, on every branch's logits; then ``logit_bias`` (``{token id:
    bias in [-100, 100]}``) is added and ``presence_penalty`` / ``frequency_penalty``
    (OpenAI's, in [-2, 2]) subtract that much once a token has been generated / per time it has
    been generated — to the method's final score, and to the anchor branch the plausibility
    mask reads (the union rule: to both branches; see
    :func:`~safedecode.engine.step.adjust_coefficients`).

    Tokens can be banned outright (vLLM's names; excluded from the method's final
    distribution, and from the anchor the plausibility mask reads, so the mask keeps tokens
    near the best *allowed* one): ``min_tokens`` bans the request's end tokens (EOS unless
    ``ignore_eos``, ``stop_token_ids``) and turns off its stop strings until that many tokens
    are generated; ``bad_words`` (strings, tokenised by the engine with and without a leading
    space, as vLLM does) and ``bad_words_ids`` (token-id sequences, transformers' form) ban a
    word's last token wherever the tokens before it end the context (the prompt of the
    method's anchor branch and the answer); ``allowed_token_ids`` bans every other token;
    ``no_repeat_ngram_size`` n (transformers') bans every token that would repeat an n-gram of
    that context. ``sequence_bias`` (transformers': ``{token ids: bias}`` or ``[[ids, bias],
    ...]``, a finite bias) adds the bias to a sequence's last token wherever the tokens before
    it end that context (always, for one token), as ``logit_bias`` is added.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = field(default=())
    min_tokens: int = 0
    bad_words: tuple[str, ...] = field(default=())
    bad_words_ids: tuple[tuple[int, ...], ...] = field(default=())
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] = field(default=())
    allowed_token_ids: tuple[int, ...] | None = None
    no_repeat_ngram_size: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _int("max_new_tokens", self.max_new_tokens, 1)
        _float("temperature", self.temperature, 0.0, 1e4)
        _int("top_k", self.top_k, 0)
        _float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _float("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _int("seed", self.seed, 0)
            if self.seed >= 2**63:
                raise ValueError(f"seed: must be < 2**63, got {self.seed}")
        if isinstance(self.stop, str) or not isinstance(self.stop, Sequence):
            raise ValueError(f"stop: expected a sequence of strings, got {self.stop!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop: expected non-empty strings, got {s!r}")
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids,
                                                                           Sequence):
            raise ValueError(f"stop_token_ids: expected a sequence of token ids, got "
                             f"{self.stop_token_ids!r}")
        for t in self.stop_token_ids:
            _int("stop_token_ids", t, 0)
        for name in ("logprobs", "ignore_eos", "include_stop_str_in_output",
                     "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be True or False, got {getattr(self, name)!r}")
        _int("top_logprobs", self.top_logprobs, 0)
        if self.top_logprobs > MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs: must be <= {MAX_TOP_LOGPROBS}, got "
                             f"{self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=True (return_logprobs=True in "
                             "generate)")
        _float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _float("repetition_penalty", self.repetition_penalty, 0.0, 100.0, lo_open=True)
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        _int("min_tokens", self.min_tokens, 0)
        _int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        if self.min_tokens > self.max_new_tokens:
            raise ValueError(f"min_tokens: must be <= max_new_tokens ({self.max_new_tokens}), "
                             f"got {self.min_tokens}")
        object.__setattr__(self, "bad_words", _strings("bad_words", self.bad_words))
        object.__setattr__(self, "bad_words_ids", _id_lists("bad_words_ids",
                                                            self.bad_words_ids))
        object.__setattr__(self, "sequence_bias", _sequence_bias(self.sequence_bias))
        if self.allowed_token_ids is not None:
            allowed = _ids("allowed_token_ids", self.allowed_token_ids)
            if not allowed:
                raise ValueError("allowed_token_ids: expected at least one token id (None: "
                                 "every token)")
            object.__setattr__(self, "allowed_token_ids", tuple(sorted(set(allowed))))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @classmethod
    def from_kwargs(cls, *, stop: Sequence[str | int] | None = None, return_logprobs=None,
                    **kw) -> SamplingParams:
        """Build from ``generate()``-style keywords: ``stop`` mixes strings and token ids,
        ``return_logprobs`` is ``logprobs``. Unknown keywords are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: not a decoding parameter (expected one of "
                             f"{sorted(known | {'return_logprobs'})})")
        if return_logprobs is not None:
            kw["logprobs"] = return_logprobs
        strings, ids = [], []
        if stop is not None and (isinstance(stop, str) or not isinstance(stop, Sequence)):
            raise ValueError(f"stop: expected a list of strings or token ids, got {stop!r}")
        for s in stop or ():
            if isinstance(s, str) and s:
                strings.append(s)
            elif isinstance(s, int) and not isinstance(s, bool) and s >= 0:
                ids.append(s)
            else:
                raise ValueError(f"stop: expected non-empty strings or token ids, got {s!r}")
        return cls(stop=tuple(strings),
                   stop_token_ids=tuple(ids) + tuple(kw.pop("stop_token_ids", ())), **kw)

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or a logit bias change this request's logits."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0)

    def with_seed(self, seed: int) -> SamplingParams:
        return replace(self, seed=seed)


def _ids(name: str, ids) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"{name}: expected a list of token ids, got {ids!r}")
    return tuple(_int(name, t, 0) for t in ids)


def _id_lists(name: str, lists) -> tuple[tuple[int, ...], ...]:
    if isinstance(lists, (str, bytes)) or not isinstance(lists, Sequence):
        raise ValueError(f"{name}: expected a list of token-id lists, got {lists!r}")
    out = tuple(_ids(name, x) for x in lists)
    if any(not x for x in out):
        raise ValueError(f"{name}: expected non-empty token-id lists, got {lists!r}")
    return out


def _strings(name: str, words) -> tuple[str, ...]:
    if isinstance(words, str) or not isinstance(words, Sequence):
        raise ValueError(f"{name}: expected a list of strings, got {words!r}")
    for w in words:
        if not isinstance(w, str) or not w.strip():
            raise ValueError(f"{name}: expected non-blank strings, got {w!r}")
    return tuple(words)


def _logit_bias(bias) -> tuple[tuple[int, float], ...]:
    """``{token id: bias}`` (or its items) as sorted ``(id, bias)`` pairs, checked."""
    if isinstance(bias, Mapping):
        bias = list(bias.items())
    elif isinstance(bias, (str, bytes)) or not isinstance(bias, Sequence):
        raise ValueError(f"logit_bias: expected a mapping of token ids to biases, got {bias!r}")
    out: dict[int, float] = {}
    for item in bias:
        if not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError(f"logit_bias: expected (token id, bias) pairs, got {item!r}")
        t, b = item
        _int("logit_bias", t, 0)
        out[t] = _float(f"logit_bias[{t}]", b, -100.0, 100.0)
    return tuple(sorted(out.items()))


def _sequence_bias(bias) -> tuple[tuple[tuple[int, ...], float], ...]:
    """``{token ids: bias}`` or ``[[ids, bias], ...]`` as sorted ``(ids, bias)`` pairs, checked
    (a sequence given twice: its last bias)."""
    if isinstance(bias, Mapping):
        bias = list(bias.items())
    elif isinstance(bias, (str, bytes)) or not isinstance(bias, Sequence):
        raise ValueError(f"sequence_bias: expected a mapping of token-id sequences to biases, "
                         f"got {bias!r}")
    out: dict[tuple[int, ...], float] = {}
    for item in bias:
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError(f"sequence_bias: expected (token ids, bias) pairs, got {item!r}")
        ids, b = item
        ids = _ids("sequence_bias", ids)
        if not ids:
            raise ValueError("sequence_bias: expected non-empty token-id sequences")
        out[ids] = _float(f"sequence_bias[{list(ids)}]", b, -1e4, 1e4)
    return tuple(sorted(out.items()))
