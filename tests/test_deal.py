"""DeAL on forked decode states: k = 1, l = 0 is greedy; the search equals an exhaustive search
over the same candidates and rollouts (the naive baseline, recomputed from scratch every step);
forked rollouts equal rollouts from scratch; batched equals one request at a time; rewards and
bad parameters."""

from __future__ import annotations

import functools
import math
import time

import pytest
import torch
from engine_fixtures import tiny_llama
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from safedecode import methods
from safedecode.bench.naive import NaiveDeAL
from safedecode.engine import SafeDecoder, SamplingParams
from safedecode.engine.branches import Branch, contrastive
from safedecode.methods.rewards import Keywords, Length, Weighted, make_reward

PROMPTS = ["Why is the sky blue?", "Name a colour.", "Hi"]


def _digit_reward(prompts, texts):
    """A known function of the text: how many of its characters are vowels, minus spaces."""
    return [sum(ch in "aeiou" for ch in t) - 0.5 * t.count(" ") for t in texts]


def _search_equals_naive(model, tok, spec, prompts, n: int) -> list:
    """DeAL over the engine, batched, equals the naive search from scratch per prompt (tokens
    and log-probs); returns the engine's results."""
    got = SafeDecoder(model, tok, spec).generate(prompts, max_new_tokens=n)
    naive = NaiveDeAL(model, tok, spec)
    for p, r in zip(prompts, got, strict=True):
        ref = naive.generate(p, max_new_tokens=n)
        assert r.token_ids == ref.token_ids, p
        assert r.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    return got


def test_k1_l0_is_greedy():
    model, tok = tiny_llama()
    spec = methods.get("deal", k=1, lookahead=0, reward=_digit_reward, base="acd-text",
                       alpha=0.5)
    got = SafeDecoder(model, tok, spec).generate(PROMPTS, max_new_tokens=8)
    ref = SafeDecoder(model, tok, methods.get("acd-text", alpha=0.5)).generate(
        PROMPTS, max_new_tokens=8)
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]


@pytest.mark.parametrize(("k", "lookahead", "chunk", "lam"),
                         [(3, 2, 1, 1.0), (4, 3, 2, 0.5), (2, 0, 1, 3.0), (3, 4, 5, 1.0),
                          (4, 2, 1, 0.002)])
def test_search_equals_exhaustive_search_from_scratch(k, lookahead, chunk, lam):
    """Each step's candidates (top-k of the final distribution), their rollouts and the
    choice equal the naive search that recomputes everything from the prompt."""
    model, tok = tiny_llama()
    spec = methods.get("deal", k=k, lookahead=lookahead, chunk=chunk, lam=lam,
                       reward=_digit_reward, base="acd-text", alpha=0.5)
    _search_equals_naive(model, tok, spec, PROMPTS[:2], 9)


@pytest.mark.parametrize(("k", "lookahead", "chunk", "horizon"),
                         [(3, 2, 1, 1), (3, 2, 2, 3), (4, 3, 3, 4), (2, 4, 5, 2)])
def test_horizon_equals_search_then_base_decoding_from_scratch(k, lookahead, chunk, horizon):
    """With a horizon the search stops once ``horizon`` tokens are committed and the base method
    decodes the rest — equal to the naive search that does the same from scratch, batched; the
    answers differ from the full search's, and their tails are the base method's own."""
    model, tok = tiny_llama()
    kw = dict(k=k, lookahead=lookahead, chunk=chunk, lam=2.0, reward=_digit_reward,
              base="acd-text", alpha=0.5)
    spec = methods.get("deal", horizon=horizon, **kw)
    got = _search_equals_naive(model, tok, spec, PROMPTS, 10)
    if chunk <= 2:  # (this tiny model: the full search goes elsewhere after the horizon)
        full = SafeDecoder(model, tok, methods.get("deal", **kw)).generate(
            PROMPTS, max_new_tokens=10)
        assert [r.token_ids for r in got] != [r.token_ids for r in full]
    alone = [SafeDecoder(model, tok, spec).generate(p, max_new_tokens=10)[0]
             for p in PROMPTS]
    assert [r.token_ids for r in got] == [r.token_ids for r in alone]


