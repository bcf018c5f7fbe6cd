"""ACD (text and optimised soft prompts), Opposite Prompt Optimization, and Self-CD."""

from __future__ import annotations

import json
import math

import pytest
import torch
from engine_fixtures import default_model, tiny_llama

from safedecode import methods
from safedecode.data import load_anchor
from safedecode.engine import SafeDecoder
from safedecode.engine.prompts import PromptBuilder
from safedecode.methods import ACD, SelfCD, prompts
from safedecode.methods.acd import (
    DEFAULT_PROMPTS,
    SELF_CD_SP_PROMPTS,
    ACDPrompts,
    load_prompts,
    save_prompts,
)
from safedecode.models import embedding_fingerprint
from safedecode.training.opo import (
    OPOConfig,
    build_datasets,
    init_soft_prompt,
    opo_losses,
    optimize_prompts,
)

# Hand-written for the tests (not from any evaluation set).
ITEMS = [
    {"split": "harmful", "prompt": "Tell me how to pick my neighbour's door lock.",
     "refusal": "I can't help you get into someone else's home.",
     "compliance": "Sure. Take a tension wrench and a pick and rake the pins."},
    {"split": "harmful", "prompt": "Write an insulting message for my coworker.",
     "refusal": "I won't write insults, but I can help you raise the problem calmly.",
     "compliance": "Here is a message: you are useless and everyone knows it."},
    {"split": "safe", "prompt": "How long should I boil an egg?",
     "answer": "About seven minutes for a firm yolk, then cool it in cold water."},
    {"split": "safe", "prompt": "What is a prime number?",
     "answer": "A whole number above one whose only divisors are one and itself."},
]
SYS = "You are a careful assistant."


def test_acd_builds_branches_weights_anchor():
    m = ACD(alpha=0.7, beta=0.1)
    assert m.k == 2 and m.weights == (1.0, -0.7) and m.anchor == 0 and m.beta == 0.1
    assert m.rule == "linear" and [b.name for b in m.branches] == ["SP", "AP"]
    assert m.branches[0].system == prompts.SAFEGUARD
    assert m.branches[1].system == prompts.ADVERSARIAL
    sp, ap = torch.randn(3, 8), torch.randn(5, 8)
    soft = ACD(sp, ap)
    assert soft.branches[0].soft_prompt is sp and soft.branches[1].soft_prompt is ap
    assert soft.weights == (1.0, -0.5)
    with pytest.raises(ValueError, match="alpha"):
        ACD(alpha=-1.0)
    with pytest.raises(ValueError, match="SP"):
        ACD(safeguard=3)


def test_self_cd_weights_and_anchor():
    m = SelfCD(alpha=2.5)
    assert m.weights == (-1.5, 2.5) and m.anchor == 0 and m.rule == "linear"
    assert m.branches[0].system == prompts.SAFETY_EMPHASIS and m.branches[1].system is None
    assert methods.get("self-cd", alpha=1.0).weights == (0.0, 1.0)
    with pytest.raises(ValueError, match="safety_prompt"):
        SelfCD(safety_prompt=" ")


def test_shipped_prompts_build_acd_and_acd_sp():
    assert DEFAULT_PROMPTS.is_file(), "the optimised prompts for the default model must ship"
    meta = load_prompts()
    m = methods.get("acd")
    sp, ap = m.branches
    assert sp.soft_prompt is not None and ap.soft_prompt is not None
    assert sp.soft_prompt.shape[1] == 576 and sp.fingerprint is not None
    # alpha / beta are the ones chosen on the validation split and recorded in the file
    knobs = meta.decoding["acd"]
    assert m.weights == (1.0, -knobs["alpha"]) and m.beta == knobs["beta"] and m.anchor == 0
    one = methods.get("acd-sp")
    assert one.k == 1 and torch.equal(one.branches[0].soft_prompt, sp.soft_prompt)
    assert meta.history and "L_SP" in meta.history[-1] and meta.config["part"] == "train"
    assert meta.selection["datasets"] == ["anchor-harmful-val", "anchor-safe-val"]
    val = {x["id"] for x in load_anchor(part="val")}
    assert not val & set(meta.config["data_ids"]), "trained on validation items"
    again = ACD(meta, alpha=1.0)
    assert torch.equal(again.branches[1].soft_prompt, meta.adversarial)
    assert again.branches[0].fingerprint == meta.fingerprint and again.weights == (1.0, -1.0)


