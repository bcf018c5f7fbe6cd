"""``SamplingParams.top_logprobs``: each step's best tokens of the method's final distribution,
checked against the distribution recomputed from scratch by teacher forcing."""

from __future__ import annotations

import math

import pytest
import torch
from engine_fixtures import SAMPLING_PROMPTS, final_from_scratch, tiny_acd_decoder, tiny_llama

from safedecode import methods
from safedecode.engine import SafeDecoder, SamplingParams

PROMPTS = SAMPLING_PROMPTS


@pytest.fixture(scope="module")
def acd():
    return tiny_acd_decoder()


def test_greedy_top_logprobs_equal_the_distribution_from_scratch(acd):
    res = acd.generate(PROMPTS, max_new_tokens=8, return_logprobs=True, top_logprobs=5)
    for prompt, r in zip(PROMPTS, res, strict=True):
        assert len(r.top_logprobs) == len(r.token_ids) == len(r.logprobs)
        ref = final_from_scratch(acd, prompt, r.token_ids)
        for t, (tok, lp, best) in enumerate(zip(r.token_ids, r.logprobs, r.top_logprobs,
                                                strict=True)):
            assert len(best) == 5
            vals, ids = ref[t].topk(5)
            assert [i for i, _ in best] == ids.tolist(), (prompt, t)
            assert [v for _, v in best] == pytest.approx(vals.tolist(), abs=1e-4)
            assert best[0][0] == tok and best[0][1] == pytest.approx(lp, abs=1e-6)
            assert all(a[1] >= b[1] for a, b in zip(best, best[1:], strict=False))


def test_sampled_top_logprobs_follow_temperature_top_k_and_top_p(acd):
    """Under T = 0.7, top-k 12 and top-p 0.8 the list is the sampled-from distribution: no
    token outside the final set (fewer than asked), the chosen token among them."""
    res = acd.generate(PROMPTS, max_new_tokens=8, temperature=0.7, top_k=12, top_p=0.8,
                       seed=3, return_logprobs=True, top_logprobs=20)
    short = set()
    for prompt, r in zip(PROMPTS, res, strict=True):
        ref = final_from_scratch(acd, prompt, r.token_ids, temperature=0.7, top_k=12, top_p=0.8)
        for t, (tok, lp, best) in enumerate(zip(r.token_ids, r.logprobs, r.top_logprobs,
                                                strict=True)):
            kept = int(torch.isfinite(ref[t]).sum())
            assert len(best) == min(20, kept)
            short.add(len(best))
            assert all(math.isfinite(v) for _, v in best)
            assert sum(math.exp(v) for _, v in best) <= 1 + 1e-5
            if len(best) < 20:
                assert (tok, pytest.approx(lp, abs=1e-6)) in best
            for i, v in best:
                assert v == pytest.approx(float(ref[t, i]), abs=1e-4)
    assert max(short) <= 12 and min(short) < 12  # top-p cut some lists below top-k's 12


def test_top_logprobs_per_request_in_one_batch_and_forks(acd):
    """Requests with and without top_logprobs share steps; a fork keeps its parent's lists."""
    eng = acd.engine(max_seqs=4)
    a = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=6, logprobs=True,
                                                   top_logprobs=3))
    b = eng.add_request(PROMPTS[1], SamplingParams(max_new_tokens=6))
    c = eng.add_request(PROMPTS[2], SamplingParams(max_new_tokens=6, logprobs=True))
    outs = eng.step()
    kid = eng.fork(a, 1)[0]
    while eng.has_unfinished():
        outs += eng.step()
    ra, rb, rc, rk = (eng.pop_result(i) for i in (a, b, c, kid))
    assert rb.top_logprobs is None and rc.top_logprobs is None and rc.logprobs
    assert [len(x) for x in ra.top_logprobs] == [3] * len(ra.token_ids)
    assert rk.top_logprobs[0] == ra.top_logprobs[0] and len(rk.top_logprobs) == 6
    alone = acd.generate(PROMPTS[0], max_new_tokens=6, return_logprobs=True,
                         top_logprobs=3)[0]
    assert [[i for i, _ in s] for s in alone.top_logprobs] == \
        [[i for i, _ in s] for s in ra.top_logprobs]
    streamed = [o.top_logprobs for o in outs if o.request_id == a]
    assert streamed == ra.top_logprobs
    assert all(o.top_logprobs is None for o in outs if o.request_id in (b, c))


@pytest.mark.parametrize("kw, match", [
    ({"top_logprobs": 3}, "needs logprobs=True"),
    ({"top_logprobs": 21, "logprobs": True}, "<= 20"),
    ({"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2.0, "logprobs": True}, "top_logprobs"),
])
def test_bad_top_logprobs_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_deal_refuses_top_logprobs():
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("deal", k=2, lookahead=1,
                                              reward=lambda p, t: [0.0] * len(t)))
    with pytest.raises(ValueError, match="top_logprobs: not supported by deal"):
        dec.generate("Hi", max_new_tokens=2, return_logprobs=True, top_logprobs=2)