def test_search_changes_the_answer_toward_the_reward():
    model, tok = tiny_llama()
    plain = SafeDecoder(model, tok, methods.get("plain")).generate(PROMPTS[0],
                                                                  max_new_tokens=10)[0]
    spec = methods.get("deal", k=4, lookahead=2, lam=10.0, reward=_digit_reward)
    got = SafeDecoder(model, tok, spec).generate(PROMPTS[0], max_new_tokens=10)[0]
    assert got.token_ids != plain.token_ids
    assert _digit_reward(None, [got.text])[0] > _digit_reward(None, [plain.text])[0]


def test_batched_equals_one_at_a_time_and_sampled_rollouts_are_seeded():
    model, tok = tiny_llama()
    spec = methods.get("deal", k=3, lookahead=2, beam=2, reward=_digit_reward)
    dec = SafeDecoder(model, tok, spec)
    together = dec.generate(PROMPTS, max_new_tokens=7)
    alone = [dec.generate(p, max_new_tokens=7)[0] for p in PROMPTS]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    a = dec.generate(PROMPTS, max_new_tokens=7, temperature=0.9, seed=[1, 2, 3])
    b = [dec.generate(p, max_new_tokens=7, temperature=0.9, seed=s)[0]
         for p, s in zip(PROMPTS, [1, 2, 3], strict=True)]
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def _slow_digit_reward(prompts, texts):  # slow enough that the engine steps meanwhile
    time.sleep(0.01)
    return _digit_reward(prompts, texts)


@pytest.mark.parametrize(("kw", "budget", "threaded"), [
    (dict(k=3, lookahead=2, chunk=2), None, False),
    (dict(k=2, lookahead=1, beam=2, horizon=3), None, False),
    (dict(k=2, lookahead=2, propose=1, rollout="both", mix=0.3), None, False),
    (dict(k=3, lookahead=2, chunk=2, horizon=4), 4, False),
    (dict(k=3, lookahead=2, chunk=2), None, True),
    (dict(k=2, lookahead=2, propose=1, rollout="both", mix=0.3, horizon=5), 4, True)])
