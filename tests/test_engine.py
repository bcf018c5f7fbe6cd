"""The engine: greedy equivalence with the naive K-pass generator and with unbatched runs,
prefix sharing, seeds, errors, streaming, stopping, hooks and soft prompts."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import (
    DROPS_SYSTEM,
    MIXED_PROMPTS,
    NO_SYSTEM_ROLE,
    default_model,
    tiny_llama,
)

from safedecode import methods
from safedecode.bench.naive import NaiveContrastGenerator
from safedecode.engine import Branch, BranchHook, SafeDecoder, contrastive, plain

METHODS = {
    1: plain,
    2: lambda: methods.get("acd-text", alpha=0.5),
    3: lambda: contrastive([Branch(system="Be safe."), Branch(),
                            Branch(system="Be bold and brave.")], [1.0, -0.3, 0.5], beta=0.05),
}


def _ids(results):
    return [r.token_ids for r in results]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_equals_naive_and_unbatched_tiny(k):
    model, tok = tiny_llama()
    m = METHODS[k]()
    shared = _ids(SafeDecoder(model, tok, m).generate(MIXED_PROMPTS, max_new_tokens=16))
    unshared = _ids(SafeDecoder(model, tok, m, prefix_cache=False)
                    .generate(MIXED_PROMPTS, max_new_tokens=16))
    naive = _ids(NaiveContrastGenerator(model, tok, m).generate(MIXED_PROMPTS, max_new_tokens=16))
    alone = [SafeDecoder(model, tok, m).generate([p], max_new_tokens=16)[0].token_ids
             for p in MIXED_PROMPTS]
    assert all(len(x) == 16 for x in shared)
    assert shared == naive
    assert shared == unshared
    assert shared == alone


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_equals_naive_and_unbatched_default_model(k):
    model, tok = default_model()
    m = METHODS[k]()
    prompts = MIXED_PROMPTS[:2]
    shared = _ids(SafeDecoder(model, tok, m).generate(prompts, max_new_tokens=12))
    unshared = _ids(SafeDecoder(model, tok, m, prefix_cache=False)
                    .generate(prompts, max_new_tokens=12))
    naive = _ids(NaiveContrastGenerator(model, tok, m).generate(prompts, max_new_tokens=12))
    alone = [SafeDecoder(model, tok, m).generate([p], max_new_tokens=12)[0].token_ids
             for p in prompts]
    assert shared == naive == unshared == alone


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_plain_greedy_equals_transformers_generate(which):
    model, tok = tiny_llama() if which == "tiny" else default_model()
    dec = SafeDecoder(model, tok, plain())
    for prompt in MIXED_PROMPTS[:2]:
        res = dec.generate([prompt], max_new_tokens=12)[0]
        prefix, suffix = dec.builder.build(dec.method.branches[0],
                                           [{"role": "user", "content": prompt}], 0)
        ids = torch.tensor([prefix.ids + suffix])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        assert res.token_ids == ref[0, ids.shape[1]:].tolist()


def test_seeds_reproducible_and_batch_invariant():
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, METHODS[2]())
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=1234)
    a = dec.generate(MIXED_PROMPTS, **kw)
    b = dec.generate(MIXED_PROMPTS, **kw)
    assert _ids(a) == _ids(b) and [r.text for r in a] == [r.text for r in b]
    for i, p in enumerate(MIXED_PROMPTS):
        assert dec.generate([p], **kw)[0].token_ids == a[i].token_ids
    other = dec.generate(MIXED_PROMPTS, **{**kw, "seed": 99})
    assert _ids(other) != _ids(a)
    per_request = dec.generate(MIXED_PROMPTS, **{**kw, "seed": [1234, 5, 1234]})
    assert per_request[0].token_ids == a[0].token_ids
    assert per_request[2].token_ids == a[2].token_ids


def test_prefix_is_computed_once_and_reused():
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, METHODS[2]())
    dec.generate(MIXED_PROMPTS, max_new_tokens=2)
    assert dec.prefixes.misses == 2  # one per branch, shared by the three requests
    dec.generate(["another request"], max_new_tokens=2)
    assert dec.prefixes.misses == 2 and dec.prefixes.hits >= 2


def test_prefix_store_keeps_the_most_recently_used_prefixes():
    """Requests with many distinct system messages do not grow the prefix store without
    bound: the least recently used prefix is dropped, and recomputed (same answer) if needed."""
    from safedecode.engine.cache import LRU, PrefixStore

    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, METHODS[2]())  # two branches: two prefixes per message

    def req(i):
        return [{"role": "system", "content": f"Deployment {i}."},
                {"role": "user", "content": "How do I kill aphids?"}]
    first = _ids(dec.generate([req(0)], max_new_tokens=4))
    one_request = dec.prefixes.nbytes  # its two prefixes (the template default's were not made)
    assert len(dec.prefixes) == 2 and one_request > 0
    dec.prefixes = PrefixStore(max_bytes=one_request)
    for i in range(5):
        dec.generate([req(i)], max_new_tokens=4)
    assert len(dec.prefixes) == 2 and dec.prefixes.evicted == 10 - 2
    assert dec.prefixes.nbytes <= one_request
    misses = dec.prefixes.misses
    assert _ids(dec.generate([req(0)], max_new_tokens=4)) == first
    assert dec.prefixes.misses == misses + 2  # both of its prefixes were dropped: recomputed
    dec.builder._prefixes, dec.builder._prefix_text = LRU(2), LRU(1)  # the renders too
    for i in range(1, 4):
        dec.generate([req(i)], max_new_tokens=4)
    assert len(dec.builder._prefixes) == 2 and dec.builder._prefixes.evicted >= 4
    assert _ids(dec.generate([req(0)], max_new_tokens=4)) == first  # re-rendered: same answer
    lru = LRU(2)
    lru["a"], lru["b"] = 1, 2
    assert lru["a"] == 1  # a read makes "a" the most recent
    lru["c"] = 3
    assert list(lru) == ["a", "c"] and lru.evicted == 1
    with pytest.raises(ValueError, match="size"):
        LRU(0)
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixStore(max_bytes=-1)


def test_requests_finishing_early_do_not_change_the_others():
    """A request that stops early frees its slot; the others' tokens are those of lone runs."""
    model, tok = tiny_llama()
    m = METHODS[3]()
    kw = dict(max_new_tokens=10, stop=[" the"])
    dec = SafeDecoder(model, tok, m)
    batch = dec.generate(MIXED_PROMPTS, **kw)
    assert [r.token_ids for r in batch] == [dec.generate([p], **kw)[0].token_ids
                                            for p in MIXED_PROMPTS]


