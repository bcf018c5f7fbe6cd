"""Checkpoint averaging of LoRA adapters (`safedecode average-adapters`): exact in the weight
deltas, saved in peft's format (both loaders read it back), clear errors on mismatched inputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from engine_fixtures import tiny_llama
from typer.testing import CliRunner

from safedecode.cli import app
from safedecode.engine.adapters import LoraAdapter, average_loras, load_lora, save_lora


def _peft_adapter(path, seed: int, r: int = 4):
    """A random non-zero peft LoRA adapter of the tiny Llama, saved to ``path``."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_llama()
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)  # tiny_llama() is cached
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    peft_model.save_pretrained(str(path))
    return path


def _delta(ad: LoraAdapter, mod: str) -> torch.Tensor:
    a, b = ad.layers[mod]
    return ad.scale * b.float() @ a.float()


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("avg")
    return [load_lora(_peft_adapter(root / f"a{i}", seed=i, r=2 + 2 * i)) for i in range(2)]


def test_average_is_the_weighted_mean_of_the_deltas(two):
    avg = average_loras(two, [1.0, 3.0])
    assert avg.scale == 1.0
    for mod in two[0].layers:
        want = 0.25 * _delta(two[0], mod) + 0.75 * _delta(two[1], mod)
        assert torch.allclose(_delta(avg, mod), want, atol=1e-6)
        assert avg.layers[mod][0].shape[0] == 2 + 4  # ranks concatenated
    assert avg.meta["average_weights"] == [0.25, 0.75]
    equal = average_loras(two)
    mod = next(iter(two[0].layers))
    assert torch.allclose(_delta(equal, mod), (_delta(two[0], mod) + _delta(two[1], mod)) / 2,
                          atol=1e-6)


def test_average_keeps_only_the_metadata_its_inputs_agree_on(two):
    a, b = (LoraAdapter(x.layers, x.scale, x.name,
                        meta={**x.meta, "method": "sft", "steps": i, "history": [i],
                              "config": {"lr": 2e-3, "seed": 2 + i}})
            for i, x in enumerate(two))
    meta = average_loras([a, b]).meta
    assert meta["method"] == "sft" and meta["config"] == {"lr": 2e-3}
    assert "steps" not in meta and "history" not in meta and "source" not in meta
    assert meta["averaged_varies"] == {"steps": [0, 1], "config.seed": [2, 3]}
    assert meta["averaged_from"] == [x.meta["source"] for x in two]


def test_saved_average_loads_back_in_both_loaders(two, tmp_path):
    from peft import PeftModel

    avg = average_loras(two)
    save_lora(avg, tmp_path / "avg")
    back = load_lora(tmp_path / "avg")
    assert back.meta["averaged_from"] == [a.meta["source"] for a in two]
    for mod in avg.layers:  # fp16 on disk
        assert torch.allclose(_delta(back, mod), _delta(avg, mod), atol=2e-3)
    model, _ = tiny_llama()
    ours = back.merge_into(copy.deepcopy(model))
    theirs = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "avg"))
    theirs = theirs.merge_and_unload()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-4)
        assert not torch.allclose(ours(ids).logits, model(ids).logits, atol=1e-3)


def test_average_rejects_mismatched_inputs(two):
    with pytest.raises(ValueError, match="no adapters"):
        average_loras([])
    with pytest.raises(ValueError, match="2 adapters"):
        average_loras(two, [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        average_loras(two, [1.0, -1.0])
    with pytest.raises(ValueError, match="not all 0"):
        average_loras(two, [0.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        average_loras(two, [1.0, float("nan")])
    mod = next(iter(two[0].layers))
    fewer = LoraAdapter({mod: two[0].layers[mod]}, two[0].scale, "fewer")
    with pytest.raises(ValueError, match="different modules"):
        average_loras([two[0], fewer])
    other = LoraAdapter(two[1].layers, two[1].scale, "other", fingerprint="0" * 16)
    mine = LoraAdapter(two[0].layers, two[0].scale, "mine", fingerprint="1" * 16)
    with pytest.raises(ValueError, match="different models"):
        average_loras([mine, other])


def test_cli_average_adapters(tmp_path):
    a, b = _peft_adapter(tmp_path / "a", 3), _peft_adapter(tmp_path / "b", 4)
    runner = CliRunner()
    res = runner.invoke(app, ["average-adapters", str(a), str(b), "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert "mean of 2 adapters (rank 8)" in res.output
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8
    cases = (([str(a), str(b), "--weights", "1,x"], "--weights must be numbers"),
             ([str(a), str(b), "--weights", "1"], "1 weights for 2 adapters"),
             ([str(a), str(tmp_path / "nope")], "not a peft adapter folder"))
    for args, msg in cases:
        res = runner.invoke(app, ["average-adapters", *args, "-o", str(tmp_path / "n")])
        assert res.exit_code != 0 and msg in res.output, res.output
        assert "Traceback" not in res.output
