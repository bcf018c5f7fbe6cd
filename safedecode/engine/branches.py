"""Prompt branches and methods: what runs in each branch, and how their logits are combined.

A *branch* is the fixed part that differs between the K runs of a request: a system prompt (text),
no system prompt (``system=None``: the chat template's default), or a soft prompt (a ``[n, d]``
tensor of embeddings in the system prompt's place), plus optional effects that act on that
branch's rows only, inside the shared forward: forward hooks (SafeInfer's steering vector) and a
LoRA adapter (:mod:`.adapters`; SafeInfer's unsafe model). The user's messages are the same in
every branch.

A *method* is its branches plus the fused op's combination: ``rule``, ``weights``, ``anchor`` and
``beta`` (see :func:`safedecode.ops.contrastive_sample`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .adapters import LoraAdapter

HookFn = Callable[[torch.Tensor], torch.Tensor]


POSITIONS = ("all", "last", "first", "prompt")
STOPS = ("sentence",)


@dataclass(frozen=True)
class BranchHook:
    """Replace the output hidden states ``h`` of ``module`` (a dotted name inside the model, e.g.
    ``"model.layers.7"``) by ``fn(h)`` on this branch's rows only.

    ``positions="all"``: every position of every forward (the branch's prefix too: it changes the
    prefix KV). ``"last"``: only the positions being decoded, i.e. the last prompt token at
    prefill and the fed token at every step (``fn`` gets ``[rows, 1, d]``); the shared prefix is
    left alone. ``"first"``: only the last prompt token (the position that decodes the first new
    token). ``"prompt"``: the request's own prompt positions at prefill — the suffix after the
    branch's shared prefix (with prefix caching off the same positions, the rest of the prompt
    left alone); ``fn`` gets the row's whole padded prefill ``[rows, t, d]``, left-padded so the
    last position is the last prompt token, and only its output at those positions is kept. The
    steered states stay in the KV cache, so every later token attends to them. ``fn`` must not
    change the shape.

    ``gate`` (optional; not with ``"all"``): a condition judged once per request, at prefill, on
    this module's output at the last prompt token (``[rows, d]`` -> bool ``[rows]``); ``fn`` then
    acts only on the rows where it held, in that forward and every later one — the decision is
    kept with the request's rows (forks and batch changes keep it). Conditional activation
    steering: judge the request, steer every token of its answer. At most one gated hook per
    branch.

    ``window`` (``"last"`` only): act at the last prompt token and the positions that decode a
    request's first ``window`` new tokens, then no more — steer the start of an answer.

    ``stop="sentence"`` (gated hooks only; one per method): on the rows where the gate held,
    once the request has ``window`` new tokens (one without a window), the first token whose
    text ends a sentence (``.``, ``!`` or ``?``) is followed by the end-of-turn token: the
    flagged request's answer ends with its steered opening. The stop picks the token the
    request samples (DeAL's expanded and followed tokens are its own)."""

    module: str
    fn: HookFn
    positions: str = "all"
    gate: HookFn | None = None
    window: int | None = None
    stop: str | None = None

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"BranchHook.positions: expected one of {POSITIONS}, got "
                             f"{self.positions!r}")
        if self.gate is not None and (self.positions == "all" or not callable(self.gate)):
            raise ValueError("BranchHook.gate: a callable judged on each request's last prompt "
                             "token, so positions must not be 'all' (the shared prefix has "
                             f"no request); got positions={self.positions!r}")
        if self.window is not None and (isinstance(self.window, bool)
                                        or not isinstance(self.window, int) or self.window < 1
                                        or self.positions != "last"):
            raise ValueError("BranchHook.window: a number of new tokens >= 1 for a hook at the "
                             f"decoded positions (positions='last'); got window={self.window!r}"
                             f", positions={self.positions!r}")
        if self.stop is not None and (self.stop not in STOPS or self.gate is None):
            raise ValueError(f"BranchHook.stop: one of {STOPS} on a gated hook (it ends the "
                             f"answers of the requests the gate flags); got stop={self.stop!r}"
                             f"{'' if self.gate is not None else ' without a gate'}")


