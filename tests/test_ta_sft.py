"""TA-SFT: the fused linear CE / EMD loss (values, gradients, backends, errors), the data file,
fine-tuning on Trainer with a LoRA adapter (resume, adapter loading), and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from engine_fixtures import tiny_llama
from typer.testing import CliRunner

from safedecode.cli import app
from safedecode.data import load_anchor
from safedecode.ops.linear_emd import (
    SemanticCost,
    fused_linear_emd_loss,
    reference_loss,
)
from safedecode.training.ta_sft import (
    DATA_FORMAT,
    Collator,
    TASFTConfig,
    examples,
    load_data,
    unlikelihood_loss,
)


def _problem(n=29, d=12, v=157, dtype=torch.float32, seed=0, device="cpu"):
    """A small loss problem; ``device=DEVICE`` puts it on the GPU where there is one (the Triton
    kernel then runs compiled, else under the interpreter)."""
    return tuple(t.to(device) for t in _problem_cpu(n, d, v, dtype, seed))


def _problem_cpu(n, d, v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.7).to(dtype)
    b = torch.randn(v, generator=g).to(dtype)
    tgt = torch.randint(0, v, (n,), generator=g)
    safe = torch.rand(n, generator=g) < 0.5
    wce = safe.to(dtype) / max(1, int(safe.sum()))
    wemd = -0.7 * (~safe).to(dtype) / max(1, int((~safe).sum()))
    unit = F.normalize(torch.randn(v, d, generator=g), dim=-1).to(dtype)
    return h, w, b, tgt, wce, wemd, unit


def _grads(fn, h, w, b, *rest, **kw):
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    loss = fn(leaves[0], leaves[1], *rest, bias=leaves[2], **kw)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def test_emd_to_a_one_hot_target_is_the_transport_cost_of_the_only_plan():
    """The closed form equals the optimal transport cost of an LP over all plans (V = 6)."""
    from scipy.optimize import linprog

    v, d = 6, 4
    g = torch.Generator().manual_seed(3)
    unit = F.normalize(torch.randn(v, d, generator=g, dtype=torch.float64), dim=-1)
    cost = (1 - unit @ unit.T).clamp(min=0)
    p = torch.softmax(torch.randn(v, generator=g, dtype=torch.float64), 0)
    y = 4
    q = torch.zeros(v, dtype=torch.float64)
    q[y] = 1
    a_eq = []  # row sums = p, column sums = q
    for i in range(v):
        row = torch.zeros(v, v, dtype=torch.float64)
        row[i, :] = 1
        a_eq.append(row.flatten())
    for j in range(v):
        col = torch.zeros(v, v, dtype=torch.float64)
        col[:, j] = 1
        a_eq.append(col.flatten())
    lp = linprog(cost.flatten().numpy(), A_eq=torch.stack(a_eq).numpy(),
                 b_eq=torch.cat([p, q]).numpy(), bounds=(0, None))
    closed = 1 - (p @ unit) @ unit[y]
    assert lp.status == 0
    assert abs(lp.fun - float(closed)) < 1e-9
    # and the loss's EMD term is that value (one row, weight 1 on EMD, logits = log p)
    loss = reference_loss(torch.ones(1, 1, dtype=torch.float64), torch.log(p)[:, None],
                          torch.tensor([y]),
                          torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                          unit)
    assert abs(float(loss) - float(closed)) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_fused_loss_equals_the_plain_one_in_value_and_gradients(backend, dtype, tol):
    """fp32: ≤ 2e-5 relative; bf16 (bf16 matmuls, fp32 softmax): ≤ 2e-2 relative to the largest
    gradient entry. Chunks of 5 rows, so several chunks and a ragged last one."""
    h, w, b, tgt, wce, wemd, unit = _problem(dtype=dtype, device=DEVICE)
    ref_loss, ref = _grads(reference_loss, h, w, b, tgt, wce, wemd, unit)
    loss, got = _grads(fused_linear_emd_loss, h, w, b, tgt, wce, wemd, unit, chunk_rows=5,
                       backend=backend)
    assert abs(float(loss) - float(ref_loss)) <= tol * max(1.0, abs(float(ref_loss)))
    for name, a, r in zip(("hidden", "weight", "bias"), got, ref, strict=True):
        err = float((a.float() - r.float()).abs().max() / r.float().abs().max())
        assert err <= tol, f"{name}: relative error {err}"


def test_fused_loss_passes_gradcheck_in_float64():
    h, w, b, tgt, wce, wemd, unit = _problem(n=7, d=5, v=23, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    assert torch.autograd.gradcheck(
        lambda hh, ww, bb: fused_linear_emd_loss(hh, ww, tgt, wce, wemd, unit, bias=bb,
                                                 chunk_rows=3, backend="torch"), leaves)


def test_fused_loss_does_not_depend_on_the_chunking_and_skips_frozen_weights():
    h, w, b, tgt, wce, wemd, unit = _problem(device=DEVICE)
    values = [float(fused_linear_emd_loss(h, w, tgt, wce, wemd, unit, bias=b, chunk_rows=r))
              for r in (1, 4, 1000)]
    assert max(values) - min(values) < 1e-5
    hh = h.clone().requires_grad_(True)
    loss = fused_linear_emd_loss(hh, w, tgt, wce, wemd, unit)  # weight frozen (LoRA)
    loss.backward()
    assert hh.grad is not None and torch.isfinite(hh.grad).all() and not w.requires_grad


def test_negative_emd_pushes_mass_to_semantically_far_tokens():
    """A gradient step on −EMD moves probability away from the target and its near neighbours."""
    v = 8
    unit = F.normalize(torch.tensor([[1.0, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0, 0, 1],
                                     [-1, 0, 0], [0.5, 0.5, 0], [0, -1, 0], [0, 0, -1]]), dim=-1)
    z = torch.zeros(1, v, requires_grad=True)
    eye = torch.eye(v)
    for _ in range(50):
        loss = fused_linear_emd_loss(z, eye, torch.tensor([0]), torch.zeros(1),
                                     -torch.ones(1), unit)
        (gz,) = torch.autograd.grad(loss, z)
        z = (z - 1.0 * gz).detach().requires_grad_(True)
    p = torch.softmax(z.detach()[0], 0)
    assert p[4] > 0.5 and p[0] < 0.02 and p[1] < 0.02  # most mass on the opposite token


def test_loss_errors_name_what_is_wrong():
    h, w, b, tgt, wce, wemd, unit = _problem()
    with pytest.raises(ValueError, match="cost matrix covers 10 tokens but the lm_head has 157"):
        fused_linear_emd_loss(h, w, tgt, wce, wemd, unit[:10])
    with pytest.raises(ValueError, match=r"target ids must be in \[0, 157\)"):
        fused_linear_emd_loss(h, w, tgt + 1000, wce, wemd, unit)
    with pytest.raises(ValueError, match="emd_weight has non-finite"):
        fused_linear_emd_loss(h, w, tgt, wce, wemd * float("nan"), unit)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_linear_emd_loss(h, w, tgt, wce, wemd, unit, backend="cuda")
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        fused_linear_emd_loss(h, w, tgt, wce, wemd, unit, chunk_rows=0)


def test_semantic_cost_refuses_another_models_embeddings(tmp_path):
    model, _ = tiny_llama()
    other, _ = tiny_llama(seed=1)
    cost = SemanticCost.from_model(model)
    norms = cost.unit.norm(dim=-1)
    live = model.get_input_embeddings().weight.norm(dim=-1) > 0  # the pad row is all zeros
    assert torch.allclose(norms[live], torch.ones(int(live.sum())), atol=1e-5)
    path = cost.save(tmp_path / "cost.safetensors")
    SemanticCost.load(path).check(model)
    with pytest.raises(ValueError, match="built from the token embeddings of another model"):
        SemanticCost.load(path).check(other)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="cannot read"):
        SemanticCost.load(tmp_path / "bad.safetensors")


def test_config_refuses_negative_lambda_and_bad_knobs():
    with pytest.raises(ValueError, match=r"λ \(--lam\) must be a finite number >= 0"):
        TASFTConfig(lam=-0.5)
    with pytest.raises(ValueError, match="method must be one of"):
        TASFTConfig(method="dpo")
    with pytest.raises(ValueError, match="n_harmful must be >= 1"):
        TASFTConfig(n_harmful=0)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"safe_weight \(--safe-weight\) must be"):
            TASFTConfig(safe_weight=bad)
    for bad in (-0.1, float("inf"), "1"):
        with pytest.raises(ValueError, match=r"away_refusal \(--away-refusal\) must be"):
            TASFTConfig(away_refusal=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"away_tokens \(--away-tokens\) must be"):
            TASFTConfig(away_tokens=bad)
    with pytest.raises(ValueError, match=r"away_loss \(--away-loss\) must be one of"):
        TASFTConfig(away_loss="kl")
    with pytest.raises(ValueError, match="lr_schedule"):
        TASFTConfig(lr_schedule="step")


# -- data and training on the tiny model -------------------------------------------------------

def _data_file(path, n_harmful=6, n_safe=6):
    harm, safe = load_anchor("harmful", "train")[:n_harmful], load_anchor("safe", "train")[:n_safe]
    rows = [{"format": DATA_FORMAT}]
    rows += [{"kind": "harmful", "id": it["id"], "prompt": it["prompt"],
              "response": "Sure, here is how: first you get the parts.", "complete": True,
              "refusal": it["refusal"]} for it in harm]
    rows += [{"kind": "safe", "id": it["id"], "prompt": it["prompt"], "response": it["answer"],
              "complete": False} for it in safe]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_data_file_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_data(empty)
    bad = tmp_path / "bad.jsonl"
    head = json.dumps({"format": DATA_FORMAT})
    bad.write_text(head + '\n{"kind": "harmful", "prompt": 3}\n')
    with pytest.raises(ValueError, match="line 2: expected kind 'harmful'"):
        load_data(bad)
    junk = tmp_path / "junk.jsonl"
    junk.write_text("{not json\n")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_data(junk)
    nohead = tmp_path / "nohead.jsonl"
    nohead.write_text('{"kind": "safe", "prompt": "a", "response": "b"}\n')
    with pytest.raises(ValueError, match="header line"):
        load_data(nohead)
    only = tmp_path / "only.jsonl"
    only.write_text(head + '\n{"kind": "safe", "prompt": "a", "response": "b"}\n')
    with pytest.raises(ValueError, match="needs harmful and safe records"):
        load_data(only)
    from safedecode.data import load_benign

    leak = tmp_path / "leak.jsonl"
    _data_file(leak)
    rows = leak.read_text().splitlines()
    rows.append(json.dumps({"kind": "safe", "prompt": load_benign()[0]["prompt"],
                            "response": "x"}))
    leak.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="evaluation"):
        load_data(leak)


def test_examples_follow_the_method_and_the_chat_template(tmp_path):
    _, tok = tiny_llama()
    _, records = load_data(_data_file(tmp_path / "d.jsonl"))
    ta = examples(tok, records, TASFTConfig(n_harmful=4))
    sft = examples(tok, records, TASFTConfig(method="sft", n_harmful=4))
    assert [e["kind"] for e in ta] == [1] * 4 + [0] * 6
    assert [e["kind"] for e in sft] == [2] * 4 + [0] * 6
    both = examples(tok, records, TASFTConfig(method="ta-sft+refusal", n_harmful=4))
    assert [e["kind"] for e in both] == [1, 2] * 4 + [0] * 6
    assert tok.decode(ta[0]["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert ta[0]["response_ids"][-1] == tok.eos_token_id  # complete: closed turn
    assert ta[-1]["response_ids"][-1] != tok.eos_token_id  # cut off: no end-of-turn taught
    assert "can't" in tok.decode(sft[0]["response_ids"]) or \
        "won't" in tok.decode(sft[0]["response_ids"]) or "not" in tok.decode(sft[0]["response_ids"])
    away = examples(tok, records, TASFTConfig(method="ta-sft+refusal", n_harmful=4,
                                              away_refusal=1.0))
    assert [e["kind"] for e in away] == [1, 2] * 4 + [0, 3] * 6
    pushed = [tok.decode(e["response_ids"]) for e in away if e["kind"] == 3]
    assert pushed[0].startswith("I can't help with that.") and pushed[1].startswith("I won't")
    assert all(e["response_ids"][-1] != tok.eos_token_id for e in away if e["kind"] == 3)
    assert [e["prompt_ids"] for e in away if e["kind"] == 3] == \
        [e["prompt_ids"] for e in away if e["kind"] == 0]  # on the safe prompts themselves
    first = examples(tok, records, TASFTConfig(method="ta-sft+refusal", n_harmful=4,
                                               away_refusal=1.0, away_tokens=1))
    assert [e["response_ids"] for e in first if e["kind"] == 3] == \
        [e["response_ids"][:1] for e in away if e["kind"] == 3]  # the opening token alone
    with pytest.raises(ValueError, match="7 harmful examples asked for, the data has 6"):
        examples(tok, records, TASFTConfig(n_harmful=7))


def test_collator_weighs_safe_tokens_against_refusal_tokens(tmp_path):
    _, tok = tiny_llama()
    _, records = load_data(_data_file(tmp_path / "d.jsonl"))
    feats = examples(tok, records, TASFTConfig(method="ta-sft+refusal", n_harmful=2))
    kinds = [f["kind"] for f in feats]
    assert set(kinds) == {0, 1, 2}  # safe, harmful (EMD), refusal (CE)
    per_tok = torch.tensor([k for f in feats for k in [f["kind"]] * len(f["response_ids"])])
    for sw in (1.0, 3.0):
        b = Collator(tok.pad_token_id, lam=2.0, safe_weight=sw)(feats)
        w_ce, w_emd = b["ce_weight"], b["emd_weight"]
        n_ce = int((per_tok != 1).sum())
        assert torch.allclose(w_ce[per_tok == 2], torch.full_like(w_ce[per_tok == 2], 1 / n_ce))
        assert torch.allclose(w_ce[per_tok == 0], torch.full_like(w_ce[per_tok == 0], sw / n_ce))
        assert torch.all(w_ce[per_tok == 1] == 0) and torch.all(w_emd[per_tok != 1] == 0)
        assert torch.isclose(w_emd.sum(), torch.tensor(-2.0))  # −λ, whatever the safe weight
    feats = examples(tok, records, TASFTConfig(method="ta-sft+refusal", n_harmful=2,
                                               away_refusal=0.5))
    per_tok = torch.tensor([k for f in feats for k in [f["kind"]] * len(f["response_ids"])])
    b = Collator(tok.pad_token_id, lam=2.0, safe_weight=3.0, away_refusal=0.5)(feats)
    w_ce, w_emd = b["ce_weight"], b["emd_weight"]
    assert torch.all(w_ce[per_tok == 3] == 0) and torch.all(w_emd[per_tok == 0] == 0)
    assert torch.isclose(w_emd[per_tok == 1].sum(), torch.tensor(-2.0))  # −λ on harmful
    assert torch.isclose(w_emd[per_tok == 3].sum(), torch.tensor(-0.5))  # −λ_r on the away ones
    assert torch.isclose(w_ce.sum(), w_ce[per_tok != 3].sum())
    assert torch.all(b["ul_weight"] == 0)
    b = Collator(tok.pad_token_id, lam=2.0, safe_weight=3.0, away_refusal=0.5,
                 away_loss="unlikelihood")(feats)
    assert torch.all(b["emd_weight"][per_tok == 3] == 0)  # the away tokens leave the EMD
    assert torch.isclose(b["emd_weight"].sum(), torch.tensor(-2.0))
    assert torch.isclose(b["ul_weight"][per_tok == 3].sum(), torch.tensor(0.5))  # +λ_r: minimised
    assert torch.all(b["ul_weight"][per_tok != 3] == 0)


def test_unlikelihood_is_exact_and_hands_the_mass_to_likely_tokens_not_far_ones():
    """−log(1 − p_y), stable as p_y → 1; a step on it lowers p_y and moves the mass in proportion
    to the other tokens' probability — unlike −EMD, which sends it to the farthest token."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(5, 6, generator=g), torch.randn(11, 6, generator=g)
    b, y, wt = torch.randn(11, generator=g), torch.tensor([0, 3, 3, 10, 5]), torch.rand(5)
    p = torch.softmax(h @ w.T + b, -1)
    want = (wt * -torch.log1p(-p[torch.arange(5), y])).sum()
    assert torch.allclose(unlikelihood_loss(h, w, y, wt, b), want, atol=1e-5)
    sure = torch.tensor([[40.0, 0, 0]], requires_grad=True)  # p_y = 1 − 4e-18 in float32
    loss = unlikelihood_loss(sure, torch.eye(3), torch.tensor([0]), torch.ones(1))
    loss.backward()
    assert torch.isfinite(loss) and loss > 30 and torch.isfinite(sure.grad).all()
    # y = 0 likely, token 1 likely and near it, token 4 unlikely and opposite (as in the EMD test)
    unit = F.normalize(torch.tensor([[1.0, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0, 0, 1],
                                     [-1, 0, 0]]), dim=-1)
    z0 = torch.tensor([[3.0, 2.0, 0, 0, -1]])
    moved = {}
    for name in ("ul", "emd"):
        z = z0.clone().requires_grad_(True)
        for _ in range(50):
            loss = unlikelihood_loss(z, torch.eye(5), torch.tensor([0]), torch.ones(1)) \
                if name == "ul" else fused_linear_emd_loss(
                    z, torch.eye(5), torch.tensor([0]), torch.zeros(1), -torch.ones(1), unit)
            (gz,) = torch.autograd.grad(loss, z)
            z = (z - 1.0 * gz).detach().requires_grad_(True)
        moved[name] = torch.softmax(z.detach()[0], 0)
    p0 = torch.softmax(z0[0], 0)
    assert moved["ul"][0] < p0[0] / 2 and moved["emd"][0] < p0[0] / 2  # both push y down
    assert moved["ul"].argmax() == 1 and moved["ul"][4] < 0.1  # to the likely neighbour
    assert moved["emd"].argmax() == 4  # to the far token


