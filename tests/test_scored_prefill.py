"""A scored answer's tokens fed with its prompt: one forward scores them all (the prefill's
logits at their positions) instead of one decode step per token — the same log-probs, top
alternatives and tokens as decoding them, for every kind of branch and attention the engine
runs, packed beside decoding sequences or alone; within a budget; not where a prefill would
differ from decode steps (penalties, bans, hooks); beside decoding streams, within a server's
prefill budget."""

from __future__ import annotations

import math

import pytest
from engine_fixtures import method_named, tiny_arch, tiny_llama

from safedecode.bench.continuous import host_reads
from safedecode.engine import Branch, BranchHook, SafeDecoder, SamplingParams, contrastive
from safedecode.engine.step import ModelStep

TEXT = ("Once upon a time there was a little fox who lived at the edge of a very old wood, "
        "and every morning it walked down to the river to drink.")


def _run(dec, jobs, *, fast: int | None, max_seqs: int = 4, running: bool = False, **eng_kw):
    """Score ``jobs`` ((prompt ids, continuation, params)) in one engine; ``fast``: its
    ``forced_prefill_tokens`` (None: the default). ``running``: a generated request decodes
    first, so the scored ones join a packed step beside it. Returns (results, steps)."""
    eng = dec.engine(max_seqs=max_seqs, **eng_kw)
    if fast is not None:
        eng.forced_prefill_tokens = fast
    ids = []
    if running:
        ids.append(eng.add_request("Hello there", SamplingParams(max_new_tokens=12,
                                                                 temperature=0)))
        eng.step()
    ids += [eng.add_scored(p, c, params, raw=True) for p, c, params in jobs]
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
    return [eng.pop_result(i) for i in ids], steps


