"""Token bans (``SamplingParams``: ``min_tokens``, ``bad_words`` / ``bad_words_ids``,
``allowed_token_ids``): the engine's tokens equal a from-scratch loop that sets the banned
tokens to ``-inf`` on every branch, per request in a shared batch, through forks, slot moves
and truncations; bad values are named."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import SAMPLING_PROMPTS, fork_then_truncate, one_token_words, tiny_acd_decoder

from safedecode import methods
from safedecode.engine import SafeDecoder, SamplingParams
from safedecode.engine.engine import eos_ids
from safedecode.ops import contrastive_sample

PROMPTS = SAMPLING_PROMPTS


@pytest.fixture(scope="module")
def acd():
    return tiny_acd_decoder()


@pytest.fixture(scope="module")
def decoders(acd):
    model, tok = acd.model, acd.tok
    return {"acd-text": acd, "self-cd": SafeDecoder(model, tok, methods.get("self-cd")),
            "plain": SafeDecoder(model, tok, methods.get("plain")),
            "union": SafeDecoder(model, tok, methods.get("safeinfer-sgds", unsafe="text",
                                                         lam=0.8))}


def _branch_ids(dec, prompt: str) -> list[list[int]]:
    out = []
    for branch in dec.method.branches:
        prefix, suffix = dec.builder.build(branch, [{"role": "user", "content": prompt}], 0)
        out.append(prefix.ids + suffix)
    return out


def _from_scratch(dec, prompt: str, n: int, *, banned=(), allowed=None, words=(),
                  ends=(), min_tokens: int = 0, ngram: int = 0) -> list[int]:
    """Greedy tokens, every step recomputed without a cache: ``banned``, the tokens outside
    ``allowed``, each of ``words``' last token where the anchor branch's prompt + the answer
    end in the tokens before it, every token that would repeat an ``ngram``-gram of that
    context, and ``ends`` (with the model's EOS) while fewer than ``min_tokens`` are out, all
    ``-inf`` on every branch."""
    m = dec.method
    stop = set(eos_ids(dec.model, dec.tok)) | set(ends)
    ids = _branch_ids(dec, prompt)
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            z = torch.stack([dec.model(torch.tensor([x + out])).logits[0, -1] for x in ids])
        ban = torch.zeros(z.shape[-1], dtype=torch.bool)
        ban[list(banned)] = True
        if allowed is not None:
            keep = torch.zeros_like(ban)
            keep[list(allowed)] = True
            ban |= ~keep
        context = ids[m.anchor] + out
        for w in words:
            if len(w) > 1 and context[len(context) - len(w) + 1:] == list(w[:-1]):
                ban[w[-1]] = True
        if ngram:  # the n-grams whose first n - 1 tokens end the context: their last
            head = context[len(context) - ngram + 1:] if ngram > 1 else []
            for i in range(len(context) - ngram + 1):
                if context[i:i + ngram - 1] == head:
                    ban[context[i + ngram - 1]] = True
        if len(out) < min_tokens:
            ban[sorted(stop)] = True
        z[:, ban] = float("-inf")
        tok = int(contrastive_sample(z[:, None, :], list(m.weights), rule=m.rule,
                                     anchor=m.anchor, beta=m.beta, temperature=0.0,
                                     backend="reference")[0])
        out.append(tok)
        if tok in stop:
            break
    return out


def _plain_answer(dec, prompt: str, n: int = 10) -> list[int]:
    return dec.generate(prompt, max_new_tokens=n, ignore_eos=True)[0].token_ids


@pytest.mark.parametrize("name", ["acd-text", "self-cd", "plain", "union"])
def test_bans_equal_the_loop_from_scratch(decoders, name):
    """Each kind of ban changes the greedy answer, and the answer = the loop from scratch:
    one-token bad words, a two-token word (its second token banned right after its first),
    one spanning the prompt's last token and the answer's first, an allowed list, and the
    end tokens under ``min_tokens`` (a stop id the model takes early). (Under the linear
    rule a ``-inf`` anchor alone excludes a token; the union rule (SafeInfer's sGDS)
    normalises each branch, so there the other branch must be banned too.)"""
    dec = decoders[name]
    prompt = PROMPTS[1]
    base = _plain_answer(dec, prompt)
    last_prompt = _branch_ids(dec, prompt)[dec.method.anchor][-1]
    allowed = sorted(set(base[::2]) | {7, 99, 1234})
    # the prompt's last tokens and enough others for 10 tokens, none twice, none the prompt's
    wide = sorted(set(_branch_ids(dec, prompt)[dec.method.anchor][-6:]) | set(range(100, 112)))
    cases = [
        ({"bad_words_ids": [[base[1]], [base[4]]]}, {"banned": [base[1], base[4]]}),
        ({"bad_words_ids": [[base[2], base[3]]]}, {"words": [(base[2], base[3])]}),
        ({"bad_words_ids": [[last_prompt, base[0]]]}, {"words": [(last_prompt, base[0])]}),
        ({"allowed_token_ids": allowed}, {"allowed": allowed}),
        ({"no_repeat_ngram_size": 1, "allowed_token_ids": wide},
         {"ngram": 1, "allowed": wide}),
        ({"no_repeat_ngram_size": 2, "allowed_token_ids": allowed},
         {"ngram": 2, "allowed": allowed}),
        ({"stop_token_ids": [base[1]], "min_tokens": 4},
         {"ends": [base[1]], "min_tokens": 4}),
    ]
    for kw, spec in cases:
        got = dec.generate(prompt, max_new_tokens=10, **kw)[0].token_ids
        assert got == _from_scratch(dec, prompt, 10, **spec), kw
        assert got != base[:len(got)], kw  # it changed the answer
        if "no_repeat_ngram_size" in kw:  # (an allowed list makes the model repeat itself)
            only = {"allowed_token_ids": kw["allowed_token_ids"]}
            assert got != dec.generate(prompt, max_new_tokens=10, **only)[0].token_ids
    early = dec.generate(prompt, max_new_tokens=10, stop_token_ids=[base[1]])[0]
    assert len(early.token_ids) == 2  # without min_tokens the stop id ends it at once


def test_allowed_tokens_only(acd):
    allowed = [7, 99, 1234, 4000]
    r = acd.generate(PROMPTS, max_new_tokens=8, allowed_token_ids=allowed, temperature=1.0,
                     seed=3)
    assert all(set(x.token_ids) <= set(allowed) for x in r)


def test_min_tokens_holds_off_eos_and_stop_strings(acd):
    """A bias that makes EOS the best token ends the answer at once; ``min_tokens`` holds it
    off exactly that long. A stop string in the first token's text ends the answer there,
    but not before ``min_tokens``."""
    eos = acd.tok.eos_token_id
    now = acd.generate(PROMPTS[0], max_new_tokens=10, logit_bias={eos: 100.0})[0]
    assert now.token_ids == [eos] and now.finish_reason == "eos"
    held = acd.generate(PROMPTS[0], max_new_tokens=10, logit_bias={eos: 100.0},
                        min_tokens=4)[0]
    assert len(held.token_ids) == 5 and held.token_ids[-1] == eos
    assert eos not in held.token_ids[:4] and held.finish_reason == "eos"
    base = _plain_answer(acd, PROMPTS[1], 6)
    first = acd.tok.decode(base[:1]).strip()
    assert first
    cut = acd.generate(PROMPTS[1], max_new_tokens=6, stop=[first])[0]
    assert cut.finish_reason == "stop" and len(cut.token_ids) == 1 and not cut.text.strip()
    late = acd.generate(PROMPTS[1], max_new_tokens=6, stop=[first], min_tokens=3)[0]
    assert len(late.token_ids) >= 3 and late.text.strip().startswith(first)


def test_bad_words_are_tokenised_as_vllm_does(acd):
    """A bad word is banned as its own tokens and, where a space before it gives another
    first token and as many tokens, as those too; a one-token word from the answer is
    never generated."""
    tok = acd.tok
    eng = acd.engine()
    words = eng.bad_word_ids(SamplingParams(bad_words=("hello world", " Paris")))
    want = []
    for w in ("hello world", "Paris"):
        a = tuple(tok(w, add_special_tokens=False)["input_ids"])
        b = tuple(tok(" " + w, add_special_tokens=False)["input_ids"])
        want += [a] + ([b] if b[0] != a[0] and len(b) == len(a) else [])
    assert words == want and len(words) > 2
    base = _plain_answer(acd, PROMPTS[1], 12)
    word = one_token_words(tok, tok.decode(base))[0]
    r = acd.generate(PROMPTS[1], max_new_tokens=12, ignore_eos=True, bad_words=[word])[0]
    spelled = {tuple(w) for w in eng.bad_word_ids(SamplingParams(bad_words=(word,)))}
    assert all((t,) not in spelled for t in r.token_ids) and r.token_ids != base


def test_banned_and_plain_requests_share_steps(acd):
    """Each request keeps its own bans in one batch; the middle one ends first, so the last
    moves down a slot with its ban row; a plain request then takes a slot a banned one left,
    beside a banned one, and is not banned."""
    base = _plain_answer(acd, PROMPTS[2], 8)
    allowed = sorted(set(base[::2]) | {7, 99, 1234})
    assert base[1] not in allowed  # the plain answer needs a banned token
    kws = [{"bad_words_ids": [[base[0]], [base[2], base[3]]], "max_new_tokens": 8},
           {"max_new_tokens": 2},
           {"allowed_token_ids": allowed, "min_tokens": 3, "max_new_tokens": 8}]
    eng = acd.engine(max_seqs=3)
    ids = [eng.add_request(PROMPTS[2], SamplingParams(**kw)) for kw in kws]
    for _ in range(3):
        eng.step()
    late = eng.add_request(PROMPTS[2], SamplingParams(max_new_tokens=8))  # slot 1's
    while eng.has_unfinished():
        eng.step()
    for rid, kw in zip(ids, kws, strict=True):
        assert eng.pop_result(rid).token_ids == acd.generate(PROMPTS[2], **kw)[0].token_ids
    assert eng.pop_result(late).token_ids == acd.generate(PROMPTS[2],
                                                          max_new_tokens=8)[0].token_ids


def test_fork_and_truncate_keep_the_bans(acd):
    """A fork goes on with its parent's bans (the ban row and ``min_tokens`` copied, the
    two-token words read from its own tokens); a truncated sequence is banned again by the
    tokens it kept: both decode what the request alone decodes. A bias makes EOS the best
    token at every step, so only ``min_tokens`` keeps the answer going."""
    eos = acd.tok.eos_token_id
    base = _plain_answer(acd, PROMPTS[1], 10)
    allowed = sorted(set(base[::2]) | {7, 99, 1234, eos})
    kw = {"allowed_token_ids": allowed, "logit_bias": {eos: 100.0}, "min_tokens": 8,
          "max_new_tokens": 10}
    held = acd.generate(PROMPTS[1], **kw)[0].token_ids
    assert len(held) == 9 and held[-1] == eos and set(held) <= set(allowed)
    kw["bad_words_ids"] = [[held[4], held[5]]]
    kw["no_repeat_ngram_size"] = 3
    alone = acd.generate(PROMPTS[1], **kw)[0].token_ids
    assert len(alone) == 9 and alone != held
    parent, kid = fork_then_truncate(acd, PROMPTS[1], SamplingParams(**kw), fork_at=3, keep=2,
                                     max_seqs=3, before=(PROMPTS[0], {"max_new_tokens": 2}))
    assert kid == alone and parent == alone


def test_a_fork_keeps_its_own_ngrams(acd):
    """Sampled with its own seed, a fork repeats n-grams of its own answer only: running its
    parent beside it (other tokens) changes nothing."""
    kw = {"allowed_token_ids": list(range(100, 112)), "no_repeat_ngram_size": 2,
          "temperature": 1.0, "seed": 5, "max_new_tokens": 16}
    kids = []
    for alone in (True, False):
        eng = acd.engine(max_seqs=2)
        a = eng.add_request(PROMPTS[1], SamplingParams(**kw))
        for _ in range(3):
            eng.step()
        kid = eng.fork(a, 1, seeds=[77])[0]
        if alone:
            eng.abort(a)
        while eng.has_unfinished():
            eng.step()
        kids.append(eng.pop_result(kid).token_ids)
        if not alone:
            assert eng.pop_result(a).token_ids[3:] != kids[-1][3:]  # they went apart
    assert kids[0] == kids[1]
    pairs = list(zip(kids[0], kids[0][1:], strict=False))
    assert len(set(pairs)) == len(pairs)  # no bigram twice


def test_banned_tokens_leave_the_distribution(acd):
    """``top_logprobs`` never lists a banned token, and ``score`` gives it ``-inf``."""
    base = _plain_answer(acd, PROMPTS[1], 4)
    r = acd.generate(PROMPTS[1], max_new_tokens=4, return_logprobs=True, top_logprobs=5,
                     bad_words_ids=[[base[0]]])[0]
    assert all(base[0] not in [t for t, _ in step] for step in r.top_logprobs)
    free = acd.score(PROMPTS[1], base)[0].logprobs
    s = acd.score(PROMPTS[1], base, bad_words_ids=[[base[2]]])[0].logprobs
    assert s[2] == float("-inf") and all(x > float("-inf") for x in free)
    assert s[:2] == pytest.approx(free[:2], abs=1e-4)


@pytest.mark.parametrize("kw, match", [
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 9, "max_new_tokens": 8}, "min_tokens: must be <= max_new_tokens"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [-2]}, "allowed_token_ids"),
    ({"bad_words_ids": [[]]}, "bad_words_ids"),
    ({"bad_words_ids": [5]}, "bad_words_ids"),
    ({"bad_words": ["  "]}, "bad_words"),
    ({"bad_words": "word"}, "bad_words"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
])
def test_bad_bans_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_bans_the_model_cannot_honour_are_named(acd):
    for kw, match in (({"allowed_token_ids": [10_000_000]}, "allowed_token_ids: token id"),
                      ({"bad_words_ids": [[3, 10_000_000]]}, "bad_words_ids: token id"),
                      ({"allowed_token_ids": [acd.tok.eos_token_id], "min_tokens": 2},
                       "min_tokens: every token in allowed_token_ids ends")):
        with pytest.raises(ValueError, match=match):
            acd.generate("Hi", max_new_tokens=4, **kw)
    model, tok = acd.model, acd.tok
    deal = SafeDecoder(model, tok, methods.get("deal", k=2, lookahead=1,
                                               reward="length:target=4"))
    with pytest.raises(ValueError, match="min_tokens: not supported by deal"):
        deal.generate("Hi", max_new_tokens=4, min_tokens=2)
