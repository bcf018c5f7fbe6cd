"""The named methods build the branches, weights and anchors of their papers."""

from __future__ import annotations

import pytest

from safedecode import methods
from safedecode.methods import prompts


def test_registry_names():
    assert {"plain", "safe-prompt", "acd-text", "self-cd"} <= set(methods.REGISTRY)


def test_acd_text():
    m = methods.get("acd-text", alpha=0.7, beta=0.1)
    assert m.k == 2 and m.weights == (1.0, -0.7) and m.anchor == 0 and m.beta == 0.1
    assert m.rule == "linear"
    assert m.branches[0].system == prompts.SAFEGUARD
    assert m.branches[1].system == prompts.ADVERSARIAL


def test_self_cd():
    m = methods.get("self-cd")
    # s = lp_p - 2.5 (lp_p - lp_0) = -1.5 lp_p + 2.5 lp_0, anchored on the safety-prompt branch.
    assert m.weights == (-1.5, 2.5) and m.anchor == 0
    assert m.branches[0].system == prompts.SAFETY_EMPHASIS and m.branches[1].system is None


def test_plain_and_safe_prompt():
    assert methods.get("plain").k == 1 and methods.get("plain").branches[0].system is None
    assert methods.get("safe-prompt").branches[0].system == prompts.SAFEGUARD


def test_bad_method_definitions():
    from safedecode.engine import Branch, Method

    with pytest.raises(ValueError, match="weights"):
        Method("x", (Branch(),), (1.0, 2.0))
    with pytest.raises(ValueError, match="anchor"):
        Method("x", (Branch(),), (1.0,), anchor=1)
    with pytest.raises(ValueError, match="beta"):
        Method("x", (Branch(),), (1.0,), beta=2.0)
    with pytest.raises(ValueError, match="soft_prompt"):
        Branch(soft_prompt=[[1.0]])
