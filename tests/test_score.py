"""``SafeDecoder.score``: the log-probabilities of a given answer under a method, equal to the
final distribution recomputed from scratch by teacher forcing."""

from __future__ import annotations

import math

import pytest
from engine_fixtures import SAMPLING_PROMPTS, final_from_scratch, tiny_acd_decoder, tiny_llama

from safedecode import methods
from safedecode.engine import SafeDecoder

PROMPTS = SAMPLING_PROMPTS


@pytest.fixture(scope="module")
def acd():
    return tiny_acd_decoder()


def test_score_equals_teacher_forcing_from_scratch(acd):
    """A generated answer, a mixed one and a string: each token's log-prob = the final
    distribution from scratch at its position; with top-k 5, -inf where that drops it."""
    greedy = acd.generate(PROMPTS, max_new_tokens=6, return_logprobs=True)
    conts = [greedy[0].token_ids, greedy[1].token_ids[:3] + [1234, 5678, 42], " a colour"]
    res = acd.score(PROMPTS, conts)
    assert res[0].logprobs == pytest.approx(greedy[0].logprobs, abs=1e-5)
    check(acd, res, {})
    assert res[2].token_ids == acd.tok(" a colour", add_special_tokens=False)["input_ids"]
    assert check(acd, acd.score(PROMPTS, conts, top_k=5), {"top_k": 5})  # some -inf


def check(acd, res, knobs) -> bool:
    """Each result's log-probs = the from-scratch ones; whether some were -inf."""
    seen_inf = False
    for prompt, r in zip(PROMPTS, res, strict=True):
        ref = final_from_scratch(acd, prompt, r.token_ids, **knobs)
        want = [float(ref[t, tok]) for t, tok in enumerate(r.token_ids)]
        for got, w in zip(r.logprobs, want, strict=True):
            if math.isinf(w):
                seen_inf = True
                assert got == w
            else:
                assert got == pytest.approx(w, abs=1e-4)
    return seen_inf


def test_score_in_batches_equals_alone_and_keeps_top_logprobs(acd):
    conts = [[1234, 99, 7], [5, 6], [42]]
    together = acd.score(PROMPTS, conts, max_batch=2, top_logprobs=2)
    for p, c, r in zip(PROMPTS, conts, together, strict=True):
        alone = acd.score(p, c, top_logprobs=2)[0]
        assert r.token_ids == c == alone.token_ids
        assert r.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
        assert [[i for i, _ in s] for s in r.top_logprobs] == \
            [[i for i, _ in s] for s in alone.top_logprobs]


def test_score_bad_input_is_named(acd):
    with pytest.raises(ValueError, match="continuations: expected 3"):
        acd.score(PROMPTS, [[1]])
    with pytest.raises(ValueError, match="one per prompt"):
        acd.score(PROMPTS, "abc")
    with pytest.raises(ValueError, match="continuation: token ids in"):
        acd.score("Hi", [10**9])
    with pytest.raises(ValueError, match="continuation: expected a non-empty"):
        acd.score("Hi", [])
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("deal", k=2, lookahead=1,
                                              reward=lambda p, t: [0.0] * len(t)))
    with pytest.raises(ValueError, match="score: not supported by a search method"):
        dec.score("Hi", [1])