def test_finetune_writes_an_adapter_that_loads_resumes_and_changes_the_output(
        tiny_model_dir, tmp_path):
    from safedecode.engine import SafeDecoder
    from safedecode.engine.branches import plain
    from safedecode.models import load_model
    from safedecode.training.ta_sft import finetune

    data = _data_file(tmp_path / "d.jsonl")
    out = tmp_path / "adapter"
    cfg = TASFTConfig(n_harmful=6, max_steps=2, batch_size=4, lr=5e-2, save_steps=1, lam=2.0)
    meta = finetune(data, out, cfg, model_path=str(tiny_model_dir), progress=False,
                    keep_checkpoints=True, log=lambda m: None)
    assert meta["steps"] == 2 and \
        meta["examples"] == {"harmful": 6, "refusal": 0, "safe": 6, "away": 0}
    assert (out / "adapter_model.safetensors").is_file()
    kept = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-1", "checkpoint-2"]  # every one kept, each self-describing
    one = json.loads((out / "checkpoints" / "checkpoint-1" / "safedecode.json").read_text())
    assert one["steps"] == 1 and one["config"]["lam"] == 2.0 and "train_s" not in one
    assert all(h["step"] <= 1 for h in one["history"])
    from safedecode.eval.runner import model_fingerprint
    from safedecode.models import load_model as _load

    early, _ = _load(str(tiny_model_dir), adapter=out / "checkpoints" / "checkpoint-1")
    final, _ = _load(str(tiny_model_dir), adapter=out)
    assert model_fingerprint(early) != model_fingerprint(final)  # step 1 is not step 2
    rec = json.loads((out / "safedecode.json").read_text())
    assert rec["config"]["lam"] == 2.0 and rec["data_sha256"]
    assert any("neg_lam_emd" in h for h in rec["history"])
    # resume: two more steps from checkpoint-2, not from scratch
    cfg4 = TASFTConfig(n_harmful=6, max_steps=4, batch_size=4, lr=5e-2, save_steps=1, lam=2.0)
    meta4 = finetune(data, out, cfg4, model_path=str(tiny_model_dir), progress=False,
                     resume=True, log=lambda m: None)
    assert meta4["steps"] == 4 and not (out / "checkpoints").exists()
    with pytest.raises(ValueError, match="no checkpoint"):
        finetune(data, out, cfg4, model_path=str(tiny_model_dir), progress=False, resume=True)
    base, tok = load_model(str(tiny_model_dir))
    tuned, _ = load_model(str(tiny_model_dir), adapter=out)
    prompts = ["How do I bake bread?", "Tell me about the moon."]
    a = SafeDecoder(base, tok, plain()).generate(prompts, max_new_tokens=8)
    b = SafeDecoder(tuned, tok, plain()).generate(prompts, max_new_tokens=8)
    assert [r.token_ids for r in a] != [r.token_ids for r in b]
    from safedecode.eval.runner import model_fingerprint

    assert model_fingerprint(base) != model_fingerprint(tuned)  # eval caches stay apart
    other, _ = tiny_llama(seed=1)
    from safedecode.engine.adapters import load_lora

    with pytest.raises(ValueError, match="trained on"):
        load_lora(out).merge_into(other)


