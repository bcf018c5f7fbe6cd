"""The decoding methods by name: ``safedecode.methods.get("acd-text", alpha=0.5)``.

Each method is branches + the fused op's rule (see :class:`safedecode.engine.branches.Method`).
"""

from __future__ import annotations

from collections.abc import Callable

from safedecode.engine.branches import Branch, Method, contrastive, plain

from . import prompts
from .acd import ACD, acd, acd_sp, acd_text
from .deal import DeAL, deal
from .route import Route, route
from .safeinfer import safeinfer, safeinfer_sa, safeinfer_sgds
from .self_cd import SelfCD, self_cd, self_cd_sp


def safe_prompt(system: str = prompts.SAFEGUARD) -> Method:
    """One branch with a safety system prompt (the usual baseline)."""
    return Method("safe-prompt", (Branch(system=system, name="safe"),), (1.0,))


REGISTRY: dict[str, Callable[..., Method]] = {
    "plain": plain,
    "safe-prompt": safe_prompt,
    "acd": acd,
    "acd-text": acd_text,
    "acd-sp": acd_sp,
    "self-cd": self_cd,
    "self-cd-sp": self_cd_sp,
    "safeinfer": safeinfer,
    "safeinfer-sa": safeinfer_sa,
    "safeinfer-sgds": safeinfer_sgds,
    "deal": deal,
    "route": route,
}


def get(name: str, **kwargs) -> Method | DeAL | Route:
    """Build a method by name; unknown names and bad arguments raise ValueError. ``deal``
    returns a :class:`DeAL` search and ``route`` a :class:`Route` around a base method
    (``SafeDecoder`` runs any of them)."""
    if name not in REGISTRY:
        raise ValueError(f"method: unknown {name!r}; choose one of {sorted(REGISTRY)}")
    try:
        return REGISTRY[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"method {name!r}: {exc}") from exc


__all__ = ["get", "REGISTRY", "Method", "Branch", "plain", "contrastive", "safe_prompt",
           "ACD", "acd", "acd_text", "acd_sp", "SelfCD", "self_cd", "self_cd_sp", "DeAL", "deal",
           "Route", "route",
           "safeinfer", "safeinfer_sa", "safeinfer_sgds"]
