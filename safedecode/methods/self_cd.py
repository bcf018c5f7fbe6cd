"""Self-CD (Navigating the OverKill): contrast a safety-emphasis prompt with no system prompt.

Over-refusal comes from the safety prompt's pull on harmless requests; subtracting the difference
``lp_p - lp_0`` removes it: ``s = lp_p - alpha (lp_p - lp_0) = (1 - alpha) lp_p + alpha lp_0``,
anchored on branch p (the plausibility mask follows the safety-prompted model).
"""

from __future__ import annotations

from safedecode.engine.branches import Branch, Method, contrastive

from . import prompts


def SelfCD(safety_prompt: str = prompts.SAFETY_EMPHASIS, alpha: float = 2.5,  # noqa: N802
           beta: float = 0.0) -> Method:
    """Self-CD over branches p (``safety_prompt``) and 0 (the template's default system prompt)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"alpha: must be a number, got {alpha!r}")
    if not isinstance(safety_prompt, str) or not safety_prompt.strip():
        raise ValueError("safety_prompt: must be a non-empty string")
    return contrastive((Branch(system=safety_prompt, name="p"), Branch(name="0")),
                       (1.0 - float(alpha), float(alpha)), beta=beta, name="self-cd")


def self_cd(alpha: float = 2.5, beta: float = 0.0,
            safety_prompt: str = prompts.SAFETY_EMPHASIS) -> Method:
    """Registry form of :func:`SelfCD`."""
    return SelfCD(safety_prompt, alpha, beta)