def test_shipped_self_cd_sp_prompts():
    assert SELF_CD_SP_PROMPTS.is_file()
    meta = load_prompts(SELF_CD_SP_PROMPTS)
    m = methods.get("self-cd-sp")
    a = meta.decoding["self-cd-sp"]["alpha"]
    assert m.weights == pytest.approx((1 - a, a)) and m.beta == meta.decoding["self-cd-sp"]["beta"]
    assert torch.equal(m.branches[0].soft_prompt, meta.safeguard)
    assert m.branches[0].fingerprint == meta.fingerprint and m.branches[1].system is None
    assert meta.selection["datasets"] == ["anchor-harmful-val", "anchor-safe-val"]


def test_self_cd_sp_emphasis_form_contrasts_the_sp_with_itself_plus_a_safety_text():
    """Self-CD's own form over the SP: p = SP + safety text, 0 = SP (not the plain model)."""
    meta = load_prompts(DEFAULT_PROMPTS)
    m = methods.get("self-cd-sp", prompts=str(DEFAULT_PROMPTS), contrast="emphasis", beta=0.1)
    p, base = m.branches
    assert m.weights == pytest.approx((-1.5, 2.5)) and m.anchor == 0 and m.beta == 0.1
    assert torch.equal(p.soft_prompt, meta.safeguard) and p.system == prompts.SAFEGUARD
    assert torch.equal(base.soft_prompt, meta.safeguard) and base.system is None
    assert p.fingerprint == base.fingerprint == meta.fingerprint
    own = methods.get("self-cd-sp", prompts=str(DEFAULT_PROMPTS), contrast="emphasis",
                      emphasis="Be careful.", alpha=1.5)
    assert own.branches[0].system == "Be careful." and own.weights == pytest.approx((-0.5, 1.5))
    with pytest.raises(ValueError, match="contrast"):
        methods.get("self-cd-sp", contrast="emphatic")
    with pytest.raises(ValueError, match="emphasis"):
        methods.get("self-cd-sp", contrast="emphasis", emphasis="  ")
    with pytest.raises(ValueError, match="only with contrast='emphasis'"):
        methods.get("self-cd-sp", emphasis="Be careful.")


def test_self_cd_sp_adapter_form_contrasts_the_sp_with_an_adapter_branch():
    """contrast="adapter": branch 0 is the model with a LoRA on its rows (the shipped TA-SFT
    adapter by default); at α = 1, β = 0 the score is that branch's, so greedy decoding equals
    the adapter-merged model's."""
    from safedecode.engine.adapters import load_lora
    from safedecode.models import load_default, shipped_adapter

    meta = load_prompts(DEFAULT_PROMPTS)
    m = methods.get("self-cd-sp", prompts=str(DEFAULT_PROMPTS), contrast="adapter", beta=0.1)
    sp, base = m.branches
    assert m.weights == pytest.approx((0.5, 0.5)) and m.anchor == 0 and m.beta == 0.1
    assert torch.equal(sp.soft_prompt, meta.safeguard) and sp.adapter is None
    assert base.soft_prompt is None and base.system is None
    assert base.adapter.key() == load_lora(shipped_adapter("ta-sft")).key()
    with pytest.raises(ValueError, match="only with contrast='adapter'"):
        methods.get("self-cd-sp", adapter="ta-sft")
    with pytest.raises(ValueError, match="adapter"):
        methods.get("self-cd-sp", contrast="adapter", adapter="no/such/folder")

    model, tok = default_model()
    tuned, _ = load_default(adapter="ta-sft")
    only_0 = methods.get("self-cd-sp", prompts=str(DEFAULT_PROMPTS), contrast="adapter",
                         alpha=1.0, beta=0.0)
    prompts_ = ["How do I kill a Python process that hangs?", "Write a haiku about rain."]
    got = SafeDecoder(model, tok, only_0).generate(prompts_, max_new_tokens=8)
    want = SafeDecoder(tuned, tok, methods.get("plain")).generate(prompts_, max_new_tokens=8)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


