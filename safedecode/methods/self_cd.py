"""Self-CD (Navigating the OverKill): contrast a safety-emphasis prompt with no system prompt.

Over-refusal comes from the safety prompt's pull on harmless requests; subtracting the difference
``lp_p - lp_0`` removes it: ``s = lp_p - alpha (lp_p - lp_0) = (1 - alpha) lp_p + alpha lp_0``,
anchored on branch p (the plausibility mask follows the safety-prompted model).

Over an optimised safeguarding prompt (SP), ``self_cd_sp(contrast=...)`` picks branch 0:
``"plain"`` — no system prompt (the SP's pull that the plain model lacks is taken away, its
refusals of harmful requests included); ``"emphasis"`` — Self-CD's own construction over the
deployed SP: p = SP followed by a safety text, 0 = SP alone, α > 1, so only what the extra
emphasis adds is removed; ``"adapter"`` — the model with a LoRA adapter (e.g. TA-SFT) on its
rows. Measured on the embedded model: ``benchmarks/results/self_cd_*_s37/``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from safedecode.engine.branches import Branch, Method, contrastive

from . import prompts
from .prompts import SAFEGUARD


def SelfCD(safety_prompt: str | torch.Tensor | Branch = prompts.SAFETY_EMPHASIS,  # noqa: N802
           alpha: float = 2.5, beta: float = 0.0, *, name: str = "self-cd",
           base: Branch | None = None) -> Method:
    """Self-CD over branches p and 0 (``base``; default: the template's default system prompt).

    p is any branch: a text ``safety_prompt``, a ``[n, d]`` soft prompt, or a :class:`Branch`
    (e.g. ACD's optimised safeguarding prompt, :func:`self_cd_sp`)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"alpha: must be a number, got {alpha!r}")
    if isinstance(safety_prompt, Branch):
        p = safety_prompt
    elif isinstance(safety_prompt, torch.Tensor):
        p = Branch(soft_prompt=safety_prompt, name="p")
    elif isinstance(safety_prompt, str) and safety_prompt.strip():
        p = Branch(system=safety_prompt, name="p")
    else:
        raise ValueError("safety_prompt: must be non-empty text, a [n, d] soft prompt or a "
                         "Branch")
    if base is not None and not isinstance(base, Branch):
        raise ValueError(f"base: expected a Branch or None, got {type(base).__name__}")
    return contrastive((p, base if base is not None else Branch(name="0")),
                       (1.0 - float(alpha), float(alpha)), beta=beta, name=name)


def self_cd(alpha: float = 2.5, beta: float = 0.0,
            safety_prompt: str = prompts.SAFETY_EMPHASIS) -> Method:
    """Registry form of :func:`SelfCD` with a text safety prompt."""
    return SelfCD(safety_prompt, alpha, beta)


CONTRASTS = ("plain", "emphasis", "adapter")


def self_cd_sp(alpha: float | None = None, beta: float | None = None,
               prompts: str | Path | None = None, contrast: str = "plain",
               emphasis: str | None = None, adapter: str | Path | None = None) -> Method:
    """Self-CD whose p branch is an OPO-optimised safeguarding prompt (SP). ``prompts``: a file
    from ``safedecode optimize`` (default: the pair chosen for this method on validation for the
    embedded model, which may differ from ``acd``'s). ``contrast`` picks branch 0:

    - ``"plain"``: the plain model — it removes the part of SP's pull that the plain model does
      not share; ``alpha`` / ``beta`` default to the values chosen on the anchor validation split
      and recorded in the file (else 0.5 / 0).
    - ``"emphasis"``: p = SP followed by the ``emphasis`` system text (default: the standard
      safeguarding prompt), 0 = SP — Self-CD's own form over the SP (α > 1 extrapolates away
      from the emphasised branch); ``alpha`` / ``beta`` default to 2.5 / 0.
    - ``"adapter"``: the model with a LoRA ``adapter`` on branch 0's rows (a peft folder or a
      shipped name; default ``"ta-sft"``), in the same forward — the SP's pull that an aligned
      model does not share is removed; ``alpha`` / ``beta`` default to 0.5 / 0."""
    from safedecode.engine.adapters import load_lora
    from safedecode.models import shipped_adapter

    from .acd import SELF_CD_SP_PROMPTS, sp_branch

    if contrast not in CONTRASTS:
        raise ValueError(f"contrast: expected one of {CONTRASTS}, got {contrast!r}")
    for knob, value in (("emphasis", emphasis), ("adapter", adapter)):
        if value is not None and contrast != knob:
            raise ValueError(f"{knob}: only with contrast={knob!r} (the {contrast} form has no "
                             f"{knob} branch)")
    branch, p = sp_branch(SELF_CD_SP_PROMPTS if prompts is None else prompts)
    if contrast == "emphasis":
        emphasis = SAFEGUARD if emphasis is None else emphasis
        if not isinstance(emphasis, str) or not emphasis.strip():
            raise ValueError("emphasis: must be non-empty text")
        emphasised = dataclasses.replace(branch, system=emphasis, name="sp+emphasis")
        return SelfCD(emphasised, 2.5 if alpha is None else alpha, 0.0 if beta is None else beta,
                      name="self-cd-sp", base=branch)
    if contrast == "adapter":
        folder = shipped_adapter("ta-sft" if adapter is None else adapter)
        base = Branch(name=f"0+{Path(folder).name}", adapter=load_lora(folder, name="0"))
        return SelfCD(branch, 0.5 if alpha is None else alpha, 0.0 if beta is None else beta,
                      name="self-cd-sp", base=base)
    a = p.knob("self-cd-sp", "alpha", 0.5) if alpha is None else alpha
    b = p.knob("self-cd-sp", "beta", 0.0) if beta is None else beta
    return SelfCD(branch, a, b, name="self-cd-sp")