class _Counter:
    def __init__(self, model):
        self.calls = 0
        self.h = model.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))


@pytest.mark.parametrize(
    "prompts,kwargs,match",
    [
        ([""], {}, "empty prompt"),
        (["   "], {}, "empty prompt"),
        ([[{"role": "user", "content": ""}]], {}, "empty user message"),
        ([], {}, "prompts"),
        ([[{"role": "assistant", "content": "hi"}]], {}, "user message"),
        (["hi"], {"temperature": -1.0}, "temperature"),
        (["hi"], {"top_p": 0.0}, "top_p"),
        (["hi"], {"top_k": -3}, "top_k"),
        (["hi"], {"max_new_tokens": 0}, "max_new_tokens"),
        (["hi"], {"max_new_tokens": 100_000}, "context"),
        (["hi " * 600], {}, "context"),
        (["hi", "there"], {"seed": [1]}, "seed"),
        (["hi"], {"stop": [""]}, "stop"),
    ],
)
def test_bad_requests_fail_before_any_forward(prompts, kwargs, match):
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, METHODS[2]())
    counter = _Counter(model)
    try:
        with pytest.raises(ValueError, match=match):
            dec.generate(prompts, **kwargs)
        assert counter.calls == 0, "a forward pass ran before the error"
    finally:
        counter.h.remove()


def test_unknown_method_and_bad_method_args():
    with pytest.raises(ValueError, match="unknown"):
        methods.get("nope")
    with pytest.raises(ValueError, match="acd-text"):
        methods.get("acd-text", gamma=3)
    model, tok = tiny_llama()
    with pytest.raises(ValueError, match="Method"):
        SafeDecoder(model, tok, "acd")