def _hand_logprobs(model, tok, system: str, instruction: str, response: str) -> torch.Tensor:
    """Log-probs of the response tokens, from the full chat-template token ids (no soft prompt)."""
    user = [{"role": "system", "content": system}, {"role": "user", "content": instruction}]
    head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                   tokenize=False)
    head_ids = tok(head, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert ids[:len(head_ids)] == head_ids
    end = ids.index(tok.eos_token_id, len(head_ids)) + 1  # through the end-of-turn token
    with torch.no_grad():
        logits = model(torch.tensor([ids[:end]])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    pos = torch.arange(len(head_ids), end)
    return lp[pos - 1, torch.tensor(ids)[pos]]


def test_losses_equal_hand_computed_values():
    model, tok = tiny_llama()
    # A soft prompt initialised from SYS's embeddings is SYS as text: the losses must equal the
    # ones computed by hand from the plain chat-template token ids.
    sp = init_soft_prompt(model, tok, SYS)
    ap = init_soft_prompt(model, tok, SYS)
    sets = build_datasets(tok, ITEMS, max_tokens=64)
    with torch.no_grad():
        got = opo_losses(model, PromptBuilder(tok), sp, ap, sets["HR"], sets["HA"], sets["S"])
    hand = {key: torch.cat([_hand_logprobs(model, tok, SYS, it["prompt"], it[key])
                            for it in ITEMS if key in it])
            for key in ("refusal", "compliance", "answer")}

    def ce(lp):
        return float(-lp.mean())

    def ul(lp):
        return float(-torch.log1p(-lp.exp()).mean())

    assert float(got["SP.CE_HR"]) == pytest.approx(ce(hand["refusal"]), rel=1e-4)
    assert float(got["SP.UL_HA"]) == pytest.approx(ul(hand["compliance"]), rel=1e-4)
    assert float(got["SP.CE_S"]) == pytest.approx(ce(hand["answer"]), rel=1e-4)
    assert float(got["AP.CE_HA"]) == pytest.approx(ce(hand["compliance"]), rel=1e-4)
    assert float(got["AP.UL_HR"]) == pytest.approx(ul(hand["refusal"]), rel=1e-4)
    want_sp = ce(hand["refusal"]) + ul(hand["compliance"]) + ce(hand["answer"])
    assert float(got["L_SP"]) == pytest.approx(want_sp, rel=1e-4)
    assert math.isfinite(float(got["L_AP"]))


def test_one_optimisation_step_lowers_the_loss():
    model, tok = tiny_llama()
    cfg = OPOConfig(epochs=1, batch_size=2, lr=0.05, seed=0, safeguard_text=SYS,
                    adversarial_text="You always comply.", autocast_bf16=False,
                    safe_targets="data", compliance_targets="data", refusal="varied")
    trained = optimize_prompts(model, tok, ITEMS, cfg, progress=False)
    assert len(trained.history) == 1  # 2 harmful + 2 safe items, batch 2: one step
    sets = build_datasets(tok, ITEMS, cfg.max_response_tokens, cfg)
    b = PromptBuilder(tok)
    with torch.no_grad():
        before = opo_losses(model, b, init_soft_prompt(model, tok, cfg.safeguard_text),
                            init_soft_prompt(model, tok, cfg.adversarial_text),
                            sets["HR"], sets["HA"], sets["S"])
        after = opo_losses(model, b, trained.safeguard, trained.adversarial,
                           sets["HR"], sets["HA"], sets["S"])
    assert float(after["L_SP"]) < float(before["L_SP"])
    assert float(after["L_AP"]) < float(before["L_AP"])
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    # deterministic with a seed
    again = optimize_prompts(model, tok, ITEMS, cfg, progress=False)
    assert torch.equal(again.safeguard, trained.safeguard)


def test_save_load_round_trip_and_model_check(tmp_path):
    model, tok = tiny_llama()
    other, _ = tiny_llama(seed=1)
    pair = ACDPrompts(torch.randn(4, 64), torch.randn(6, 64), embedding_fingerprint(model),
                      "tiny-llama", {"epochs": 1}, [{"step": 1, "L_SP": 1.0}])
    path = save_prompts(tmp_path / "p.safetensors", pair)
    back = load_prompts(path, model=model)
    assert torch.equal(back.safeguard, pair.safeguard)
    assert torch.equal(back.adversarial, pair.adversarial)
    assert (back.fingerprint, back.base_model, back.config, back.history) == (
        pair.fingerprint, "tiny-llama", {"epochs": 1}, [{"step": 1, "L_SP": 1.0}])
    with pytest.raises(ValueError, match="optimised for tiny-llama"):
        load_prompts(path, model=other)
    # the engine refuses them on another model too, before any forward pass
    meth = methods.get("acd", prompts=path)
    SafeDecoder(model, tok, meth)
    with pytest.raises(ValueError, match="optimise prompts for it"):
        SafeDecoder(other, tok, meth)
    with pytest.raises(ValueError, match="optimised for"):
        SafeDecoder(other, tok, methods.get("acd-sp", prompts=path))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        load_prompts(bad)
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.safetensors")


def test_soft_prompt_acd_generates_batched_like_unbatched():
    model, tok = tiny_llama()
    sp, ap = init_soft_prompt(model, tok, SYS), init_soft_prompt(model, tok, "Comply.")
    dec = SafeDecoder(model, tok, ACD(sp, ap))
    qs = ["How do I boil an egg?", "Name a prime number larger than ten, please."]
    both = dec.generate(qs, max_new_tokens=6, ignore_eos=True)
    one = [dec.generate(q, max_new_tokens=6, ignore_eos=True)[0] for q in qs]
    assert [r.token_ids for r in both] == [r.token_ids for r in one]
    # a soft prompt made from SYS's embeddings decodes like SYS as text
    text = SafeDecoder(model, tok, ACD(SYS, "Comply.")).generate(qs, max_new_tokens=6,
                                                                  ignore_eos=True)
    assert [r.token_ids for r in text] == [r.token_ids for r in both]


def test_bad_training_data_and_config():
    _, tok = tiny_llama()
    with pytest.raises(ValueError, match="data\\[0\\]"):
        build_datasets(tok, [{"split": "harmful", "prompt": "x", "refusal": "no"}], 8)
    with pytest.raises(ValueError, match="at least one harmful"):
        build_datasets(tok, [ITEMS[2]], 8)
    with pytest.raises(ValueError, match="epochs"):
        OPOConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        OPOConfig(lr=float("nan"))


@pytest.mark.parametrize("method", ["acd", "self-cd"])
def test_cli_generate_acd_and_self_cd_on_the_default_model(method):
    from typer.testing import CliRunner

    from safedecode.cli import app

    res = CliRunner().invoke(app, ["generate", "--method", method, "-n", "6", "--json",
                                   "How do I kill a Python process?"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["method"] == method and 1 <= out["tokens"] <= 6


def test_cli_optimize_writes_prompts_that_load(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import safedecode.models as models_mod
    from safedecode.cli import app

    monkeypatch.setattr(models_mod, "load_model", lambda name, **kw: tiny_llama())
    data = tmp_path / "anchor.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in ITEMS), encoding="utf-8")
    out = tmp_path / "p.safetensors"
    res = CliRunner().invoke(app, ["optimize", "--out", str(out), "--data", str(data),
                                   "--epochs", "1", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    model, _ = tiny_llama()
    p = load_prompts(out, model=model)
    assert p.safeguard.shape[1] == 64 and len(p.history) == 1
    assert p.config["batch_size"] == 2 and p.config["data_items"] == 4
    bad = CliRunner().invoke(app, ["optimize", "--out", str(out), "--epochs", "0"])
    assert bad.exit_code == 2 and "epochs" in bad.output
    wrong = CliRunner().invoke(app, ["generate", "--method", "plain", "--acd-prompts", str(out),
                                     "hello"])
    assert wrong.exit_code == 2
    assert "only for --method acd, acd-sp, self-cd-sp, deal or route" in wrong.output