def test_cli_finetune_errors_and_generate_adapter(tiny_model_dir, tmp_path):
    runner = CliRunner()
    data = _data_file(tmp_path / "d.jsonl")
    res = runner.invoke(app, ["finetune", "-d", str(data), "-o", str(tmp_path / "o"),
                              "--model", str(tiny_model_dir), "--lam", "-1"])
    assert res.exit_code == 2 and "--lam" in res.output and "Traceback" not in res.output
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    res = runner.invoke(app, ["finetune", "-d", str(empty), "-o", str(tmp_path / "o"),
                              "--model", str(tiny_model_dir)])
    assert res.exit_code == 2 and "is empty" in res.output
    res = runner.invoke(app, ["finetune", "-d", str(data), "-o", str(tmp_path / "a"),
                              "--model", str(tiny_model_dir), "--steps", "1", "--batch-size",
                              "4", "--method", "sft", "--away-refusal", "0.5", "--away-loss",
                              "unlikelihood"])
    assert res.exit_code == 0, res.output
    assert "sft, 1 steps" in res.output
    meta = json.loads((tmp_path / "a" / "safedecode.json").read_text())
    assert meta["config"]["away_refusal"] == 0.5 and meta["examples"]["away"] == \
        meta["examples"]["safe"] > 0 and meta["config"]["away_loss"] == "unlikelihood"
    assert any("lam_r_ul" in h for h in meta["history"])
    res = runner.invoke(app, ["generate", "Hi", "--model", str(tiny_model_dir), "--adapter",
                              str(tmp_path / "a"), "-n", "4", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["tokens"] == 4
    res = runner.invoke(app, ["generate", "Hi", "--model", str(tiny_model_dir), "--adapter",
                              str(tmp_path), "-n", "4"])
    assert res.exit_code == 2 and "not a peft adapter folder" in res.output


def test_shipped_adapter_refuses_changes_the_output_and_combines_with_decoding_methods():
    """The shipped TA-SFT + refusal adapter for the embedded model: loads by name, leaves the
    embedding table alone (so the shipped soft prompts still fit), changes greedy output, and
    refuses a harmful request from the anchor train part that the plain model answers."""
    from safedecode import methods
    from safedecode.engine import SafeDecoder
    from safedecode.judges import KeywordJudge
    from safedecode.models import embedding_fingerprint, load_default, load_model

    base, tok = load_model("default")
    tuned, _ = load_model("default", adapter="ta-sft")
    assert embedding_fingerprint(base) == embedding_fingerprint(tuned)
    same, _ = load_default(adapter="ta-sft")  # the README's first example
    assert same.safedecode_name == tuned.safedecode_name != base.safedecode_name
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(same.state_dict()[w], tuned.state_dict()[w])
    assert not torch.equal(base.state_dict()[w], tuned.state_dict()[w])
    prompt = [it["prompt"] for it in load_anchor("harmful", "train")][:2]
    a = SafeDecoder(base, tok, methods.get("plain")).generate(prompt, max_new_tokens=24)
    b = SafeDecoder(tuned, tok, methods.get("plain")).generate(prompt, max_new_tokens=24)
    judge = KeywordJudge()
    assert [r.token_ids for r in a] != [r.token_ids for r in b]
    assert not any(judge.judge_one(r.text).flag for r in a)
    assert all(judge.judge_one(r.text).flag for r in b)
    c = SafeDecoder(tuned, tok, methods.get("self-cd-sp")).generate(prompt[:1], max_new_tokens=8)
    assert len(c[0].token_ids) == 8 or c[0].finish_reason == "eos"


def test_full_fine_tuning_trains_every_weight_and_saves_a_loadable_model(tiny_model_dir,
                                                                         tmp_path):
    """``full=True``: no adapter; the saved folder is a whole model (tied lm_head/embeddings
    included) that loads with ``--model`` and differs from the base."""
    from safedecode.models import load_model
    from safedecode.training.ta_sft import finetune

    out = tmp_path / "full"
    cfg = TASFTConfig(n_harmful=6, max_steps=2, batch_size=4, lr=1e-2, full=True, lam=1.0)
    meta = finetune(_data_file(tmp_path / "d.jsonl"), out, cfg,
                    model_path=str(tiny_model_dir), progress=False, log=lambda m: None)
    assert meta["steps"] == 2 and not (out / "adapter_config.json").exists()
    base, _ = load_model(str(tiny_model_dir))
    tuned, _ = load_model(str(out))
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        a, b = base.get_parameter(name), tuned.get_parameter(name)
        assert not torch.equal(a, b), f"{name} did not train"


def test_magpie_requests_are_the_models_own_and_extend_a_data_file(tmp_path):
    """`finetune-data --magpie N --extend FILE`: the anchor records of FILE kept as they are, N
    distinct everyday requests the embedded model writes itself added with its greedy answers
    (refusals dropped), the file round-trips through `load_data` (no evaluation prompt in it)."""
    from safedecode.models import embedding_fingerprint, load_model
    from safedecode.training.ta_sft import DataConfig, make_data, self_requests

    model, tok = load_model("default")
    asks = self_requests(model, tok, 4, seed=0, log=lambda m: None)
    assert len(asks) == 4 and len({a.lower() for a in asks}) == 4
    assert all(3 <= len(a.split()) <= 80 and "<|im_" not in a for a in asks)
    _, base = load_data(_data_file(tmp_path / "d.jsonl", n_harmful=2, n_safe=2))
    stale = {"kind": "safe", "id": "magpie-0000", "prompt": "old", "response": "old"}
    out = make_data(model, tok, DataConfig(magpie=3, max_new_tokens=12), base=base + [stale],
                    log=lambda m: None)
    assert out[:len(base)] == base and stale not in out
    new = out[len(base):]
    assert 1 <= len(new) <= 3 and all(r["kind"] == "safe" and r["id"].startswith("magpie-")
                                      and r["response"].strip() for r in new)
    from safedecode.training.ta_sft import save_data

    _, back = load_data(save_data(tmp_path / "m.jsonl", out, {}))  # checks: no evaluation prompt
    assert back == out
    runner = CliRunner()
    res = runner.invoke(app, ["finetune-data", "-o", str(tmp_path / "x.jsonl"), "--magpie", "-1"])
    assert res.exit_code == 2 and "magpie must be an integer >= 0" in res.output
    other = tmp_path / "other.jsonl"
    head = {"format": DATA_FORMAT, "embedding_fingerprint": "0" * 16}
    other.write_text("\n".join(json.dumps(r) for r in [head] + base) + "\n")
    assert embedding_fingerprint(model) != "0" * 16
    res = runner.invoke(app, ["finetune-data", "-o", str(tmp_path / "x.jsonl"), "--magpie", "1",
                              "--extend", str(other)])
    assert res.exit_code == 2 and "holds answers of another model" in res.output


def test_finetune_is_reproducible_from_its_seed(tiny_model_dir, tmp_path):
    """The same seed gives the same adapter (LoRA's initialisation included), another seed not."""
    from safetensors.torch import load_file

    from safedecode.training.ta_sft import finetune

    data = _data_file(tmp_path / "d.jsonl")
    weights = []
    for i, seed in enumerate((0, 0, 1)):
        cfg = TASFTConfig(n_harmful=6, max_steps=1, batch_size=4, lr=5e-2, seed=seed)
        torch.manual_seed(100 + i)  # whatever the caller's RNG holds
        finetune(data, tmp_path / f"a{i}", cfg, model_path=str(tiny_model_dir), progress=False,
                 log=lambda m: None)
        weights.append(load_file(str(tmp_path / f"a{i}" / "adapter_model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_finetune_lr_schedule_decays_to_zero(tiny_model_dir, tmp_path):
    from safedecode.training.ta_sft import finetune

    data = _data_file(tmp_path / "d.jsonl")
    cfg = TASFTConfig(n_harmful=6, max_steps=10, batch_size=4, lr=1e-2, lr_schedule="linear")
    meta = finetune(data, tmp_path / "a", cfg, model_path=str(tiny_model_dir), progress=False,
                    log=lambda m: None)
    lrs = [h["learning_rate"] for h in meta["history"] if "learning_rate" in h]
    assert meta["config"]["lr_schedule"] == "linear"
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 1e-2 and lrs[-1] < lrs[0] / 2


def test_finetune_refuses_a_model_that_soft_caps_its_logits(tmp_path):
    """The fused loss computes the lm_head's logits; Gemma's final soft-capping is not in it
    (a scale, Cohere's or Granite's, is folded in: tests/test_teacher.py checks the scores)."""
    from engine_fixtures import tiny_arch

    from safedecode.training.ta_sft import finetune

    model, tok = tiny_arch("gemma2-mixed")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = _data_file(tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="soft-caps its logits"):
        finetune(data, tmp_path / "out", TASFTConfig(n_harmful=6, max_steps=1),
                 model_path=str(tmp_path / "m"), progress=False, log=lambda m: None)