def test_a_requests_system_message_joins_every_branch_after_its_own_prompt():
    """A request's system message (a deployment's system prompt) follows each branch's own
    system text or soft prompt: = the same method with the two texts joined in its branches."""
    model, tok = tiny_llama()
    own = "You answer questions about gardening."
    msgs = [[{"role": "system", "content": own}, {"role": "user", "content": p}]
            for p in ("hi", "How do I kill aphids?")]
    text = contrastive([Branch(system="Be safe."), Branch(system="Be bold.")], [1.0, -0.5])
    joined = contrastive([Branch(system=f"Be safe.\n{own}"), Branch(system=f"Be bold.\n{own}")],
                         [1.0, -0.5])
    got = _ids(SafeDecoder(model, tok, text).generate(msgs, max_new_tokens=6))
    assert got == _ids(SafeDecoder(model, tok, joined).generate(
        [m[1:] for m in msgs], max_new_tokens=6))
    assert got == _ids(NaiveContrastGenerator(model, tok, text).generate(msgs, max_new_tokens=6))
    assert got != _ids(SafeDecoder(model, tok, text).generate([m[1:] for m in msgs],
                                                              max_new_tokens=6))
    # A soft prompt, then the branch's text, then the request's.
    ids = tok("Be safe.", add_special_tokens=False)["input_ids"]
    soft = model.get_input_embeddings()(torch.tensor(ids)).detach()
    soft_m = contrastive([Branch(soft_prompt=soft), Branch()], [1.0, 0.0])
    as_text = contrastive([Branch(system=f"Be safe.\n{own}"), Branch(system=own)], [1.0, 0.0])
    assert _ids(SafeDecoder(model, tok, soft_m).generate(msgs, max_new_tokens=6)) == \
        _ids(SafeDecoder(model, tok, as_text).generate([m[1:] for m in msgs], max_new_tokens=6))
    # A plain branch takes the request's system message as it is (an empty one included).
    empty = [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]
    assert SafeDecoder(model, tok, plain()).generate([empty], max_new_tokens=2)[0].token_ids
    two = [{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
           {"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="more than one system message"):
        SafeDecoder(model, tok, text).generate([two], max_new_tokens=2)


def test_streaming_deltas_add_up_and_transformers_streamer():
    model, tok = default_model()
    dec = SafeDecoder(model, tok, METHODS[2]())
    prompts = ["Write one sentence about the sea.", "Name a colour."]
    final = dec.generate(prompts, max_new_tokens=20)
    texts = ["", ""]
    reasons = [None, None]
    for ev in dec.stream(prompts, max_new_tokens=20):
        texts[ev.index] += ev.text
        if ev.finish_reason:
            reasons[ev.index] = ev.finish_reason
    assert texts == [r.text for r in final]
    assert reasons == [r.finish_reason for r in final]

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    res = dec.generate(prompts[:1], max_new_tokens=8, streamer=rec)[0]
    assert rec.ended and [t for p in rec.puts[1:] for t in p] == res.token_ids
    with pytest.raises(ValueError, match="streamer"):
        dec.generate(prompts, streamer=Recorder())


def test_stop_strings_and_ids_and_eos():
    model, tok = default_model()
    dec = SafeDecoder(model, tok, plain())
    prompt = ["Write two sentences about the moon."]
    full = dec.generate(prompt, max_new_tokens=40)[0]
    assert len(full.text) > 20
    stop = full.text[12:15]
    cut = dec.generate(prompt, max_new_tokens=40, stop=[stop, "never-appears"])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]
    assert full.token_ids[:len(cut.token_ids)] == cut.token_ids
    third = full.token_ids[2]
    by_id = dec.generate(prompt, max_new_tokens=40, stop=[third])[0]
    assert by_id.finish_reason == "stop"
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(third) + 1]
    short = dec.generate(["Say hi."], max_new_tokens=3)[0]
    assert short.finish_reason in ("length", "eos") and len(short.token_ids) <= 3
    assert short.timing["tokens_per_s"] > 0
    # vLLM's include_stop_str_in_output: the stop string ends the text, the tokens the same
    kept = dec.generate(prompt, max_new_tokens=40, stop=[stop],
                        include_stop_str_in_output=True)[0]
    assert kept.text == full.text[:full.text.find(stop) + len(stop)]
    assert kept.token_ids == cut.token_ids and kept.finish_reason == "stop"
    # skip_special_tokens=False: special tokens (here the only ones allowed) are text
    special = tok.convert_tokens_to_ids("<|im_start|>")
    shown = dec.generate(prompt, max_new_tokens=3, allowed_token_ids=[special],
                         skip_special_tokens=False)[0]
    assert shown.text == "<|im_start|>" * 3
    assert dec.generate(prompt, max_new_tokens=3, allowed_token_ids=[special])[0].text == ""


def test_branch_hooks_act_on_their_rows_only():
    model, tok = tiny_llama()
    boom = BranchHook("model.layers.0", lambda h: h + 50.0)
    same = [Branch(system="Be safe."), Branch(system="Be safe.")]
    base = _ids(SafeDecoder(model, tok, contrastive(same, [1.0, 0.0]))
                .generate(MIXED_PROMPTS, max_new_tokens=8))
    hooked_1 = contrastive([same[0], Branch(system="Be safe.", hooks=(boom,))], [1.0, 0.0])
    assert _ids(SafeDecoder(model, tok, hooked_1).generate(MIXED_PROMPTS, max_new_tokens=8)) \
        == base
    hooked_0 = contrastive([Branch(system="Be safe.", hooks=(boom,)), same[1]], [1.0, 0.0])
    assert _ids(SafeDecoder(model, tok, hooked_0).generate(MIXED_PROMPTS, max_new_tokens=8)) \
        != base
    # The hooks were removed when generate returned: an unhooked run is unchanged afterwards.
    assert _ids(SafeDecoder(model, tok, contrastive(same, [1.0, 0.0]))
                .generate(MIXED_PROMPTS, max_new_tokens=8)) == base


def test_soft_prompt_of_text_embeddings_equals_text_branch():
    model, tok = tiny_llama()
    text = "You are careful."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    soft = model.get_input_embeddings()(torch.tensor(ids)).detach()
    a = _ids(SafeDecoder(model, tok, plain(text)).generate(MIXED_PROMPTS, max_new_tokens=8))
    soft_m = contrastive([Branch(soft_prompt=soft)], [1.0])
    b = _ids(SafeDecoder(model, tok, soft_m).generate(MIXED_PROMPTS, max_new_tokens=8))
    c = _ids(NaiveContrastGenerator(model, tok, soft_m).generate(MIXED_PROMPTS, max_new_tokens=8))
    d = _ids(SafeDecoder(model, tok, soft_m, prefix_cache=False)
             .generate(MIXED_PROMPTS, max_new_tokens=8))
    assert a == b == c == d
    with pytest.raises(ValueError, match="width"):
        SafeDecoder(model, tok, contrastive([Branch(soft_prompt=torch.zeros(3, 7))], [1.0]))


@pytest.mark.parametrize("template", [NO_SYSTEM_ROLE, DROPS_SYSTEM])
def test_templates_without_a_system_role_get_the_system_text_in_the_first_user_turn(template):
    """Every method with a system prompt ran into Gemma's "System role not supported" (or lost
    its prompt to a template that drops it): the text now starts the first user message, as
    Gemma 3's own template puts it — the same tokens as that message written by hand, for text
    and soft-prompt branches, a request's own system message, and the naive generator."""
    import copy

    model, tok = tiny_llama()
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    method = methods.get("safe-prompt")
    system = method.branches[0].system
    dec = SafeDecoder(model, tok, method)
    assert dec.builder.system_role is False
    prompts = ["hi", "How do I kill aphids?"]
    folded = [f"{system}\n\n{p}" for p in prompts]
    got = _ids(dec.generate(prompts, max_new_tokens=6))
    assert got == _ids(SafeDecoder(model, tok, plain()).generate(folded, max_new_tokens=6))
    assert got == _ids(NaiveContrastGenerator(model, tok, method).generate(prompts,
                                                                           max_new_tokens=6))
    assert got != _ids(SafeDecoder(model, tok, plain()).generate(prompts, max_new_tokens=6))
    own = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}]
           for p in prompts]
    assert _ids(dec.generate(own, max_new_tokens=6)) == _ids(SafeDecoder(
        model, tok, plain()).generate([f"{system}\nBe brief.\n\n{p}" for p in prompts],
                                      max_new_tokens=6))
    ids = tok("Be safe.", add_special_tokens=False)["input_ids"]
    soft = model.get_input_embeddings()(torch.tensor(ids)).detach()
    soft_m = contrastive([Branch(soft_prompt=soft)], [1.0])
    assert _ids(SafeDecoder(model, tok, soft_m).generate(prompts, max_new_tokens=6)) == \
        _ids(SafeDecoder(model, tok, plain("Be safe.")).generate(prompts, max_new_tokens=6))
    assert SafeDecoder(*tiny_llama(), plain()).builder.system_role is True


