"""The engine on other architectures than Llama: sliding-window attention (every layer, or mixed
with full layers), absolute positions, q/k norms, attention sinks, logits changed after the
lm_head. Each must give exactly what transformers' ``generate`` gives, batched, continuous,
packed, served and under DeAL's forks; layer kinds the engine cannot mask are named errors; and
``safedecode check`` says so for a user's model."""

from __future__ import annotations

import copy

import pytest
import torch
from engine_fixtures import ARCHS, WINDOW, tiny_arch, tiny_llama

from safedecode import methods
from safedecode.engine import SafeDecoder, SamplingParams
from safedecode.engine.masks import LayerMasks

PROMPTS = ["How do I kill a Python process that hangs forever on a lock?",
           "Name a colour."]
NEW = 16
WINDOWED = [n for n in ARCHS if "window" in n or "mixed" in n]


def _hf_greedy(model, tok, prompt: str, system: str | None = None
               ) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and their log-probabilities."""
    chat = [{"role": "user", "content": prompt}]
    if system is not None:
        chat.insert(0, {"role": "system", "content": system})
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    assert ids.shape[1] > 2 * WINDOW  # the window cuts every prompt
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                         min_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id,
                         output_logits=True, return_dict_in_generate=True)  # EOS ignored
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    lps = [torch.log_softmax(z[0].float(), -1)[t].item() for z, t in zip(out.logits, tokens,
                                                                         strict=True)]
    return tokens, lps


def _assert_same(model, tok, results, system: str | None = None, prompts=PROMPTS) -> None:
    for p, r in zip(prompts, results, strict=True):
        tokens, lps = _hf_greedy(model, tok, p, system)
        assert r.token_ids == tokens, p
        assert r.logprobs == pytest.approx(lps, abs=1e-4), p


@pytest.mark.parametrize("name", list(ARCHS))
def test_greedy_equals_transformers_generate(name):
    model, tok = tiny_arch(name)
    out = SafeDecoder(model, tok, methods.get("plain")).generate(
        PROMPTS, max_new_tokens=NEW, ignore_eos=True, return_logprobs=True)
    _assert_same(model, tok, out)


@pytest.mark.parametrize("name", WINDOWED)
def test_a_shared_system_prefix_equals_transformers_generate(name):
    """`safe-prompt`: the branch's system prompt (longer than the window) is prefilled once
    into the prefix store and copied into each row; the answers are transformers'."""
    model, tok = tiny_arch(name)
    method = methods.get("safe-prompt")
    system = method.branches[0].system
    assert len(tok(system)["input_ids"]) > 2 * WINDOW
    dec = SafeDecoder(model, tok, method)
    prompts = ["Hi", PROMPTS[0]]  # "Hi": the first new tokens' windows reach into the prefix
    for _ in range(2):  # the second call reads the stored prefix
        out = dec.generate(prompts, max_new_tokens=NEW, ignore_eos=True,
                           return_logprobs=True)
        _assert_same(model, tok, out, system, prompts)


@pytest.mark.parametrize("name", WINDOWED)
def test_without_the_window_the_answers_differ(name, monkeypatch):
    """The check above can fail: with the window left out, a windowed model's answer is not
    transformers'."""
    model, tok = tiny_arch(name)
    monkeypatch.setattr(LayerMasks, "slide", lambda self, mask, q_cols: mask)
    out = SafeDecoder(model, tok, methods.get("plain")).generate(
        PROMPTS, max_new_tokens=NEW, ignore_eos=True)
    assert any(r.token_ids != _hf_greedy(model, tok, p)[0] for p, r in zip(PROMPTS, out,
                                                                           strict=True))


def _continuous(dec: SafeDecoder, packed: bool, budget: int | None = None
                ) -> tuple[dict, dict, object]:
    eng = dec.engine(max_seqs=2, packed=packed, max_prefill_tokens=budget)
    params = [SamplingParams(max_new_tokens=NEW, ignore_eos=True),
              SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=3,
                             ignore_eos=True),
              SamplingParams(max_new_tokens=12, ignore_eos=True)]
    prompts = PROMPTS + ["Why is the sky blue, and why are sunsets red at the end of the day?"]
    ids = []
    for p, sp in zip(prompts, params, strict=True):
        ids.append(eng.add_request(p, sp))
        eng.step()  # the next request joins while this one decodes
    while eng.has_unfinished():
        eng.step()
    outs = {i: eng.pop_result(rid).token_ids for i, rid in enumerate(ids)}
    alone = {}
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        one = dec.engine(max_seqs=1, packed=packed)
        rid = one.add_request(p, sp)
        while one.has_unfinished():
            one.step()
        alone[i] = one.pop_result(rid).token_ids
    return outs, alone, eng