def test_searcher_answers_at_their_own_phases_equal_each_alone(kw, budget, threaded):
    """Answers added to a :class:`Searcher` at different steps (so one expands while another
    rolls out or decodes past its horizon), more than the engine holds at once (the rest
    queue), greedy and seeded, with prompts prefilled whole or a few tokens per step (the
    server's prefill budget), the reward inline or on a thread (a slow one: the scored
    answers' candidates are held while the others step): each equals its own search run
    alone; an answer aborted mid-search frees every sequence it held; bad inputs are named."""
    import importlib
    from concurrent.futures import ThreadPoolExecutor

    Searcher = importlib.import_module("safedecode.methods.deal").Searcher
    model, tok = tiny_llama()
    spec = methods.get("deal", reward=_digit_reward, base="acd-text", alpha=0.5, **kw)
    dec = SafeDecoder(model, tok, spec)
    if threaded:
        spec = methods.get("deal", reward=_slow_digit_reward, base="acd-text", alpha=0.5, **kw)
    eng = SafeDecoder(model, tok, spec).engine(max_seqs=2 * spec.sequences_per_request,
                                               drop_rows=False, max_prefill_tokens=budget)
    pool = ThreadPoolExecutor(1) if threaded else None
    searcher = Searcher(eng, spec, scorer=pool)
    held = 0
    asks = [(PROMPTS[i % 3], SamplingParams(max_new_tokens=6 + i % 3, temperature=t, seed=s))
            for i, (t, s) in enumerate([(0.0, None), (0.9, 5), (0.0, None), (0.9, 8),
                                        (0.0, None)])]
    got, ids, aborted = {}, {}, None
    for step in range(400):
        if step % 2 == 0 and len(ids) < len(asks):  # one more answer every other step
            p, sp = asks[len(ids)]
            ids[searcher.add(eng.build(p), p, sp)[0]] = len(ids)
        if step == 3:  # a sixth answer, aborted once it searches
            aborted = searcher.add(eng.build(PROMPTS[0]), PROMPTS[0],
                                   SamplingParams(max_new_tokens=30))[0]
        if aborted is not None and aborted >= 0 and \
                searcher._answers[aborted].phase == "rollout":
            searcher.abort(aborted)
            aborted = -1
        started = searcher.pending() - searcher.num_waiting()  # each within its peak
        assert eng.state.max_seqs - eng.state.free_slots <= started * spec.sequences_per_request
        args = searcher.step_args()
        held += bool(args.get("hold"))
        outs = eng.step(**args)
        for o, r in searcher.feed(outs, wait=0.0 if outs else 0.02):  # as the server's loop
            if r is not None:
                got[ids[o.request_id]] = r
        if len(got) == len(asks) and not searcher.pending():
            break
    assert aborted == -1 and not eng.has_unfinished() and searcher.scoring() == 0
    assert eng.state.free_slots == eng.state.max_seqs
    assert (held > 0) == threaded  # the engine stepped while a reward call ran
    for i, (p, sp) in enumerate(asks):
        want = dec.generate(p, max_new_tokens=sp.max_new_tokens, temperature=sp.temperature,
                            seed=sp.seed)[0]
        assert got[i].token_ids == want.token_ids and got[i].text == want.text, i
    with pytest.raises(ValueError, match="no unfinished DeAL answer 99"):
        searcher.abort(99)
    with pytest.raises(ValueError, match="prompt: the reward scores text"):
        searcher.add(eng.build("Hi"), ["Hi"])
    with pytest.raises(ValueError, match="n: must be"):
        searcher.add(eng.build("Hi"), "Hi", n=0)
    with pytest.raises(ValueError, match="max_seqs: a DeAL answer holds up to"):
        Searcher(dec.engine(max_seqs=spec.sequences_per_request - 1, drop_rows=False),
                 dec.search)
    with pytest.raises(ValueError, match="scorer: expected a concurrent.futures.Executor"):
        Searcher(eng, spec, scorer=object())
    if pool is not None:
        pool.shutdown()


def test_forked_candidates_equal_rollouts_from_scratch():
    """A candidate's rollout on a forked state equals decoding prompt + committed + candidate
    from scratch."""
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("acd-text", alpha=0.5))
    eng = dec.engine(max_seqs=4)
    sp = SamplingParams(max_new_tokens=8, logprobs=True)
    rid = eng.add_request(PROMPTS[0], sp)
    eng.step()
    eng.step()
    outs = eng.step(expand={rid: 4})
    kids = [o for o in outs if o.parent == rid]
    assert len(kids) == 3 and len({o.token_id for o in outs}) == 4
    res = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finish_reason:
                res[o.request_id] = eng.pop_result(o.request_id)
    naive = NaiveDeAL(model, tok, methods.get("deal", k=1, lookahead=0,
                                              reward=_digit_reward, base="acd-text",
                                              alpha=0.5))
    embs = [naive.gen._branch_inputs(k, [[{"role": "user", "content": PROMPTS[0]}]])[0][0]
            for k in range(2)]
    for o in outs:
        toks = res[o.request_id].token_ids
        roll = naive._run(embs, toks[:3], 5, set())[0]
        assert toks[3:] == roll


