"""The decoding methods by name: ``safedecode.methods.get("acd-text", alpha=0.5)``.

Each method is branches + the fused op's rule (see :class:`safedecode.engine.branches.Method`).
"""

from __future__ import annotations

from collections.abc import Callable

from safedecode.engine.branches import Branch, Method, contrastive, plain

from . import prompts


def safe_prompt(system: str = prompts.SAFEGUARD) -> Method:
    """One branch with a safety system prompt (the usual baseline)."""
    return Method("safe-prompt", (Branch(system=system, name="safe"),), (1.0,))


def acd_text(alpha: float = 0.5, beta: float = 0.0, safeguard: str = prompts.SAFEGUARD,
             adversarial: str = prompts.ADVERSARIAL) -> Method:
    """ACD with text prompts (no optimisation): ``s = lp_SP - alpha * lp_AP``, anchor SP."""
    return contrastive((Branch(system=safeguard, name="SP"), Branch(system=adversarial, name="AP")),
                       (1.0, -alpha), beta=beta, name="acd-text")


def self_cd(alpha: float = 2.5, beta: float = 0.0,
            safety_prompt: str = prompts.SAFETY_EMPHASIS) -> Method:
    """Self-CD: ``s = lp_p - alpha (lp_p - lp_0) = (1 - alpha) lp_p + alpha lp_0``, anchor p.

    Branch p has the safety-emphasis system prompt, branch 0 none (the template's default).
    """
    return contrastive((Branch(system=safety_prompt, name="p"), Branch(name="0")),
                       (1.0 - alpha, alpha), beta=beta, name="self-cd")


REGISTRY: dict[str, Callable[..., Method]] = {
    "plain": plain,
    "safe-prompt": safe_prompt,
    "acd-text": acd_text,
    "self-cd": self_cd,
}


def get(name: str, **kwargs) -> Method:
    """Build a method by name; unknown names and bad arguments raise ValueError."""
    if name not in REGISTRY:
        raise ValueError(f"method: unknown {name!r}; choose one of {sorted(REGISTRY)}")
    try:
        return REGISTRY[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"method {name!r}: {exc}") from exc


__all__ = ["get", "REGISTRY", "Method", "Branch", "plain", "contrastive", "safe_prompt",
           "acd_text", "self_cd"]
