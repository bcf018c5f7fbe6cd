"""A decoder's KV buffers reused across calls (``SafeDecoder(reuse_kv=True)``, the default):
the same tokens as fresh buffers, whatever earlier calls left in them; a closed engine refuses
work; an abandoned stream still gives its buffers back."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import MIXED_PROMPTS, tiny_llama

from safedecode import methods
from safedecode.engine import SafeDecoder, SamplingParams
from safedecode.engine.cache import KVPool, SlotCache

PROMPTS = MIXED_PROMPTS + ["Name a colour.", "Why is the sky blue?"]

# (prompts, keywords): smaller and larger than the calls before them, greedy and seeded
CALLS = [
    (PROMPTS[:3], dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3,
                       return_logprobs=True)),
    (PROMPTS[3:4], dict(max_new_tokens=5)),
    (PROMPTS, dict(max_new_tokens=20, temperature=1.0, seed=[1, 2, 3, 4, 5])),
    (PROMPTS[1:3], dict(max_new_tokens=12, max_batch=1, return_logprobs=True)),
]


def _same(got, want) -> None:
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    for g, w in zip(got, want, strict=True):
        if w.logprobs:
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)


def _ptrs(pool: KVPool) -> set[int]:
    return {b.data_ptr() for b in pool._spare}


def _poison(pool: KVPool) -> None:
    """Fill the spare buffers with finite values no model wrote (big, random)."""
    gen = torch.Generator().manual_seed(0)
    for b in pool._spare:
        b.copy_(torch.randn(b.shape, generator=gen) * 50)


def test_reused_buffers_give_the_tokens_of_fresh_ones():
    """Successive calls of all sizes on one decoder equal a decoder that allocates per call,
    with the spare buffers poisoned between calls; a call that fits reuses the spare storage
    (no new buffer)."""
    model, tok = tiny_llama()
    method = methods.get("acd-text", alpha=0.5)
    fresh = SafeDecoder(model, tok, method, reuse_kv=False)
    dec = SafeDecoder(model, tok, method)
    assert fresh.kv_pool is None and dec.kv_pool.nbytes() == 0
    for i, (prompts, kw) in enumerate(CALLS):
        before = _ptrs(dec.kv_pool)
        _poison(dec.kv_pool)
        _same(dec.generate(prompts, **kw), fresh.generate(prompts, **kw))
        assert dec.kv_pool.nbytes() > 0
        if i == 1:  # smaller than the first call: its storage, nothing new
            assert _ptrs(dec.kv_pool) == before
        if i == 2:  # larger: new buffers, the outgrown ones dropped
            assert len(dec.kv_pool._spare) == 2 * 2 and not _ptrs(dec.kv_pool) & before
            largest = _ptrs(dec.kv_pool)
    assert _ptrs(dec.kv_pool) == largest  # the pool keeps the largest set


def test_search_calls_reuse_buffers():
    """DeAL (forks, truncation) over reused, poisoned buffers = DeAL over fresh ones."""
    model, tok = tiny_llama()

    def reward(prompts, texts):
        return [sum(ch in "aeiou" for ch in t) for t in texts]

    spec = methods.get("deal", k=3, lookahead=2, chunk=2, reward=reward, base="acd-text",
                       alpha=0.5)
    dec = SafeDecoder(model, tok, spec)
    fresh = SafeDecoder(model, tok, spec, reuse_kv=False)
    for prompts in (PROMPTS[:2], PROMPTS[2:5], PROMPTS[:1]):
        _poison(dec.kv_pool)
        _same(dec.generate(prompts, max_new_tokens=8),
              fresh.generate(prompts, max_new_tokens=8))
        assert dec.kv_pool.nbytes() > 0


def test_closed_engine_refuses_work_and_keeps_results():
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("plain"))
    eng = dec.engine(max_seqs=2)
    done = eng.add_request("Hi", SamplingParams(max_new_tokens=3))
    eng.add_request("Name a colour.", SamplingParams(max_new_tokens=40))
    while done not in eng._done:
        eng.step()
    eng.close()
    assert not eng.has_unfinished() and dec.kv_pool.nbytes() > 0
    assert len(eng.pop_result(done).token_ids) == 3
    with pytest.raises(ValueError, match="engine: closed"):
        eng.add_request("Hi", SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match="engine: closed"):
        eng.step()


def test_abandoned_stream_gives_its_buffers_back():
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("acd-text", alpha=0.5))
    it = dec.stream(PROMPTS[:2], max_new_tokens=30)
    next(it)
    assert dec.kv_pool.nbytes() == 0  # taken by the running call's engine
    it.close()
    assert dec.kv_pool.nbytes() > 0
    want = SafeDecoder(model, tok, dec.method, reuse_kv=False).generate(PROMPTS[:2],
                                                                        max_new_tokens=6)
    _same(dec.generate(PROMPTS[:2], max_new_tokens=6), want)


def test_pool_matches_dtype_and_size():
    """A spare buffer is used only where it fits (dtype, elements); the pool keeps the larger
    set it is given."""
    pool = KVPool()
    pool.give([torch.zeros(10), torch.zeros(4, dtype=torch.float64)])
    cache = SlotCache(1, 1, 1, pool=pool)
    big = cache.buffer((2, 3), torch.float64, "cpu")  # 6 > 4 float64s: new
    small = cache.buffer((2, 4), torch.float32, "cpu")  # 8 <= 10 float32s: spare
    assert small.shape == (2, 4) and small.untyped_storage().nbytes() == 40
    assert big.dtype == torch.float64 and big.untyped_storage().nbytes() == 48
    cache.release()
    assert pool.nbytes() == 40 + 48  # the buffers used (the unused spare dropped)
    pool.give([torch.zeros(1)])
    assert pool.nbytes() == 40 + 48
    fresh = SlotCache(1, 1, 1, pool=pool)  # no forward: its spares go back as they were
    assert pool.nbytes() == 0
    fresh.release()
    assert pool.nbytes() == 40 + 48
    pool.clear()
    assert pool.nbytes() == 0