def test_rewards_compose_and_parse():
    texts = ["I am sorry, I cannot help.", "Sure, here is how to do it step by step."]
    kw = Keywords(include=["sorry", "cannot"], exclude=["step"])
    assert kw(["p", "p"], texts) == [2.0, -1.0]
    both = 2.0 * kw + Length(target=8)
    assert isinstance(both, Weighted)
    assert both(["p", "p"], texts) == pytest.approx([4.0 - 2 / 8, -2.0 - 2 / 8])
    parsed = make_reward("2*keywords:include=sorry|cannot:exclude=step+length:target=8")
    assert parsed(["p", "p"], texts) == pytest.approx(both(["p", "p"], texts))
    for bad, match in (("nope", "unknown"), ("keywords", "include"),
                       ("length:target=0", "target"), ("keywords:foo=1", "foo"),
                       ("classifier", "path"), ("harmless:keep=-1", "keep="),
                       ("harmless:keep=all", "keep=")):
        with pytest.raises(ValueError, match=match):
            make_reward(bad)
    with pytest.raises(ValueError, match="non-finite"):
        make_reward(lambda p, t: [float("nan")] * len(t))(["p"], ["x"])
    with pytest.raises(ValueError, match="1 scores for 2"):
        make_reward(lambda p, t: [0.0])(["p", "p"], ["x", "y"])


def test_bad_parameters_are_named():
    for kw, match in ((dict(k=0), "k:"), (dict(lookahead=-1), "lookahead"),
                      (dict(beam=0), "beam"), (dict(chunk=9, lookahead=2), "chunk"),
                      (dict(lam=float("nan")), "lam"), (dict(reward="nope"), "unknown"),
                      (dict(base="deal"), "base"), (dict(reward=None), "reward"),
                      (dict(horizon=0), "horizon"), (dict(horizon=2.5), "horizon"),
                      (dict(propose=-1), "propose: must be"), (dict(propose=1.5), "propose"),
                      (dict(mix=0.0), "mix:"), (dict(mix=1.0), "mix:"), (dict(mix=True), "mix:"),
                      (dict(mix="0.2"), "mix:"), (dict(rollout="amateur"), "rollout:")):
        args = {"reward": _digit_reward, **kw}
        with pytest.raises(ValueError, match=match):
            methods.get("deal", **args)
    union = contrastive([Branch(system="a"), Branch(system="b")], [1.0, 0.5], rule="union")
    with pytest.raises(ValueError, match="propose: the base .* no plain branch"):
        methods.get("deal", reward=_digit_reward, base=union, propose=2)
    with pytest.raises(ValueError, match="rollout: the base .* no plain branch"):
        methods.get("deal", reward=_digit_reward, base=union, rollout="plain")
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("deal", reward=_digit_reward))
    from safedecode.methods.deal import search

    eng = dec.engine(max_seqs=8)
    eng.add_request("Hi", SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match="no other requests"):
        search(eng, [eng.build("Hello")], ["Hello"], SamplingParams(), dec.search)


def test_cli_generate_deal_and_its_errors(tiny_model_dir):
    from typer.testing import CliRunner

    from safedecode.cli import app

    run = CliRunner().invoke
    base = ["generate", "--model", str(tiny_model_dir), "--method", "deal", "-n", "6"]
    r = run(app, [*base, "--reward", "keywords:include=the", "--deal-k", "2", "--lookahead",
                  "2", "--propose", "1", "--json", "Hi"])
    assert r.exit_code == 0, r.output
    assert '"method": "deal"' in r.output and '"tokens": 6' in r.output
    streamed = run(app, [*base, "--reward", "keywords:include=the", "--deal-k", "2",
                         "--lookahead", "2", "--chunk", "2", "--stream", "Hi"])
    assert streamed.exit_code == 0, streamed.output
    model, tok = tiny_llama()
    want = SafeDecoder(model, tok, methods.get(
        "deal", reward="keywords:include=the", k=2, lookahead=2, chunk=2)).generate(
        "Hi", max_new_tokens=6)[0]
    assert streamed.output == want.text + "\n"
    for extra, match in ((["--deal-k", "0", "--reward", "length"], "k: must be"),
                         (["--lookahead", "-1", "--reward", "length"], "lookahead"),
                         (["--horizon", "0", "--reward", "length"], "horizon"),
                         (["--propose", "-2", "--reward", "length"], "propose"),
                         (["--propose", "1", "--mix", "1.5", "--reward", "length"], "mix:"),
                         (["--rollout", "amateur", "--reward", "length"], "rollout:"),
                         (["--reward", "nope"], "unknown 'nope'"), ([], "needs a reward")):
        r = run(app, [*base, *extra, "Hi"])
        assert r.exit_code == 2 and match in r.output, (extra, r.output)


