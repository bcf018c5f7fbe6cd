"""Rewards for DeAL: batched, composable scorers ``(prompts, texts) -> scores``.

A reward takes the request prompts and the candidate texts (the text generated so far plus the
lookahead) and returns one float per pair. ``a + b`` and ``2.0 * a`` compose them (a weighted
sum, computed once per batch); :func:`make_reward` builds one from a short spec string, as the
CLI takes it.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Scores = list[float]


def timed(reward: Callable, prompts: Sequence[str], texts: Sequence[str],
          times: deque) -> Scores:
    """``reward(prompts, texts)``, its wall time appended to ``times`` (a deque, so a server's
    engine loop can drain it while a reward thread appends: its reward-call metric)."""
    t0 = time.perf_counter()
    try:
        return reward(prompts, texts)
    finally:
        times.append(time.perf_counter() - t0)


class Reward:
    """Base class: ``__call__(prompts, texts) -> scores``; ``+`` and ``*`` compose."""

    name = "reward"

    def __call__(self, prompts: Sequence[str], texts: Sequence[str]) -> Scores:
        raise NotImplementedError

    def key(self) -> str:
        """A stable identity (for caching evaluation results): the settings' repr."""
        return repr(self)

    def to(self, device) -> Reward:
        """Put the reward's model (if it has one) on ``device``; returns ``self``. A search on a
        model calls it with that model's device, so a GPU-served model's reward runs there."""
        return self

    def __add__(self, other: Reward) -> Weighted:
        return Weighted([(1.0, self), (1.0, _as_reward(other))])

    def __rmul__(self, weight: float) -> Weighted:
        return Weighted([(float(weight), self)])

    __mul__ = __rmul__


def _as_reward(obj) -> Reward:
    if isinstance(obj, Reward):
        return obj
    if callable(obj):
        return FunctionReward(obj)
    raise ValueError(f"reward: expected a Reward or a callable (prompts, texts) -> scores, "
                     f"got {type(obj).__name__}")


@dataclass
class Weighted(Reward):
    """``sum_i w_i * r_i(prompts, texts)``."""

    parts: list[tuple[float, Reward]] = field(default_factory=list)
    name = "weighted"

    def __post_init__(self) -> None:
        flat = []
        for w, r in self.parts:
            if not math.isfinite(w):
                raise ValueError(f"reward weight: must be finite, got {w}")
            if isinstance(r, Weighted):
                flat += [(w * w2, r2) for w2, r2 in r.parts]
            else:
                flat.append((w, _as_reward(r)))
        self.parts = flat

    def __call__(self, prompts, texts) -> Scores:
        total = [0.0] * len(texts)
        for w, r in self.parts:
            for i, s in enumerate(_check(r, r(prompts, texts), len(texts))):
                total[i] += w * s
        return total

    def key(self) -> str:
        return "+".join(f"{w!r}*{r.key()}" for w, r in self.parts)

    def to(self, device) -> Weighted:
        for _, r in self.parts:
            r.to(device)
        return self

    def __add__(self, other) -> Weighted:
        return Weighted([*self.parts, (1.0, _as_reward(other))])

    def __rmul__(self, weight: float) -> Weighted:
        return Weighted([(float(weight) * w, r) for w, r in self.parts])

    __mul__ = __rmul__


def _check(reward: Reward, scores, n: int) -> Scores:
    scores = list(scores)
    if len(scores) != n:
        raise ValueError(f"reward {reward.name!r}: returned {len(scores)} scores for {n} texts")
    out = [float(s) for s in scores]
    for s in out:
        if not math.isfinite(s):
            raise ValueError(f"reward {reward.name!r}: returned a non-finite score {s}")
    return out


@dataclass
class FunctionReward(Reward):
    """Any Python callable ``(prompts, texts) -> scores``."""

    fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]]
    name = "function"

    def __call__(self, prompts, texts) -> Scores:
        return _check(self, self.fn(list(prompts), list(texts)), len(texts))

    def key(self) -> str:
        import hashlib

        code = getattr(self.fn, "__code__", None)
        digest = hashlib.sha256(code.co_code).hexdigest()[:12] if code is not None else ""
        return f"function:{getattr(self.fn, '__qualname__', type(self.fn).__name__)}:{digest}"


@dataclass
class Keywords(Reward):
    """+1 per ``include`` keyword present, -1 per ``exclude`` keyword present (case-
    insensitive, whole words)."""

    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    name = "keywords"

    def __post_init__(self) -> None:
        if not self.include and not self.exclude:
            raise ValueError("keywords reward: give include and/or exclude keywords")
        self._inc = [re.compile(rf"\b{re.escape(k)}\b", re.I) for k in self.include]
        self._exc = [re.compile(rf"\b{re.escape(k)}\b", re.I) for k in self.exclude]

    def __call__(self, prompts, texts) -> Scores:
        return [float(sum(bool(p.search(t)) for p in self._inc)
                      - sum(bool(p.search(t)) for p in self._exc)) for t in texts]