def test_soft_prompt_followed_by_system_text_equals_the_text_branch():
    """A branch with a soft prompt and system text renders the text after the soft prompt in the
    system message: with the soft prompt made of a text's embeddings it equals the text branch
    of the two texts joined (Self-CD's emphasis over an optimised SP uses this)."""
    model, tok = tiny_llama()
    head, extra = "You are careful.", "Be safe."
    ids = tok(head, add_special_tokens=False)["input_ids"]
    assert tok(f"{head}\n{extra}", add_special_tokens=False)["input_ids"][:len(ids)] == ids
    soft = model.get_input_embeddings()(torch.tensor(ids)).detach()
    a = _ids(SafeDecoder(model, tok, plain(f"{head}\n{extra}"))
             .generate(MIXED_PROMPTS, max_new_tokens=8))
    both = contrastive([Branch(soft_prompt=soft, system=extra)], [1.0])
    b = _ids(SafeDecoder(model, tok, both).generate(MIXED_PROMPTS, max_new_tokens=8))
    c = _ids(NaiveContrastGenerator(model, tok, both).generate(MIXED_PROMPTS, max_new_tokens=8))
    soft_only = _ids(SafeDecoder(model, tok, contrastive([Branch(soft_prompt=soft)], [1.0]))
                     .generate(MIXED_PROMPTS, max_new_tokens=8))
    assert a == b == c
    assert b != soft_only  # the text is there
    assert Branch(soft_prompt=soft, system=extra).key() != Branch(soft_prompt=soft).key()
    with pytest.raises(ValueError, match="empty text"):
        Branch(soft_prompt=soft, system=" ")