def test_eval_fingerprint_tells_deal_settings_and_rewards_apart():
    from safedecode.eval.runner import method_fingerprint

    def fp(**kw):
        args = {"reward": "keywords:include=sorry", "k": 3, **kw}
        return method_fingerprint(methods.get("deal", **args))

    assert fp() == fp()
    assert "lookahead=8" in methods.get("deal", reward="length:target=9").describe()
    assert len({fp(), fp(k=4), fp(lam=2.0), fp(reward="length:target=10"),
                fp(base="acd-text"), fp(reward=_digit_reward), fp(horizon=16),
                fp(horizon=17), fp(propose=2), fp(propose=3), fp(propose=2, mix=0.25),
                fp(rollout="plain"), fp(rollout="plain", mix=0.25),
                fp(propose=2, mix=0.25, rollout="plain"), fp(rollout="both")}) == 15
    assert fp(propose=2, mix=0.5) == fp(propose=2)  # the default mix leaves earlier keys valid


def _starts_with(word: str):
    return lambda prompts, texts: [10.0 * t.startswith(word) for t in texts]


@pytest.mark.parametrize(("base", "k", "propose", "chunk", "mix"),
                         [("acd-text", 2, 2, 1, 0.5), ("acd-text", 1, 3, 2, 0.5),
                          ("self-cd", 2, 2, 3, 0.5), ("acd-text", 2, 2, 2, 0.1)])
def test_proposals_equal_exhaustive_search_from_scratch(base, k, propose, chunk, mix):
    """With ``propose`` the plain model's top tokens join each step's candidates (log P under
    the mixture of weight ``mix``): equal to the naive search from scratch, batched. acd-text
    gets a weight-0 plain branch; self-cd proposes from its own plain branch (no branch added)."""
    model, tok = tiny_llama()
    spec = methods.get("deal", k=k, lookahead=2, chunk=chunk, lam=1.0, reward=_digit_reward,
                       propose=propose, mix=mix, base=base, alpha=0.5)
    assert spec.engine_method.k == (3 if base == "acd-text" else 2)
    assert spec.sequences_per_request == k + propose
    _search_equals_naive(model, tok, spec, PROMPTS[:2], 8)


@pytest.mark.parametrize(("rollout", "base", "k", "propose", "chunk", "horizon", "mix"),
                         [("plain", "acd-text", 2, 0, 1, None, 0.5),
                          ("plain", "acd-text", 2, 2, 3, 4, 0.25),
                          ("plain", "self-cd", 2, 1, 2, None, 0.5),
                          ("both", "acd-text", 2, 1, 3, None, 0.5),
                          ("both", "self-cd", 2, 0, 1, 3, 0.25)])