def _same(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids and x.text == y.text
        if x.logprobs is not None:
            for p, q in zip(x.logprobs, y.logprobs, strict=True):
                assert (math.isinf(p) and p == q) or p == pytest.approx(q, abs=2e-5)
        if x.top_logprobs is not None:
            assert [[i for i, _ in t] for t in x.top_logprobs] == \
                [[i for i, _ in t] for t in y.top_logprobs]
            for t, u in zip(x.top_logprobs, y.top_logprobs, strict=True):
                assert [v for _, v in t] == pytest.approx([v for _, v in u], abs=2e-5)


def _jobs(tok):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    return [(ids[:4], ids[4:], SamplingParams(logprobs=True, top_logprobs=3)),
            (ids[:9], ids[9:14], SamplingParams(logprobs=True, temperature=0.7, top_k=20)),
            (ids[:2], ids[2:3], SamplingParams(logprobs=True))]


@pytest.mark.parametrize("kind", ["plain", "acd-text", "soft", "qwen2-mixed", "gemma2-mixed"])
@pytest.mark.parametrize("running", [False, True])
def test_scored_in_the_prefill_equals_decoded(kind, running):
    """plain / acd-text / a soft prompt on Llama (packed forward), a half-windowed Qwen2
    (packed), a windowed, soft-capped Gemma 2 (eager attention: the two-forward prefill); alone
    or joining a decoding sequence: every result = the one-token-per-step engine, and the
    scored requests take one step instead of one per token."""
    if kind in ("plain", "acd-text", "soft"):
        model, tok = tiny_llama()
        m = method_named(kind, model, tok)
    else:
        model, tok = tiny_arch(kind)
        m = method_named("acd-text", model, tok)
    jobs = _jobs(tok)
    slow, n_slow = _run(SafeDecoder(model, tok, m), jobs, fast=0, running=running)
    fast, n_fast = _run(SafeDecoder(model, tok, m), jobs, fast=None, running=running)
    _same(fast, slow)
    longest = max(len(c) for _, c, _ in jobs)
    if running:  # the decoding request has 11 steps to go
        assert (n_slow, n_fast) == (max(11, longest), 11)
    else:
        assert (n_slow, n_fast) == (longest, 1)
    scored = fast[-len(jobs):]
    assert any(math.isinf(v) for r in scored for v in r.logprobs)  # top-k excluded some
    assert all(math.isfinite(v) for v in scored[0].logprobs)


def test_budget_defers_or_splits(monkeypatch):
    """At most ``forced_prefill_tokens`` given tokens per step are scored from a prefill.
    Packed forwards (Llama) feed each answer in chunks, oldest first, that many positions per
    step at most, the whole answer however long; the two-forward prefill (Gemma 2, eager) has
    a request whose answer would pass it wait for the next step (fed whole then), and one longer
    than it alone its first tokens fed and the rest decoded. Same results as decoding."""
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, method_named("acd-text", model, tok))
    jobs = _jobs(tok)[:2]
    n0, n1 = len(jobs[0][1]), len(jobs[1][1])
    slow, n_slow = _run(dec, jobs, fast=0)
    scored = []
    packed = ModelStep.packed

    def counting(self, *a, **kw):
        out = packed(self, *a, **kw)
        scored.append(sum(x.shape[0] for x in out[2] or () if x is not None))
        return out

    monkeypatch.setattr(ModelStep, "packed", counting)
    part, steps = _run(dec, jobs, fast=5)
    _same(part, slow)
    assert max(scored) == 5 and sum(scored) == n0 - 1 + n1 - 1
    assert steps == -(-(n0 - 1 + n1 - 1) // 5) < n_slow
    monkeypatch.undo()
    model, tok = tiny_arch("gemma2-mixed")
    dec = SafeDecoder(model, tok, method_named("acd-text", model, tok))
    jobs = _jobs(tok)[:2]
    n0, n1 = len(jobs[0][1]), len(jobs[1][1])
    slow, _ = _run(dec, jobs, fast=0)
    part, steps = _run(dec, jobs, fast=5)  # the first: 5 fed, the rest decoded
    _same(part, slow)
    assert steps == n0 - 5
    part, steps = _run(dec, jobs, fast=n0 + 1)  # the second waits one step, fed whole
    _same(part, slow)
    assert steps == 2 and n1 > 2


def test_not_where_a_prefill_differs_from_decoding():
    """Penalties and logit bias (state that follows the decoded tokens), bans, a branch hook:
    decoded one token per step (same results, as many steps as tokens)."""
    model, tok = tiny_llama()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    dec = SafeDecoder(model, tok, method_named("acd-text", model, tok))
    n = len(ids) - 3
    for params in (SamplingParams(logprobs=True, presence_penalty=0.5),
                   SamplingParams(logprobs=True, repetition_penalty=1.3),
                   SamplingParams(logprobs=True, logit_bias={5: 2.0}),
                   SamplingParams(logprobs=True, bad_words_ids=((7, 8),))):
        fast, steps = _run(dec, [(ids[:3], ids[3:], params)], fast=None)
        _same(fast, _run(dec, [(ids[:3], ids[3:], params)], fast=0)[0])
        assert steps == n, params
    hook = BranchHook("model.layers.0", lambda h: h * 1.5, positions="all")
    hooked = SafeDecoder(model, tok, contrastive([Branch(system="Be safe.", hooks=(hook,)),
                                                  Branch()], [1.5, -0.5]))
    assert _run(hooked, [(ids[:3], ids[3:], SamplingParams())], fast=None)[1] == n
    # a prefill budget when nothing decodes: fed whole (the budget is for decoding streams)
    job = [(ids[:3], ids[3:], SamplingParams(logprobs=True))]
    assert _run(dec, job, fast=None, max_prefill_tokens=8)[1] == 1


@pytest.mark.parametrize("kind", ["acd-text", "soft"])
def test_fed_within_a_prefill_budget_beside_decoding(kind, monkeypatch):
    """Under a prefill budget beside a decoding request, a scored answer is appended to its
    prompt and fed in its chunks, each chunk's answer positions scored from its logits (at
    most ``forced_prefill_tokens`` of them per step): the same results as decoding every
    answer token, the budget held, the request done when its prompt is — a short prompt and
    one over several chunks alike."""
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, method_named(kind, model, tok))
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    fed, scored = [], []  # per packed step: prompt tokens fed (all rows), answer positions
    packed = ModelStep.packed

    def counting(self, state, running, new, built, chunks=None, extra=None):
        out = packed(self, state, running, new, built, chunks, extra)
        if chunks is not None:
            fed.append(0 if not running else sum(max(0, b - max(ls) + n) - max(0, a - max(ls) + n)
                           for bl, (a, b) in zip(built, chunks, strict=True)
                           for ls in [self.prompt_lengths(bl)] for n in ls))
            scored.append(sum(x.shape[0] for x in out[2] or () if x is not None))
        return out

    monkeypatch.setattr(ModelStep, "packed", counting)
    # budget 4: the decoding request ends first, the rest is fed whole in the next step
    for p, budget in ((3, 16), (20, 16), (3, 4)):
        job = [(ids[:p], ids[p:], SamplingParams(logprobs=True, top_logprobs=2))]
        slow, n_slow = _run(dec, job, fast=0, running=True, max_prefill_tokens=budget)
        for cap in (None, 3):
            fed.clear()
            scored.clear()
            fast, steps = _run(dec, job, fast=cap, running=True, max_prefill_tokens=budget)
            _same(fast, slow)
            assert fast[-1].token_ids == ids[p:]
            assert max(fed) <= budget and sum(scored) == len(ids) - p - 1, (p, cap)
            assert max(scored) <= (cap or 1024) and steps < n_slow, (p, cap)
            if budget == 4 and cap is None:  # 11 steps beside it, then the rest at once
                assert steps == 12 and scored[-1] > 4
    assert max(scored) == 3  # the cap bound


