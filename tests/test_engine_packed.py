"""Packed forwards (the running rows' decode and new prompts' prefill as one ``[1, N]`` forward)
give what two forwards give, run one forward per admission step, leave methods with hooks on
two forwards, and fall back to two forwards when a model's attention does not route."""

from __future__ import annotations

import contextlib

import pytest
import torch
from engine_fixtures import MIXED_PROMPTS, soft_method, tiny_llama

from safedecode import methods
from safedecode.engine import Branch, BranchHook, SafeDecoder, SamplingParams, contrastive
from safedecode.engine import step as step_module

PROMPTS = MIXED_PROMPTS + ["Name a colour.", "Why is the sky blue, and why are sunsets red?"]
PARAMS = [SamplingParams(max_new_tokens=9, logprobs=True),
          SamplingParams(max_new_tokens=5, temperature=0.8, top_p=0.9, seed=3, logprobs=True),
          SamplingParams(max_new_tokens=7, temperature=1.0, top_k=20, seed=11, logprobs=True),
          SamplingParams(max_new_tokens=4, min_p=0.1, temperature=0.7, seed=5, logprobs=True),
          SamplingParams(max_new_tokens=6, logprobs=True)]


def _run(dec: SafeDecoder, packed: bool, max_seqs: int = 3, budget: int | None = None):
    """Requests arriving at different steps, past ``max_seqs`` (queued), one with n = 2
    choices (forked at prefill); returns {index: (tokens, logprobs)}, the forward count and
    the engine."""
    eng = dec.engine(max_seqs=max_seqs, packed=packed, max_prefill_tokens=budget)
    forwards = []
    handle = dec.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    ids: dict[int, int] = {}
    try:
        for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS, strict=True)):
            if i == 2:
                for j, rid in enumerate(eng.add_choices(p, sp, 2)):
                    ids[rid] = 10 + j
            else:
                ids[eng.add_request(p, sp)] = i
            eng.step()
        out = {}
        while eng.has_unfinished():
            eng.step()
        for rid, i in ids.items():
            r = eng.pop_result(rid)
            out[i] = (r.token_ids, r.logprobs)
    finally:
        handle.remove()
    return out, len(forwards), eng


@pytest.mark.parametrize("which", ["plain", "acd-text", "soft", "soft-no-prefix-cache"])
def test_packed_steps_equal_two_forward_steps_in_fewer_forwards(which):
    model, tok = tiny_llama()
    if which in ("plain", "acd-text"):
        dec = SafeDecoder(model, tok, methods.get(which))
    else:
        dec = SafeDecoder(model, tok, soft_method(model, tok),
                          prefix_cache=which == "soft")
    two, n_two, eng_two = _run(dec, packed=False)
    computed = dec.prefixes.forwards  # prefixes computed in a step are a forward of their own
    one, n_one, eng_one = _run(dec, packed=True)  # (the chat's history, at its second sighting)
    computed = dec.prefixes.forwards - computed
    assert eng_one.runner.pack is True and eng_two.runner.pack is False
    assert eng_one.state.free_slots == eng_one.state.max_seqs
    assert set(one) == set(two) == {0, 1, 10, 11, 3, 4}
    for i in two:
        assert one[i][0] == two[i][0], (which, i)
        assert one[i][1] == pytest.approx(two[i][1], abs=1e-4), (which, i)
    assert n_one == eng_one.steps + computed  # one forward per step, admissions included
    assert n_two > n_one  # two forwards wherever a step admitted while others decoded


def test_packed_prefill_alone_equals_padded_prefill_for_prompts_of_mixed_lengths():
    """A first step that only prefills (nothing running) packs prompts of different lengths
    without padding: the same next-token logits as the padded prefill."""
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("acd-text"))
    logits = {}
    for packed in (False, True):
        eng = dec.engine(max_seqs=4, packed=packed)
        for p in PROMPTS[:4]:
            eng.add_request(p, SamplingParams(max_new_tokens=2))
        seqs = eng.scheduler.waiting()
        slots = tuple(range(len(seqs)))
        for _ in slots:
            eng.state.acquire()
        built = [s.built for s in seqs]
        if packed:
            dec_logits, logits[packed], _ = eng.runner.packed(eng.state, (), slots, built)
            assert dec_logits is None
        else:
            logits[packed] = eng.runner.prefill(eng.state, slots, built)
    assert logits[True].shape == logits[False].shape == (4, 2, len(tok))
    torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=1e-4)