def test_plain_rollouts_equal_exhaustive_search_from_scratch(rollout, base, k, propose, chunk,
                                                             horizon, mix):
    """``rollout="plain"``: every candidate is rolled out by the plain branch's greedy tokens
    (log P under the mixture), past the horizon the base decodes; ``"both"``: each candidate
    both ways. Equal to the naive search from scratch, batched; the answers differ from the
    base's own rollouts'."""
    model, tok = tiny_llama()
    kw = dict(k=k, lookahead=3, chunk=chunk, lam=1.0, reward=_digit_reward, propose=propose,
              mix=mix, horizon=horizon, base=base, alpha=0.5)
    spec = methods.get("deal", rollout=rollout, **kw)
    assert spec.engine_method.k == (3 if base == "acd-text" else 2)
    assert spec.sequences_per_request == (k + propose) * (2 if rollout == "both" else 1)
    got = _search_equals_naive(model, tok, spec, PROMPTS[:2], 8)
    own = SafeDecoder(model, tok, methods.get("deal", **kw)).generate(PROMPTS[:2],
                                                                     max_new_tokens=8)
    assert [r.token_ids for r in got] != [r.token_ids for r in own]
    if rollout == "plain" and chunk > 1 and horizon is None:  # committed: the plain model's
        plain = SafeDecoder(model, tok, methods.get("plain"))
        for p, r in zip(PROMPTS[:2], got, strict=True):
            head = tok.decode(r.token_ids[:1])
            cont = plain.generate(tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                + head, raw=True, max_new_tokens=chunk - 1)[0]
            assert r.token_ids[1:chunk] == cont.token_ids, p


def test_engine_step_follows_a_branch_and_names_a_bad_follow():
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("self-cd", alpha=0.5))
    eng = dec.engine(max_seqs=4)
    sp = SamplingParams(max_new_tokens=5, logprobs=True)
    a, b = eng.add_request(PROMPTS[0], sp), eng.add_request(PROMPTS[1], sp)
    first = {o.request_id: o.token_id for o in eng.step()}
    for bad in ((2, [a]), (0,), "plain", (True, [a]), (1, "ab"), (1, [a], 0.0), (1, [a], 1.5),
                (1, [a], 0.5, 0), (1, [1.5])):
        with pytest.raises(ValueError, match="follow: expected"):
            eng.step(follow=bad)
    with pytest.raises(ValueError, match="no unfinished request 99"):
        eng.step(follow=(1, [99]))
    # branch 1 of self-cd is the plain model: the followed request takes its greedy tokens
    toks = {a: [first[a]], b: [first[b]]}
    while eng.has_unfinished():
        for o in eng.step(follow=(1, [a], 0.3)):
            toks[o.request_id].append(o.token_id)
    alone = SafeDecoder(model, tok, methods.get("self-cd", alpha=0.5)).generate(
        PROMPTS[1], max_new_tokens=5)[0]
    assert toks[b] == alone.token_ids  # an unfollowed request is the method's own
    head = tok.decode(toks[a][:1])
    cont = SafeDecoder(model, tok, methods.get("plain")).generate(
        tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                add_generation_prompt=True) + head, raw=True,
        max_new_tokens=4)[0]
    assert toks[a][1:] == cont.token_ids


def test_the_proposal_branch_leaves_the_base_distribution_alone():
    model, tok = tiny_llama()
    spec = methods.get("deal", k=2, propose=2, reward=_digit_reward, base="acd-text",
                       alpha=0.5)
    a = SafeDecoder(model, tok, spec.engine_method).generate(PROMPTS, max_new_tokens=6,
                                                             return_logprobs=True)
    b = SafeDecoder(model, tok, spec.base).generate(PROMPTS, max_new_tokens=6,
                                                    return_logprobs=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.logprobs for r in a] == [pytest.approx(r.logprobs, abs=1e-5) for r in b]


def test_proposals_reach_a_token_the_base_masks():
    """acd-text with β 1 masks the plain model's first token; a reward for it cannot reach it
    from the base's candidates, and does with the plain model's proposals."""
    model, tok = tiny_llama()
    plain = SafeDecoder(model, tok, methods.get("plain")).generate(PROMPTS[0],
                                                                  max_new_tokens=1)[0]
    word = plain.text
    kw = dict(k=4, lookahead=1, lam=10.0, reward=_starts_with(word), base="acd-text",
              alpha=0.5, beta=1.0)
    without = SafeDecoder(model, tok, methods.get("deal", **kw)).generate(
        PROMPTS[0], max_new_tokens=4)[0]
    assert not without.text.startswith(word)
    got = SafeDecoder(model, tok, methods.get("deal", propose=1, **kw)).generate(
        PROMPTS[0], max_new_tokens=4)[0]
    assert got.token_ids[0] == plain.token_ids[0]