@dataclass(frozen=True, eq=False)
class Branch:
    """One prompt branch: ``system`` text, a ``soft_prompt`` [n, d], both (the text follows the
    soft prompt in the system message), or neither.

    ``fingerprint``: the :func:`safedecode.models.embedding_fingerprint` of the model a soft prompt
    was trained for; the engine refuses to run it on another model.
    """

    system: str | None = None
    soft_prompt: torch.Tensor | None = None
    name: str = ""
    hooks: tuple[BranchHook, ...] = field(default=())
    fingerprint: str | None = None
    trained_for: str = ""
    adapter: LoraAdapter | None = None

    def __post_init__(self) -> None:
        if self.adapter is not None and not isinstance(self.adapter, LoraAdapter):
            raise ValueError("Branch.adapter: expected a LoraAdapter (see "
                             f"safedecode.engine.adapters.load_lora), got "
                             f"{type(self.adapter).__name__}")
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError(f"Branch.system: expected a string or None, got {type(self.system)}")
        if self.soft_prompt is not None:
            sp = self.soft_prompt
            if not isinstance(sp, torch.Tensor) or sp.dim() != 2 or sp.shape[0] < 1:
                raise ValueError("Branch.soft_prompt: expected a [n, d] tensor with n >= 1")
            if not torch.isfinite(sp).all():
                raise ValueError("Branch.soft_prompt: contains NaN or inf")
            if self.system is not None and not self.system.strip():
                raise ValueError("Branch.system: empty text after a soft prompt; leave it None")
        if sum(h.gate is not None for h in self.hooks) > 1:
            raise ValueError("Branch.hooks: at most one gated hook per branch (its decision is "
                             "kept per row); combine the conditions into one gate function")

    @functools.cached_property
    def _key(self) -> str:
        h = hashlib.sha256()
        h.update(repr(self.system).encode())
        if self.soft_prompt is not None:
            sp = self.soft_prompt.detach().to("cpu", torch.float32).contiguous()
            h.update(str(tuple(sp.shape)).encode())
            h.update(sp.numpy().tobytes())
        for hook in self.hooks:  # all-position hooks change the prefix KV: part of its identity
            if hook.positions == "all":
                h.update(f"{hook.module}:{hook.positions}:{id(hook.fn)}".encode())
        if self.adapter is not None:
            h.update(f"adapter:{self.adapter.key()}".encode())
        return h.hexdigest()[:16]

    def key(self) -> str:
        """Content hash (computed once; soft prompts are not to be changed in place): equal
        branches share one prefix KV cache entry."""
        return self._key


@dataclass(frozen=True, eq=False)
class Method:
    """Branches + the combination rule of the fused op.

    ``contrast_gate`` (a branch index; optional): the contrast only for the requests whose
    gated hook on that branch held (or, without such a hook, whose caller said so:
    ``Engine.add_built(gates=...)``); the others decode from branch ``fallback`` alone (default:
    the anchor; a weight-0 branch such as the plain model works too): its logits take the
    anchor's place and the other weighted branches' logits are made uniform (linear rule, the
    anchor's weight 1) or the fallback's (union rule), so the op gives exactly the fallback's
    distribution."""

    name: str
    branches: tuple[Branch, ...]
    weights: tuple[float, ...]
    rule: str = "linear"
    anchor: int = 0
    beta: float = 0.0
    contrast_gate: int | None = None
    fallback: int | None = None

    def __post_init__(self) -> None:
        if not self.branches:
            raise ValueError(f"method {self.name!r}: needs at least one branch")
        if len(self.weights) != len(self.branches):
            raise ValueError(f"method {self.name!r}: {len(self.weights)} weights for "
                             f"{len(self.branches)} branches")
        if not 0 <= self.anchor < len(self.branches):
            raise ValueError(f"method {self.name!r}: anchor {self.anchor} out of range")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"method {self.name!r}: beta must be in [0, 1], got {self.beta}")
        g = self.contrast_gate
        if g is not None:
            if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < len(self.branches):
                raise ValueError(f"method {self.name!r}: contrast_gate must index a branch, got "
                                 f"{g!r}")
            fb = self.fallback
            if fb is not None and (isinstance(fb, bool) or not isinstance(fb, int)
                                   or not 0 <= fb < len(self.branches)):
                raise ValueError(f"method {self.name!r}: fallback must index a branch, got "
                                 f"{fb!r}")
            if self.rule == "linear" and self.weights[self.anchor] != 1.0:
                raise ValueError(f"method {self.name!r}: contrast_gate with the linear rule needs "
                                 f"the anchor's weight 1 (ungated requests then decode from the "
                                 f"anchor alone), got {self.weights[self.anchor]}")

    @property
    def k(self) -> int:
        return len(self.branches)

    def describe(self) -> str:
        parts = [f"{self.name}: K={self.k}, rule={self.rule}, weights={list(self.weights)}, "
                 f"anchor={self.anchor}, beta={self.beta}"
                 + (f", contrast gated by branch {self.contrast_gate} (else branch "
                    f"{self.anchor if self.fallback is None else self.fallback} alone)"
                    if self.contrast_gate is not None else "")]
        for i, b in enumerate(self.branches):
            text = (repr(b.system[:60] + ("..." if len(b.system) > 60 else ""))
                    if b.system is not None else None)
            what = ("soft prompt " + "x".join(map(str, b.soft_prompt.shape))
                    + (f" + {text}" if text else "")
                    if b.soft_prompt is not None else text or "template default")
            if b.adapter is not None:
                what += f" + LoRA adapter {b.adapter.name!r}"
            if b.hooks:
                what += " + hooks on " + ", ".join(
                    f"{h.module} ({h.positions}{', gated' if h.gate else ''}"
                    f"{f', window {h.window}' if h.window else ''}"
                    f"{f', {h.stop} stop' if h.stop else ''}: "
                    f"{getattr(h.fn, 'func', h.fn).__name__})"
                    for h in b.hooks)
            parts.append(f"  [{i}] {b.name or 'branch'}: {what}")
        return "\n".join(parts)


def plain(system: str | None = None) -> Method:
    """One branch, no contrast: ordinary sampling (with an optional system prompt)."""
    return Method("plain", (Branch(system=system, name="plain"),), (1.0,))


def contrastive(branches: Sequence[Branch], weights: Sequence[float], *, rule: str = "linear",
                anchor: int = 0, beta: float = 0.0, name: str = "contrastive") -> Method:
    """Generic contrastive decoding over any branches and weights."""
    return Method(name, tuple(branches), tuple(float(w) for w in weights), rule, anchor, beta)