def test_engine_raises_no_warning_from_transformers():
    """The engine uses transformers' current cache API: any warning from its calls is an error
    (the deprecated ``past_key_values=`` argument warned in every ``make demo``)."""
    import warnings

    model, tok = tiny_llama()
    method = methods.get("acd-text")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SafeDecoder(model, tok, method).generate(["Hi there", "Tell me a joke."],
                                                 max_new_tokens=4)
        NaiveContrastGenerator(model, tok, method).generate(["Hi there"], max_new_tokens=3)


@pytest.mark.parametrize("spec", ["plain", "deal"])
def test_kv_buffers_are_freed_without_a_garbage_collection(spec):
    """A finished call's KV cache is freed by reference counting alone: no reference cycle
    keeps the per-layer buffers alive until a full collection (a long DeAL evaluation grew by
    ~1.3 GB per batch and was killed at 24 GB that way)."""
    import gc
    import weakref

    import safedecode.engine.cache as cache_mod

    model, tok = tiny_llama()
    method = (methods.get("plain") if spec == "plain" else
              methods.get("deal", k=2, lookahead=2, reward=lambda p, t: [0.0] * len(t)))
    dec = SafeDecoder(model, tok, method)
    made = []
    orig = cache_mod.SlotCache.__init__

    def record(self, *a, **kw):
        orig(self, *a, **kw)
        made.append(weakref.ref(self))

    cache_mod.SlotCache.__init__ = record
    gc.collect()
    gc.disable()
    try:
        dec.generate(["Hi", "Name a colour."], max_new_tokens=4)
        assert made and all(r() is None for r in made)
    finally:
        gc.enable()
        cache_mod.SlotCache.__init__ = orig
