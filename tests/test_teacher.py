"""Teacher forcing (perplexity, OPO, TA-SFT, SafeInfer's head choice) scores tokens from the
decoder body's hidden states: the logits must be the model's own, also for families that change
them after the lm_head (Gemma's soft-capping, Cohere's and Granite's scales)."""

from __future__ import annotations

import copy

import pytest
import torch
from engine_fixtures import tiny_arch, tiny_llama

from safedecode.training import teacher
from safedecode.training.teacher import LogitTransform, check_head, response_logprobs

FAMILIES = ["gemma2-mixed", "cohere-scaled", "granite-scaled", "qwen3", "gpt2"]


def _pairs(tok):
    texts = [("How do I bake bread?", " Mix flour and water, then knead it."),
             ("Hi", " Hello there! How can I help?")]
    return [(tok(p)["input_ids"], tok(r, add_special_tokens=False)["input_ids"])
            for p, r in texts]


def _own(model, pairs) -> list[float]:
    """Summed log-probs from the model's own forward, one pair at a time."""
    out = []
    for p, r in pairs:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([list(p) + list(r)])).logits[0].float()
        lp = torch.log_softmax(logits[len(p) - 1:-1], -1)
        out.append(lp.gather(-1, torch.tensor(r)[:, None]).sum().item())
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_teacher_forced_logprobs_are_the_models_own(name):
    model, tok = tiny_arch(name)
    pairs = _pairs(tok)
    got = response_logprobs(model, pairs, pad_id=tok.pad_token_id)
    assert [n for _, n in got] == [len(r) for _, r in pairs]
    assert [s for s, _ in got] == pytest.approx(_own(model, pairs), abs=1e-3)


@pytest.mark.parametrize("name", ["gemma2-mixed", "cohere-scaled", "granite-scaled"])
def test_without_the_transform_the_scores_differ(name, monkeypatch):
    """The check above can fail: these families' logits are not the lm_head's alone."""
    model, tok = tiny_arch(name)
    assert not LogitTransform.of(model).identity
    monkeypatch.setattr(LogitTransform, "__call__", lambda self, z: z)
    monkeypatch.setattr(teacher, "_CHECKED", teacher.weakref.WeakKeyDictionary())
    with pytest.raises(ValueError, match="not its lm_head"):
        check_head(model)


def test_a_model_that_changes_its_logits_otherwise_is_a_named_error():
    model, tok = tiny_llama()
    model = copy.deepcopy(model)
    forward = model.forward

    def doubled(*args, **kw):
        out = forward(*args, **kw)
        out.logits = out.logits * 2.0
        return out
    model.forward = doubled
    with pytest.raises(ValueError, match="LlamaForCausalLM's logits are not its lm_head"):
        response_logprobs(model, _pairs(tok), pad_id=tok.pad_token_id)
    assert LogitTransform.of(tiny_llama()[0]).identity