def test_engine_step_names_a_bad_proposal():
    model, tok = tiny_llama()
    eng = SafeDecoder(model, tok, methods.get("acd-text", alpha=0.5)).engine(max_seqs=4)
    rid = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=4))
    eng.step()
    for bad in ((2, 1), (0, 0), (0,), "plain", (True, 1), (1, 1, 0.0), (1, 1, 1.0),
                (1, 1, "0.5"), (1, 1, 0.5, 0)):
        with pytest.raises(ValueError, match="propose: expected"):
            eng.step(expand={rid: 2}, propose=bad)
    with pytest.raises(ValueError, match="give expand"):
        eng.step(propose=(1, 2))
    with pytest.raises(ValueError, match="free slots"):
        eng.step(expand={rid: 2}, propose=(1, 3))
    outs = eng.step(expand={rid: 2}, propose=(1, 2))
    assert 2 <= len(outs) <= 4 and len({o.token_id for o in outs}) == len(outs)


def test_mixture_logprob():
    from safedecode.engine.engine import mixture_logprob

    lp, q = torch.log_softmax(torch.randn(2, 9), -1), torch.log_softmax(torch.randn(2, 9), -1)
    assert torch.equal(mixture_logprob(lp, q), torch.logaddexp(lp, q) - math.log(2.0))
    for w in (0.1, 0.3, 0.9):
        want = torch.log((1 - w) * lp.exp() + w * q.exp())
        assert torch.allclose(mixture_logprob(lp, q, w), want, atol=1e-6)
        assert torch.allclose(mixture_logprob(lp, q, w).exp().sum(-1), torch.ones(2))


@pytest.mark.parametrize("kw", [dict(k=2, lookahead=2), dict(k=3, lookahead=2, chunk=3),
                                dict(k=2, lookahead=2, beam=2, chunk=2),
                                dict(k=2, lookahead=3, chunk=2, horizon=4),
                                dict(k=2, lookahead=2, propose=1, rollout="both", chunk=2)])
def test_stream_yields_final_tokens_as_the_search_commits_them(kw):
    """``SafeDecoder.stream`` on DeAL: every request's events join to generate()'s text and
    tokens (greedy and sampled, with a stop string), each token once, the result on the last
    event; tokens arrive while the search goes on (before the last search step), not all at
    the end."""
    model, tok = tiny_llama()
    spec = methods.get("deal", reward=_digit_reward, base="acd-text", **kw)
    dec = SafeDecoder(model, tok, spec)
    prompts = ["Hi", "Tell me a story about a cat.", "Name a colour."]
    for params in (dict(max_new_tokens=12), dict(max_new_tokens=12, temperature=0.9, seed=3),
                   dict(max_new_tokens=12, stop=["e"])):
        want = dec.generate(prompts, **params)
        events, steps = [], []  # steps: events seen when each search step ended

        def on_step(done, n, events=events, steps=steps):
            steps.append(len(events))
        for ev in dec.stream(prompts, on_step=on_step, **params):
            events.append(ev)
        for i, w in enumerate(want):
            mine = [e for e in events if e.index == i]
            assert "".join(e.text for e in mine) == w.text
            assert [e.token_id for e in mine if e.token_id is not None] == w.token_ids
            assert [e.finish_reason for e in mine[:-1]] == [None] * (len(mine) - 1)
            assert mine[-1].finish_reason == w.finish_reason
        if "stop" not in params and spec.beam == 1:  # tokens after the first step and later
            assert 0 < steps[0] < len(events)


# -- a stateful fuzz: answers added, stepped and aborted at random in one shared engine ------
_FUZZ_KW = dict(k=2, lookahead=1, chunk=2, horizon=4, propose=1, mix=0.3, reward=_digit_reward,
                base="acd-text", alpha=0.5)