@pytest.mark.parametrize("name", WINDOWED)
def test_contrast_with_shared_prefixes_continuous_and_packed_equals_lone_runs(name):
    """K = 2 (`acd-text`: both branches' system prompts, longer than the window, computed once
    and shared), requests joining while others decode: packed forwards, two-forward steps,
    prompts fed in chunks and lone runs agree."""
    model, tok = tiny_arch(name)
    dec = SafeDecoder(model, tok, methods.get("acd-text"))
    packed, alone, eng = _continuous(dec, packed=True)
    two, _, _ = _continuous(dec, packed=False)
    chunked, _, _ = _continuous(dec, packed=True, budget=WINDOW + 3)  # prompts fed in chunks
    assert packed == alone == two == chunked
    sdpa = model.config._attn_implementation == "sdpa"
    assert (eng.runner.pack is True) == sdpa  # packed forwards run on SDPA models (Gemma 2
    # runs eager attention for its soft-capping: two forwards)


def test_layer_kinds_the_engine_cannot_mask_are_named():
    model, tok = tiny_llama()
    model = copy.deepcopy(model)
    model.config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(ValueError, match="chunked_attention"):
        SafeDecoder(model, tok, methods.get("plain"))
    model.config.layer_types = ["sliding_attention", "full_attention"]
    model.config.sliding_window = None
    with pytest.raises(ValueError, match="sliding_window"):
        SafeDecoder(model, tok, methods.get("plain"))
    # a state-space model (transformers names its layers 'linear_attention')
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(vocab_size=len(tok), hidden_size=32,
                                         num_hidden_layers=2, state_size=4))
    with pytest.raises(ValueError, match="linear_attention"):
        SafeDecoder(mamba, tok, methods.get("plain"))
    from safedecode.check import render, run_checks

    checks = run_checks(mamba, tok)  # `safedecode check` stops there, saying why
    assert [(c.name, c.ok) for c in checks] == [("attention layers", False)]
    assert "linear_attention" in render(checks) and "does not reproduce" in render(checks)


@pytest.mark.parametrize("name", ["mistral-window", "gemma3-mixed", "qwen3"])
def test_layer_masks_read_the_config(name):
    masks = LayerMasks.of(tiny_arch(name)[0])
    expect = {"mistral-window": (WINDOW, False, 2), "gemma3-mixed": (WINDOW, True, 1),
              "qwen3": (None, False, 0)}[name]
    assert (masks.window, masks.keyed, masks.sliding_layers) == expect


def test_compiled_decode_of_a_mixed_model_equals_eager():
    """`compile=True` with a {layer type: mask} model (the masks enter the graph as a dict)."""
    model, tok = tiny_arch("gemma3-mixed")
    prompts = ["Hi", PROMPTS[0]]
    eager = SafeDecoder(model, tok, methods.get("acd-text")).generate(
        prompts, max_new_tokens=12, ignore_eos=True)
    comp = SafeDecoder(model, tok, methods.get("acd-text"), compile=True).generate(
        prompts, max_new_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in comp] == [r.token_ids for r in eager]


def _vowels(prompts, texts):
    return [sum(ch in "aeiou" for ch in t) - 0.5 * t.count(" ") for t in texts]


@pytest.mark.parametrize("name", ["mistral-window", "gemma3-mixed"])
def test_deal_on_forked_windowed_states_equals_the_search_from_scratch(name):
    """DeAL forks and truncates windowed rows; each step equals the naive search that
    recomputes everything from the prompt with transformers' own masks."""
    from safedecode.bench.naive import NaiveDeAL

    model, tok = tiny_arch(name)
    spec = methods.get("deal", k=3, lookahead=3, chunk=2, lam=1.0, reward=_vowels,
                       base="acd-text", alpha=0.5)
    got = SafeDecoder(model, tok, spec).generate(PROMPTS, max_new_tokens=10)
    naive = NaiveDeAL(model, tok, spec)
    for p, r in zip(PROMPTS, got, strict=True):
        ref = naive.generate(p, max_new_tokens=10)
        assert r.token_ids == ref.token_ids, p
        assert r.logprobs == pytest.approx(ref.logprobs, abs=1e-4), p