def test_score_of_a_long_answer_equals_decoded():
    """``SafeDecoder.score`` of a 60-token answer (what a loglikelihood client and ``echo``
    get): log-probs = the decoded ones."""
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, method_named("acd-text", model, tok))
    ids = tok(TEXT * 2, add_special_tokens=False)["input_ids"][:64]
    got = dec.score([ids[:4]], [ids[4:]], raw=True)[0]
    want, steps = _run(dec, [(ids[:4], ids[4:], SamplingParams(logprobs=True))], fast=0)
    assert steps == 60 and got.token_ids == ids[4:]
    assert got.logprobs == pytest.approx(want[0].logprobs, abs=2e-5)


def test_a_scored_request_is_kept_for_what_follows_it():
    """Its prompt + answer KV is kept as a decoded one's (the text continued after the scored
    answer shares it: a few columns computed) and = the decoder without a prefix cache."""
    model, tok = tiny_llama()
    m = method_named("acd-text", model, tok)
    ids = tok(TEXT * 2, add_special_tokens=False)["input_ids"]
    dec = SafeDecoder(model, tok, m)
    dec.score([ids[:40]], [ids[40:60]], raw=True)
    built = dec.builder.build_request(m.branches, ids[:40], 0, raw=True)
    kept = sorted(kv[0][0].shape[-2] for kv in dec.turns._kv.values())
    assert kept == sorted(len(p) + len(s) + 19 for p, s in built)  # prompt + answer[:-1]
    before = dec.prefixes.computed_tokens + dec.turns.computed_tokens
    got = dec.generate([ids[:64]], raw=True, max_new_tokens=4, return_logprobs=True)[0]
    computed = dec.prefixes.computed_tokens + dec.turns.computed_tokens - before
    assert computed <= 2 * m.k
    want = SafeDecoder(model, tok, m, prefix_cache=False).generate(
        [ids[:64]], raw=True, max_new_tokens=4, return_logprobs=True)[0]
    assert got.token_ids == want.token_ids
    assert got.logprobs == pytest.approx(want.logprobs, abs=2e-5)


def _reads_in_step(eng) -> int:
    """Device-to-host reads (each a sync on a GPU) in one ``eng.step()``."""
    with host_reads() as count:
        eng.step()
    return count[0]


def test_fed_answers_read_back_with_the_step():
    """An admission step that scores answers fed with their prompts reads the device as often
    as one that admits a generated request: their scores ride in the step's transfer."""
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, method_named("acd-text", model, tok))
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    reads = []
    for scored in (False, True):
        eng = dec.engine(max_seqs=4)
        eng.add_request("Hello there", SamplingParams(max_new_tokens=8))
        eng.step()
        if scored:
            eng.add_scored(ids[:4], ids[4:], SamplingParams(logprobs=True, top_logprobs=2),
                           raw=True)
        else:
            eng.add_request(ids[:4], SamplingParams(max_new_tokens=8), raw=True)
        reads.append(_reads_in_step(eng))
        assert eng.num_running() == (1 if scored else 2)  # the scored one finished
    assert reads[0] == reads[1]


@pytest.mark.parametrize("kind", ["llama", "gemma2-mixed"])
def test_the_two_forward_prefill_shares_the_budget_between_its_rows(kind):
    """The packed forward keeps exactly the positions it needs; the two-forward prefill (eager
    attention) keeps as many of every row as its longest answer needs, so each fed answer is
    cut to the budget over the sequences fed together (the rest decoded; same results)."""
    model, tok = tiny_llama() if kind == "llama" else tiny_arch(kind)
    dec = SafeDecoder(model, tok, method_named("acd-text", model, tok))
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    jobs = [(ids[:3], ids[3:12], SamplingParams(logprobs=True)),  # 8 given tokens to feed
            (ids[:5], ids[5:8], SamplingParams(logprobs=True)),  # 2
            (ids[:7], ids[7:10], SamplingParams(logprobs=True))]  # 2
    fast, steps = _run(dec, jobs, fast=12)
    _same(fast, _run(dec, jobs, fast=0)[0])
    assert steps == (1 if kind == "llama" else 1 + 8 - 12 // 3)