@functools.cache
def _deal_alone(which: int, n: int, seed: int | None) -> tuple[int, ...]:
    """The answer DeAL gives the prompt run alone (its own engine, nothing else in it)."""
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("deal", **_FUZZ_KW))
    return tuple(dec.generate(PROMPTS[which], max_new_tokens=n, ignore_eos=True,
                              temperature=0.0 if seed is None else 0.9, seed=seed)[0].token_ids)


class SearcherMachine(RuleBasedStateMachine):
    """Random adds (greedy or seeded, more than the engine holds at once), steps and aborts:
    every finished answer equals its search run alone, no output belongs to an aborted or
    unknown answer, an answer never holds more than its peak, and no slot leaks."""

    threaded = False

    def __init__(self):
        super().__init__()
        import importlib
        from concurrent.futures import ThreadPoolExecutor

        searcher = importlib.import_module("safedecode.methods.deal").Searcher
        model, tok = tiny_llama()
        kw = {**_FUZZ_KW, "reward": _slow_digit_reward} if self.threaded else _FUZZ_KW
        self.spec = methods.get("deal", **kw)
        self.eng = SafeDecoder(model, tok, self.spec).engine(
            max_seqs=2 * self.spec.sequences_per_request + 1, drop_rows=False)
        self.pool = ThreadPoolExecutor(1) if self.threaded else None
        self.searcher = searcher(self.eng, self.spec, scorer=self.pool)
        self.open: dict[int, tuple[int, int, int | None]] = {}  # id -> (prompt, n, seed)
        self.added: list[int] = []
        self.gone: set[int] = set()

    def teardown(self):
        for _ in range(200):
            if not self.searcher.pending():
                break
            self.step()
        assert self.searcher.pending() == 0 and not self.open
        assert self.eng.state.free_slots == self.eng.state.max_seqs
        if self.pool is not None:
            self.pool.shutdown()

    @rule(which=st.integers(0, len(PROMPTS) - 1), n=st.integers(1, 7),
          seed=st.one_of(st.none(), st.integers(0, 50)))
    def add(self, which, n, seed):
        sp = SamplingParams(max_new_tokens=n, ignore_eos=True,
                            temperature=0.0 if seed is None else 0.9, seed=seed)
        rid = self.searcher.add(self.eng.build(PROMPTS[which]), PROMPTS[which], sp)[0]
        self.open[rid] = (which, n, seed)
        self.added.append(rid)

    @rule()
    def step(self):
        outs = self.eng.step(**self.searcher.step_args())
        for o, result in self.searcher.feed(outs, wait=0.0 if outs else 0.02):
            assert o.request_id in self.open and o.request_id not in self.gone
            if result is not None:
                assert tuple(result.token_ids) == _deal_alone(*self.open.pop(o.request_id))

    @precondition(lambda self: self.added)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(self.added))
        if rid in self.open:
            self.searcher.abort(rid)
            del self.open[rid]
            self.gone.add(rid)
        with pytest.raises(ValueError, match="no unfinished DeAL answer"):
            self.searcher.abort(rid)

    @invariant()
    def within_peaks_and_no_slot_leaks(self):
        live = [s.slot for s in self.eng._live.values() if s.slot >= 0]
        assert len(live) == len(set(live))
        assert self.eng.state.free_slots + len(live) == self.eng.state.max_seqs
        answers = self.searcher._answers.values()  # each within its peak (past the horizon 1)
        assert len(self.eng._live) <= sum(1 if a.phase == "free" else
                                          self.spec.sequences_per_request
                                          for a in answers if a.phase != "queued")


class ThreadedSearcherMachine(SearcherMachine):
    threaded = True


_FUZZ = settings(max_examples=20, stateful_step_count=30, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])
SearcherMachine.TestCase.settings = _FUZZ
ThreadedSearcherMachine.TestCase.settings = _FUZZ
test_searcher_state_machine = SearcherMachine.TestCase
test_threaded_searcher_state_machine = ThreadedSearcherMachine.TestCase