def test_cli_check_passes_a_windowed_model_and_fails_a_broken_engine(tmp_path, monkeypatch):
    """`safedecode check`: the model's layers, template and logits described, the engine's
    answers = transformers' (a prompt longer than the window among them); with the window left
    out of the engine's masks it fails, exit status 1, naming the prompt."""
    from typer.testing import CliRunner

    from safedecode.cli import app

    model, tok = tiny_arch("gemma2-mixed")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    res = CliRunner().invoke(app, ["check", "--model", str(tmp_path), "-n", "8"])
    assert res.exit_code == 0, res.output
    assert f"sliding window of {WINDOW} on 1 of 2 layers" in res.output
    assert "soft-capped at 2" in res.output and "runs this model exactly" in res.output
    assert res.output.count("ok    K = 1 vs transformers") == 4  # 3 prompts + the long one
    monkeypatch.setattr(LayerMasks, "slide", lambda self, mask, q_cols: mask)
    res = CliRunner().invoke(app, ["check", "--model", str(tmp_path), "-n", "8"])
    assert res.exit_code == 1 and "FAIL  K = 1 vs transformers" in res.output, res.output
    assert "does not reproduce this model" in res.output
    res = CliRunner().invoke(app, ["check", "--model", str(tmp_path), "-n", "0"])
    assert res.exit_code == 2 and "--max-new-tokens" in res.output


def test_windowed_layers_read_only_the_columns_a_query_can_see(monkeypatch):
    """A decode step's sliding-window layers read from the oldest column any query can see
    (rounded down to 32), the full layers every column; the answers stay transformers' (the
    tests above run with this on)."""
    from safedecode.engine.cache import SlotLayer

    model, tok = tiny_arch("gemma3-mixed")  # layer 0 windowed, layer 1 full
    widths: dict[bool, list[int]] = {True: [], False: []}
    update = SlotLayer.update

    def record(self, *args, **kw):
        k, v = update(self, *args, **kw)
        if not self.owner.binding.packed and args[0].shape[2] == 1:  # decode steps
            widths[self.sliding].append(k.shape[2])
        return k, v
    monkeypatch.setattr(SlotLayer, "update", record)
    prompt = "Tell me a long story about " + "a fox and a dog, " * 20
    out = SafeDecoder(model, tok, methods.get("plain")).generate(
        [prompt], max_new_tokens=NEW, ignore_eos=True, return_logprobs=True)
    n = len(tok.apply_chat_template([{"role": "user", "content": prompt}],
                                    add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"])
    assert widths[True] and len(widths[True]) == len(widths[False])
    assert all(w <= WINDOW + 64 for w in widths[True])  # two 32-column roundings at most
    assert all(f >= n for f in widths[False]) and min(widths[False]) > WINDOW + 64
    tokens, lps = _hf_greedy(model, tok, prompt)
    assert out[0].token_ids == tokens and out[0].logprobs == pytest.approx(lps, abs=1e-4)


def test_served_windowed_model_with_a_template_without_system_role_equals_offline(tmp_path):
    """The server on a Gemma-3-shaped model whose template has no system role: a chat with a
    system message on a contrast method (both branches' prompts and the deployment's folded
    into the user turn, longer than the window) = offline `generate`."""
    from engine_fixtures import NO_SYSTEM_ROLE
    from serve_fixtures import LiveServer

    model, tok = tiny_arch("gemma3-mixed")
    tok = copy.deepcopy(tok)
    tok.chat_template = NO_SYSTEM_ROLE
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    msgs = [{"role": "system", "content": "You are a gardening assistant."},
            {"role": "user", "content": "How do I kill aphids on my roses?"}]
    ref = SafeDecoder(model, tok, methods.get("acd-text")).generate([msgs], max_new_tokens=10)
    (tmp_path / "serve").mkdir()
    srv = LiveServer(["--model", str(tmp_path / "m"), "--name", "g", "-m", "acd-text"],
                     tmp_path / "serve")
    try:
        r = srv.client().chat.completions.create(model="g:acd-text", messages=msgs,
                                                 max_tokens=10, temperature=0)
        assert r.choices[0].message.content == ref[0].text
        assert r.usage.prompt_tokens == ref[0].prompt_tokens[0]
    finally:
        assert srv.stop() == 0