@dataclass
class Length(Reward):
    """``-|words - target| / target``: 0 at the target length, lower away from it."""

    target: int = 64
    name = "length"

    def __post_init__(self) -> None:
        if self.target < 1:
            raise ValueError(f"length reward: target must be >= 1, got {self.target}")

    def __call__(self, prompts, texts) -> Scores:
        return [-abs(len(t.split()) - self.target) / self.target for t in texts]


@dataclass
class ClassifierReward(Reward):
    """A sequence-classification model's score of ``label`` (log-probability), on the prompt
    and the text as the model's pair input; ``model`` a local folder or an
    ``safedecode.judges``-style loaded (model, tokenizer) pair."""

    path: str
    label: int = 1
    batch_size: int = 16
    name = "classifier"

    def key(self) -> str:
        return f"classifier:{self.path}:{self.label}"

    def __post_init__(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModelForSequenceClassification.from_pretrained(self.path).eval()
        except OSError as exc:
            raise ValueError(f"classifier reward: cannot load {self.path!r} offline ({exc})"
                             ) from exc
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token

    def to(self, device) -> ClassifierReward:
        self.model.to(device)
        return self

    def __call__(self, prompts, texts) -> Scores:
        import torch

        out: Scores = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(list(prompts[i:i + self.batch_size]),
                           list(texts[i:i + self.batch_size]), return_tensors="pt",
                           padding=True, truncation=True, max_length=512
                           ).to(self.model.device)
            with torch.no_grad():
                logits = self.model(**enc).logits.float()
            if logits.shape[-1] == 1:  # a reward model's scalar head
                out += logits[:, 0].tolist()
            else:
                out += logits.log_softmax(-1)[:, self.label].tolist()
        return out


def make_reward(spec: str | Reward | Callable) -> Reward:
    """A reward from a spec: ``keywords:include=a|b:exclude=c``, ``length:target=64``,
    ``classifier:path=DIR[:label=1]``, ``harmless[:path=DIR][:keep=N]`` (the harmlessness
    reward model, :mod:`.harmless`; the shipped one for the default model; ``keep``: prompts
    whose scored prefix stays stored across calls, 32 by default, 0 for none), several joined
    with ``+`` and weighted with ``W*`` (``2*keywords:...``) — or a :class:`Reward` / callable
    as it is."""
    if not isinstance(spec, str):
        return _as_reward(spec)
    parts = [p.strip() for p in spec.split("+") if p.strip()]
    if not parts:
        raise ValueError("reward: empty spec")
    rewards = []
    for raw in parts:
        weight, body = 1.0, raw
        m = re.match(r"^([-+]?[0-9.]+(?:e[-+]?[0-9]+)?)\*(.*)$", raw)
        if m:
            weight, body = float(m.group(1)), m.group(2)
        name, *opts = body.split(":")
        kw: dict[str, str] = {}
        for o in opts:
            if "=" not in o:
                raise ValueError(f"reward {name!r}: expected key=value, got {o!r}")
            k, v = o.split("=", 1)
            kw[k] = v
        rewards.append((weight, _one(name, kw)))
    return rewards[0][1] if len(rewards) == 1 and rewards[0][0] == 1.0 else Weighted(rewards)


def _one(name: str, kw: dict[str, str]) -> Reward:
    def split(v: str | None) -> list[str]:
        return [x for x in (v or "").split("|") if x]

    try:
        if name == "keywords":
            _only(name, kw, {"include", "exclude"})
            return Keywords(split(kw.get("include")), split(kw.get("exclude")))
        if name == "length":
            _only(name, kw, {"target"})
            return Length(int(kw.get("target", 64)))
        if name == "harmless":
            _only(name, kw, {"path", "keep"})
            from .harmless import harmlessness_reward

            keep = kw.get("keep")
            if keep is not None and not keep.isdigit():
                raise ValueError(f"reward 'harmless': keep= is how many prompts' prefixes to "
                                 f"store across calls (an integer >= 0), got {keep!r}")
            return harmlessness_reward(kw.get("path"),
                                       **({} if keep is None else {"keep_prefixes": int(keep)}))
        if name == "classifier":
            _only(name, kw, {"path", "label"})
            if "path" not in kw:
                raise ValueError("classifier reward: needs path=DIR")
            return ClassifierReward(kw["path"], int(kw.get("label", 1)))
    except (TypeError, ValueError) as exc:
        if str(exc).startswith(("reward", "keywords", "length", "classifier", "harmless")):
            raise
        raise ValueError(f"reward {name!r}: {exc}") from exc
    raise ValueError(f"reward: unknown {name!r}; choose keywords, length, classifier or "
                     "harmless")


def _only(name: str, kw: dict, allowed: set[str]) -> None:
    bad = sorted(set(kw) - allowed)
    if bad:
        raise ValueError(f"reward {name!r}: unknown option {bad[0]!r} (expected one of "
                         f"{sorted(allowed)})")