def test_methods_with_branch_hooks_keep_two_forwards():
    model, tok = tiny_llama()
    hooked = contrastive([Branch(hooks=(BranchHook("model.layers.0", lambda h: h * 1.5),)),
                          Branch()], [1.5, -0.5])
    dec = SafeDecoder(model, tok, hooked)
    one, n_one, eng = _run(dec, packed=True)
    two, _, _ = _run(dec, packed=False)
    assert not eng.runner.can_pack
    assert {i: t for i, (t, _) in one.items()} == {i: t for i, (t, _) in two.items()}
    assert n_one > eng.steps


def test_a_model_on_eager_attention_keeps_two_forwards():
    """Eager attention may hold model-specific terms (soft-capping, sinks) that the packed SDPA
    function does not: such a model is not packed, and decodes as before."""
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("acd-text"))
    two, _, _ = _run(dec, packed=False)
    model.config._attn_implementation = "eager"
    try:
        one, n_one, eng = _run(dec, packed=True)
        assert not eng.runner.can_pack
    finally:
        model.config._attn_implementation = "sdpa"
    assert eng.runner.pack is None and n_one > eng.steps  # never tried: two forwards
    assert {i: t for i, (t, _) in one.items()} == {i: t for i, (t, _) in two.items()}


@pytest.mark.parametrize("budget", [None, 4])
def test_a_model_whose_attention_does_not_route_falls_back_to_two_forwards(monkeypatch,
                                                                            budget):
    """If the packed attention function is never reached (a model that ignores transformers'
    attention interface), the first packed step notices, warns once and redoes the step with
    two forwards: the same tokens, no lost or mixed request (with a prefill budget too, where
    requests were waiting for their chunks)."""
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("acd-text"))
    two, _, _ = _run(dec, packed=False)
    monkeypatch.setattr(step_module, "packed_attention_on", lambda m: contextlib.nullcontext())
    with pytest.warns(UserWarning, match="cannot run packed"):
        one, _, eng = _run(dec, packed=True, budget=budget)
    assert eng.runner.pack is False and not eng.runner.can_pack and not eng._prefilling
    assert {i: t for i, (t, _) in one.items()} == {i: t for i, (t, _) in two.items()}


def test_packed_attention_outside_a_packed_forward_is_a_clear_error():
    from safedecode.engine.packed import packed_attention

    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="only inside a safedecode packed forward"):
        packed_attention(None, q, q, q, None)


def test_the_default_model_packs_and_matches_two_forwards():
    """The embedded model (SmolLM2, GQA, 30 layers): packed = two forwards, greedy."""
    from engine_fixtures import default_model

    model, tok = default_model()
    dec = SafeDecoder(model, tok, methods.get("acd-text"))
    res = {}
    for packed in (False, True):
        eng = dec.engine(max_seqs=2, packed=packed)
        a = eng.add_request(PROMPTS[1], SamplingParams(max_new_tokens=6))
        eng.step()
        b = eng.add_request(PROMPTS[4], SamplingParams(max_new_tokens=4))
        while eng.has_unfinished():
            eng.step()
        res[packed] = (eng.pop_result(a).token_ids, eng.pop_result(b).token_ids)
        assert eng.runner.pack is packed
    assert res[True] == res[False]


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_prompt_lengths_are_what_the_prefill_writes(prefix_cache):
    """``ModelStep.prompt_lengths`` (what chunked prefill counts to decide a prompt is done) is
    the number of tokens the prefill writes after the shared prefix, for text, soft and
    system-prompt branches, with and without the prefix cache."""
    model, tok = tiny_llama()
    ids = tok("You are careful.", add_special_tokens=False)["input_ids"]
    soft = model.get_input_embeddings()(torch.tensor(ids)).detach()
    method = contrastive([Branch(soft_prompt=soft), Branch(system="Be helpful."), Branch()],
                         [1.5, -0.25, -0.25])
    eng = SafeDecoder(model, tok, method, prefix_cache=prefix_cache).engine(max_seqs=2)
    for prompt in PROMPTS[:3]:
        built = eng.build(prompt)
        slot = eng.state.acquire()
        eng.runner.prefill(eng.state, (slot,), [built])
        written = [eng.state.host_len[slot * 3 + k] - (len(p) if prefix_cache else 0)
                   for k, (p, _) in enumerate(built)]
        assert eng.runner.prompt_lengths(built) == written, prompt
        eng.state.release(slot)
