"""Requests' common leading tokens shared as a prefix (``PromptBuilder.share_tokens``, vLLM's
automatic prefix caching): whole blocks of ``TOKEN_BLOCK`` ids that two requests start with join
the branch's prefix, their KV computed once; a run extends the stored run of its chain it starts
like, or is cut from a longer one. The answers equal those without any prefix cache."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import method_named, tiny_arch, tiny_llama

from safedecode import methods
from safedecode.engine import Branch, BranchHook, SafeDecoder, SamplingParams, contrastive
from safedecode.engine.cache import TURN_STORE_BYTES
from safedecode.engine.decoder import TokenPrompts
from safedecode.engine.prompts import MIN_SHARED_TOKENS, TOKEN_BLOCK

CONTEXT = " ".join(f"Q: what is {i} plus {i}? A: {2 * i}." for i in range(10))
TAILS = [" Q: what is 20 plus 20? A:", " Q: what is 31 plus 31? A:", " Q: name a colour. A:"]


def _prompts(kind: str, tok, lone: str) -> list:
    texts = [CONTEXT + t for t in TAILS] + [lone]
    if kind == "raw":
        return texts
    if kind == "ids":
        return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [[{"role": "user", "content": t}] for t in texts]  # chat: a document, then asks


def _run(dec, prompts, raw, budget):
    eng = dec.engine(max_seqs=4, max_prefill_tokens=budget)
    ids = [eng.add_request(p, SamplingParams(max_new_tokens=5, logprobs=True), raw=raw)
           for p in prompts]
    while eng.has_unfinished():
        eng.step()
    return [eng.pop_result(i) for i in ids]


@pytest.mark.parametrize("name, arch, kind", [
    ("plain", None, "raw"), ("acd-text", None, "ids"), ("soft", None, "chat"),
    ("soft", None, "raw"), ("acd-text", "mistral-window", "chat")])
@pytest.mark.parametrize("budget", [None, 16])
def test_shared_leading_tokens_give_the_answers_of_no_prefix_cache(name, arch, kind, budget):
    """Requests that start alike (a few-shot completion, a document then a question), one by
    one through the engine, whole prompts or chunked prefill, twice: tokens and log-probs = the
    decoder without any prefix cache; from the second request on each branch's prefix holds
    the common blocks, a request with its own start keeps the branch's own prefix."""
    model, tok = tiny_arch(arch) if arch else tiny_llama()
    m = method_named(name, model, tok)
    dec = SafeDecoder(model, tok, m)
    raw = kind != "chat"
    for call in range(2):
        prompts = _prompts(kind, tok, f"Call {call}: something else entirely, {call}.")
        ref = SafeDecoder(model, tok, m, prefix_cache=False).generate(
            prompts, raw=raw, max_new_tokens=5, return_logprobs=True)
        got = _run(dec, prompts, raw, budget)
        for g, r in zip(got, ref, strict=True):
            assert g.token_ids == r.token_ids
            assert g.logprobs == pytest.approx(r.logprobs, abs=1e-4)
    # one call's requests: the three that start alike share from the first on, the lone not
    built = SafeDecoder(model, tok, m).builder.build_requests(m.branches, prompts, raw=raw)
    heads = SafeDecoder(model, tok, m).builder.build_request(m.branches, prompts[0], 0,
                                                             raw=raw)
    for k in range(m.k):
        grown = [len(b[k][0]) - len(heads[k][0]) for b in built]
        assert min(grown[:3]) >= MIN_SHARED_TOKENS and grown[3] == 0
        assert all(g % TOKEN_BLOCK == 0 for g in grown)


def test_a_run_extends_the_shorter_runs_of_its_chain_or_is_cut_from_a_longer_one():
    """Token-id completions on ``plain`` (an empty branch prefix): the first pair's common run
    is computed whole; a pair sharing less is cut from it (one column computed: a request's
    last prefix position is always recomputed); a pair sharing more extends it by the new
    blocks only. The answers = no prefix cache throughout."""
    model, tok = tiny_llama()
    m = methods.get("plain")
    dec, ref = SafeDecoder(model, tok, m), SafeDecoder(model, tok, m, prefix_cache=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(10, 40000, (100,), generator=g).tolist()
    calls = [([x + [1, 2, 3], x + [4, 5, 6]], 96),  # (prompts, columns computed)
             ([x[:64] + [7] * 40, x[:64] + [8] * 40], 1),
             ([x + [9] * 60, x + [9] * 60 + [1]], 144 - 96)]
    for prompts, computed in calls:
        before = dec.prefixes.computed_tokens
        got = dec.generate(prompts, raw=True, max_new_tokens=4, return_logprobs=True)
        assert dec.prefixes.computed_tokens - before == computed
        for a, b in zip(got, ref.generate(prompts, raw=True, max_new_tokens=4,
                                          return_logprobs=True), strict=True):
            assert a.token_ids == b.token_ids
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert len(dec.prefixes) == 3


def test_scoring_one_context_against_several_continuations_computes_it_once():
    model, tok = tiny_llama()
    m = methods.get("acd-text")
    dec = SafeDecoder(model, tok, m)
    conts = [" 40.", " forty.", " I do not know.", " 40, since 20 + 20 = 40."]
    prompt = CONTEXT + TAILS[0]
    got = dec.score([prompt] * 4, conts, raw=True)
    ref = SafeDecoder(model, tok, m, prefix_cache=False).score([prompt] * 4, conts, raw=True)
    for a, b in zip(got, ref, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    # one prefix per branch, the context's whole blocks computed once
    built = dec.builder.build_request(m.branches, prompt, 0, raw=True)
    assert len(dec.prefixes) == m.k
    assert dec.prefixes.computed_tokens == sum(len(p) for p, _ in built)
    assert all(len(s) <= TOKEN_BLOCK for _, s in built)


def test_what_is_not_shared():
    """A common start shorter than ``MIN_SHARED_TOKENS``; a branch hooked on the prompt
    positions (its hook acts on them: they stay its own); ``share_tokens`` off."""
    model, tok = tiny_llama()
    hook = BranchHook("model.layers.0", lambda h: h * 1.5, positions="prompt")
    m = contrastive([Branch(system="Be safe.", hooks=(hook,)), Branch()], [1.5, -0.5])
    dec = SafeDecoder(model, tok, m)
    fresh = SafeDecoder(model, tok, m).builder
    prompts = [CONTEXT + t for t in TAILS]
    got = dec.generate(prompts, raw=True, max_new_tokens=4)
    assert [g.token_ids for g in got] == [r.token_ids for r in SafeDecoder(
        model, tok, m, prefix_cache=False).generate(prompts, raw=True, max_new_tokens=4)]
    hooked, unhooked = dec.builder.build_request(m.branches, prompts[0], 0, raw=True)
    alone = fresh.build_request(m.branches, prompts[0], 0, raw=True)
    assert len(hooked[0]) == len(alone[0][0]) and len(unhooked[0]) > len(alone[1][0])
    short = [CONTEXT[:20] + " one", CONTEXT[:20] + " two"]
    assert len(tok(CONTEXT[:20] + " one")["input_ids"]) < MIN_SHARED_TOKENS
    for p in short + short:
        built = dec.builder.build_request(m.branches, p, 0, raw=True)
    assert len(built[1][0]) == len(alone[1][0])  # under MIN_SHARED_TOKENS in common
    dec.builder.share_tokens = False
    off = dec.builder.build_request(m.branches, prompts[0], 0, raw=True)
    assert [len(p) for p, _ in off] == [len(p) for p, _ in alone]


def test_a_chat_request_sharing_leading_tokens_still_keeps_its_turn():
    """A chat's first request shares its start with another (a document both ask about); its
    answer is still kept as a turn, and the chat's next turn extends it (a few columns)."""
    model, tok = tiny_llama()
    m = methods.get("plain")
    dec = SafeDecoder(model, tok, m)
    first = [[{"role": "user", "content": CONTEXT + t}] for t in TAILS[:2]]
    out = dec.generate(first, max_new_tokens=5)
    assert len(dec.turns) == 2
    grown = [c + [{"role": "assistant", "content": o.text},
                  {"role": "user", "content": "And then?"}] for c, o in
             zip(first, out, strict=True)]
    before = dec.prefixes.computed_tokens
    got = dec.generate(grown, max_new_tokens=5, return_logprobs=True)
    assert dec.prefixes.computed_tokens - before <= 2 * 4
    ref = SafeDecoder(model, tok, m, prefix_cache=False).generate(
        grown, max_new_tokens=5, return_logprobs=True)
    for a, b in zip(got, ref, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


@pytest.mark.parametrize("name", ["acd-text", "soft"])
def test_a_long_prefix_is_computed_within_the_prefill_budget_while_others_decode(name):
    """Under ``max_prefill_tokens`` a prefix that is not stored (here the requests' common
    start) is computed over several steps, at most the budget per step, while a sequence
    decodes; its chunks' entries are dropped once it is whole; the answers = no prefix cache."""
    model, tok = tiny_llama()
    m = method_named(name, model, tok)
    dec = SafeDecoder(model, tok, m)
    eng = dec.engine(max_seqs=4, max_prefill_tokens=16)
    params = SamplingParams(max_new_tokens=5, logprobs=True)
    long = SamplingParams(max_new_tokens=80, ignore_eos=True, logprobs=True)
    first = eng.add_request("Hello there.", long)
    eng.step()  # it decodes from here on
    prompts = [CONTEXT + t for t in TAILS]
    ids = [eng.add_request(p, params, raw=True) for p in prompts]
    per_step = []
    while eng.has_unfinished():
        before = dec.prefixes.computed_tokens
        eng.step()
        per_step.append(dec.prefixes.computed_tokens - before)
    assert max(per_step) <= 16
    shared = dec.builder.build_request(m.branches, prompts[2], 2, raw=True)
    assert sum(per_step) >= sum(len(p) for p, _ in shared) - 2 * 67  # beyond the heads
    assert not [key for key in dec.prefixes._kv if "#" in key]
    ref = SafeDecoder(model, tok, m, prefix_cache=False)
    want = ref.generate(["Hello there."], max_new_tokens=80, ignore_eos=True,
                        return_logprobs=True) + ref.generate(prompts, raw=True, max_new_tokens=5,
                                                            return_logprobs=True)
    for rid, r in zip([first, *ids], want, strict=True):
        got = eng.pop_result(rid)
        assert got.token_ids == r.token_ids
        assert got.logprobs == pytest.approx(r.logprobs, abs=1e-4)


def test_rendered_prompts_share_their_common_start():
    """``TokenPrompts`` (``custom_generate``'s path: each branch's prompt rendered by the
    caller, no branch prefix split off): the requests' common leading tokens under each branch
    are computed once; the answers = no prefix cache."""
    model, tok = tiny_llama()
    m = methods.get("acd-text")
    builder = SafeDecoder(model, tok, m).builder
    builder.share_tokens = False
    prompts = [CONTEXT + t for t in TAILS]
    ids = [[p.ids + s for p, s in (builder.build(br, [{"role": "user", "content": q}], 0)
                                   for q in prompts)] for br in m.branches]
    dec = SafeDecoder(model, None, m)
    got = dec.generate(TokenPrompts(ids), max_new_tokens=5, return_logprobs=True)
    ref = SafeDecoder(model, None, m, prefix_cache=False).generate(
        TokenPrompts(ids), max_new_tokens=5, return_logprobs=True)
    for a, b in zip(got, ref, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert len(dec.prefixes) == m.k  # one common run per branch
    total = sum(len(x) for branch in ids for x in branch)
    assert m.k * MIN_SHARED_TOKENS <= dec.prefixes.computed_tokens <= total / len(prompts)


def test_engine_token_requests_share_their_common_start_and_are_kept():
    """``Engine.add_tokens`` (a tokenizer-less caller: another serving stack), one request at a
    time: the second request sharing the first's start under each branch shares it (one run
    per branch), and a request continuing a finished one's prompt + answer computes one
    column per branch on its kept KV; the answers = no prefix cache."""
    model, tok = tiny_llama()
    m = methods.get("acd-text")
    builder = SafeDecoder(model, tok, m).builder
    builder.share_tokens = False
    rendered = [[p.ids + s for p, s in (builder.build(br, [{"role": "user", "content": q}], 0)
                                        for q in (CONTEXT + t for t in TAILS))]
                for br in m.branches]

    def run(dec, reqs):
        eng = dec.engine(max_seqs=2)
        out = []
        for req in reqs:  # one at a time, as a server gets them
            rid = eng.add_tokens(req, SamplingParams(max_new_tokens=5, logprobs=True))
            while eng.has_unfinished():
                eng.step()
            out.append(eng.pop_result(rid))
        return out

    dec = SafeDecoder(model, None, m)
    ref = SafeDecoder(model, None, m, prefix_cache=False)
    reqs = [[branch[i] for branch in rendered] for i in range(2)]
    got, exp = run(dec, reqs), run(ref, reqs)
    assert len(dec.prefixes) == m.k and len(dec.turns) > 0  # the common start; kept answers
    before = dec.prefixes.computed_tokens
    more = [[*reqs[1][k], *got[1].token_ids[:-1], got[1].token_ids[-1], 13]
            for k in range(m.k)]  # the second's prompt + answer, continued
    got += run(dec, [more])
    exp += run(ref, [more])
    for a, b in zip(got, exp, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert dec.prefixes.computed_tokens - before == m.k  # one column per branch


def test_the_branches_prefixes_computed_in_one_forward_keep_their_own_effects():
    """Every branch's new prefixes are computed in one forward: a hook on one branch (acting
    on all positions, the prefix's too) changes its rows only — the answers = no prefix cache,
    and a hookless twin of the method gives other answers."""
    model, tok = tiny_llama()
    hook = BranchHook("model.layers.0", lambda h: h * 3.0, positions="all")
    m = contrastive([Branch(system="Be safe.", hooks=(hook,)), Branch()], [1.5, -0.5])
    twin = contrastive([Branch(system="Be safe."), Branch()], [1.5, -0.5])
    prompts = [CONTEXT + t for t in TAILS]
    dec = SafeDecoder(model, tok, m)
    got = dec.generate(prompts, raw=True, max_new_tokens=6, return_logprobs=True)
    assert dec.prefixes.forwards == 1 and len(dec.prefixes) >= m.k  # every branch's runs
    ref = SafeDecoder(model, tok, m, prefix_cache=False).generate(
        prompts, raw=True, max_new_tokens=6, return_logprobs=True)
    for a, b in zip(got, ref, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    other = SafeDecoder(model, tok, twin).generate(prompts, raw=True, max_new_tokens=6,
                                                   return_logprobs=True)
    assert any(a.logprobs != pytest.approx(b.logprobs, abs=1e-3)
               for a, b in zip(got, other, strict=True))


@pytest.mark.parametrize("name", ["plain", "acd-text", "soft"])
def test_a_finished_request_is_kept_for_the_requests_that_start_like_it(name):
    """One request at a time (as a server gets them), token-id completions: a finished
    request's prompt + answer KV is kept, so the next request that starts like it — another
    question on the same text, or the same text continued after the answer — computes one
    column per branch on top of it, at its first sighting, and the continuation shares
    through the answer; without a turn store the common start is computed whole, and the
    continuation shares no more than the first prompt's blocks. Answers = no prefix cache."""
    model, tok = tiny_llama()
    m = method_named(name, model, tok)
    ref = SafeDecoder(model, tok, m, prefix_cache=False)
    x = torch.randint(10, 40000, (110,), generator=torch.Generator().manual_seed(1)).tolist()
    params = {"max_new_tokens": 6, "ignore_eos": True, "return_logprobs": True}
    for keep in (True, False):
        dec = SafeDecoder(model, tok, m, turn_store_bytes=TURN_STORE_BYTES if keep else 0)
        first = dec.generate([x], raw=True, **params)[0]
        other = x[:100] + [11] * 10  # shares 6 whole blocks (96 ids) with x
        more = x + first.token_ids + [12] * 20  # x, the answer (5 fed, kept), more
        # kept: one column each (``more``'s run is longer than ``other``'s, through x's last
        # block and the answer: cut from x's kept KV, not ``other``'s stored run, which would
        # cost nothing); not kept: ``other``'s run whole, then ``more`` reuses it
        for b, kept, alone in ((other, m.k, 96), (more, m.k, 0)):
            before = dec.prefixes.computed_tokens
            got = dec.generate([b], raw=True, **params)[0]
            assert dec.prefixes.computed_tokens - before == (kept if keep else m.k * alone)
            want = ref.generate([b], raw=True, **params)[0]
            assert got.token_ids == want.token_ids
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)


def test_a_finished_request_too_short_to_share_is_not_kept():
    """A raw request with fewer than ``MIN_SHARED_TOKENS`` ids after its branch's prefix
    (answer included) is not copied into the turn store; a longer one is."""
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("plain"))
    dec.generate([[5, 6, 7, 8]], raw=True, max_new_tokens=4, ignore_eos=True)
    assert len(dec.turns) == 0
    dec.generate([list(range(10, 50))], raw=True, max_new_tokens=4, ignore_eos=True)
    assert len(dec.turns) == 1
