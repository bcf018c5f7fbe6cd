"""The reward router (safedecode.methods.route): exactness against the two methods it routes
between, decoded alone, on a tiny random model."""

from __future__ import annotations

import functools
import json
import time

import pytest
import torch
from engine_fixtures import tiny_llama
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from safedecode import methods
from safedecode.engine import SafeDecoder, SamplingParams
from safedecode.engine.branches import Branch, Method, contrastive
from safedecode.eval.runner import method_fingerprint
from safedecode.methods.rewards import make_reward
from safedecode.methods.route import search

PROMPTS = ["Why is the sky blue?", "Name a colour.", "Hi", "Tell me a story about a cat."]
BASE = {"base": "acd-text", "alpha": 0.5}


def _vowels(prompts, texts):
    """A known function of the text: its vowels minus half its spaces."""
    return [sum(ch in "aeiou" for ch in t) - 0.5 * t.count(" ") for t in texts]


def _alone(model, tok, name: str, **kw) -> list:
    return SafeDecoder(model, tok, methods.get(name, **kw)).generate(PROMPTS, max_new_tokens=10)


@pytest.mark.parametrize("horizon", [1, 4, 10])
def test_route_picks_by_the_reward_and_equals_the_winner_decoded_alone(horizon):
    model, tok = tiny_llama()
    base = _alone(model, tok, "acd-text", alpha=0.5)
    plain = _alone(model, tok, "plain")
    assert [b.token_ids for b in base] != [p.token_ids for p in plain]  # something to route
    spec = methods.get("route", reward=_vowels, horizon=horizon, margin=0.5, **BASE)
    got = SafeDecoder(model, tok, spec).generate(PROMPTS, max_new_tokens=10)
    picked = set()
    for p, b, q, g in zip(PROMPTS, base, plain, got, strict=True):
        cut = [tok.decode(r.token_ids[:horizon], skip_special_tokens=True) for r in (b, q)]
        hb, hq = _vowels([p, p], cut)
        want = b if hb - hq > 0.5 else q
        picked.add(want is b)
        assert g.token_ids == want.token_ids, p
        assert g.text == want.text
    assert picked == {True, False}  # both sides were chosen somewhere
    # each prompt alone gives the same answer (no row of one request touches another's)
    one = [SafeDecoder(model, tok, spec).generate([p], max_new_tokens=10)[0] for p in PROMPTS]
    assert [r.token_ids for r in one] == [r.token_ids for r in got]


def test_margin_extremes_give_each_method_and_slots_are_freed():
    model, tok = tiny_llama()
    base = _alone(model, tok, "acd-text", alpha=0.5)
    plain = _alone(model, tok, "plain")
    for margin, want in ((-1e9, base), (1e9, plain)):
        spec = methods.get("route", reward=_vowels, horizon=3, margin=margin, **BASE)
        dec = SafeDecoder(model, tok, spec)
        eng = dec.engine(max_seqs=2 * len(PROMPTS))
        built = [eng.build(p) for p in PROMPTS]
        got = search(eng, built, PROMPTS, SamplingParams(max_new_tokens=10), spec)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert not eng.has_unfinished() and eng.state.free_slots == 2 * len(PROMPTS)


def test_route_keeps_the_winners_top_logprobs_and_penalties():
    """Per-request extras on a routed answer are the winning method's own: at each margin
    extreme, the tokens, log-probs and best tokens of that method decoded alone with them."""
    model, tok = tiny_llama()
    kw = dict(max_new_tokens=8, return_logprobs=True, top_logprobs=3, frequency_penalty=1.5,
              logit_bias={1234: 4.0}, repetition_penalty=1.3)
    for margin, name, mkw in ((-1e9, "acd-text", {"alpha": 0.5}), (1e9, "plain", {})):
        want = SafeDecoder(model, tok, methods.get(name, **mkw)).generate(PROMPTS, **kw)
        spec = methods.get("route", reward=_vowels, horizon=3, margin=margin, **BASE)
        got = SafeDecoder(model, tok, spec).generate(PROMPTS, **kw)
        for g, w in zip(got, want, strict=True):
            assert g.token_ids == w.token_ids and 1234 in g.token_ids
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
            assert [[i for i, _ in s] for s in g.top_logprobs] == \
                [[i for i, _ in s] for s in w.top_logprobs]


def test_sampled_route_is_seeded():
    model, tok = tiny_llama()
    spec = methods.get("route", reward=_vowels, horizon=4, **BASE)
    dec = SafeDecoder(model, tok, spec)
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    a, b = dec.generate(PROMPTS, **kw), dec.generate(PROMPTS, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert all(len(r.token_ids) >= 1 for r in a)


def test_gates_decode_the_contrast_and_the_fallback_side_by_side():
    """Engine.add_built(gates=...): the choice gated on decodes the contrast, the one gated
    off the fallback branch alone — each equal to that method decoded alone."""
    model, tok = tiny_llama()
    spec = methods.get("route", reward=_vowels, **BASE)
    eng = SafeDecoder(model, tok, spec).engine(max_seqs=4)
    on, off = eng.add_built(eng.build("Hi"), SamplingParams(max_new_tokens=6), n=2,
                            gates=(True, False))
    while eng.has_unfinished():
        eng.step()
    got = [eng.pop_result(i).token_ids for i in (on, off)]
    want = [SafeDecoder(model, tok, methods.get(n, **kw)).generate(["Hi"], max_new_tokens=6)[0]
            .token_ids for n, kw in (("acd-text", {"alpha": 0.5}), ("plain", {}))]
    assert got == want


def test_bad_input_is_named():
    model, tok = tiny_llama()
    for kw, match in (({"horizon": 0}, "horizon: must be"), ({"horizon": True}, "horizon"),
                      ({"margin": float("nan")}, "margin: must be a finite"),
                      ({"margin": "high"}, "margin"), ({"base": "deal"}, "decoding method"),
                      ({"base": "acd-text", "gamma": 1.0}, "gamma"),
                      ({"reward": "nope"}, "unknown 'nope'")):
        with pytest.raises(ValueError, match=match):
            methods.get("route", **({"reward": _vowels, **BASE} | kw))
    with pytest.raises(ValueError, match="reward: expected a Reward"):
        methods.Route(methods.get("acd-text"), _vowels)
    with pytest.raises(ValueError, match="already gated"):
        methods.get("route", reward=_vowels, base=methods.get("acd", gate=0))
    with pytest.raises(ValueError, match="cannot be routed"):  # the linear rule's anchor != 1
        methods.get("route", reward=_vowels, base="self-cd")
    # a contrast gate with no gated hook: the engine asks for the decisions
    m = Method("c", (Branch(system="a"), Branch(system="b"), Branch()), (1.0, -0.5, 0.0),
               contrast_gate=0, fallback=2)
    eng = SafeDecoder(model, tok, m).engine(max_seqs=2)
    with pytest.raises(ValueError, match="no gated hook to decide"):
        eng.add_choices("Hi", None, 1)
    for gates in ((True,), (True, 1), "ab"):
        with pytest.raises(ValueError, match="gates: expected 2 booleans"):
            eng.add_built(eng.build("Hi"), None, n=2, gates=gates)
    plain_eng = SafeDecoder(model, tok, methods.get("plain")).engine(max_seqs=2)
    with pytest.raises(ValueError, match="no contrast_gate"):
        plain_eng.add_built(plain_eng.build("Hi"), None, gates=(True,))
    dec = SafeDecoder(model, tok, methods.get("route", reward=_vowels, **BASE))
    with pytest.raises(ValueError, match="streamer: a route search"):
        dec.generate("Hi", max_new_tokens=2, streamer=object())


@pytest.mark.parametrize("horizon", [2, 20])
def test_stream_yields_the_kept_answers_text(horizon):
    """Streaming: each request's deltas (held back until the reward chose, then as decoded)
    join to exactly the text generate() returns, ending with its finish reason."""
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("route", reward=_vowels, horizon=horizon,
                                              margin=0.5, **BASE))
    want = dec.generate(PROMPTS, max_new_tokens=10)
    got: dict[int, list] = {}
    for ev in dec.stream(PROMPTS, max_new_tokens=10):
        got.setdefault(ev.index, []).append(ev)
    assert sorted(got) == list(range(len(PROMPTS)))
    for i, evs in got.items():
        assert "".join(e.text for e in evs) == want[i].text
        assert [e.token_id for e in evs] == want[i].token_ids
        assert evs[-1].finish_reason == want[i].finish_reason
        assert all(e.finish_reason is None for e in evs[:-1])


def test_fingerprint_tells_route_settings_apart():
    fp = {method_fingerprint(methods.get("route", **({"reward": "length:target=8"} | BASE | kw)))
          for kw in ({}, {"margin": -2.0}, {"margin": 0}, {"horizon": 8},
                     {"reward": "length:target=9"})}
    assert len(fp) == 4  # margin -2 (the default) and -2.0 are one setting
    assert all(f.startswith("route-") for f in fp)
    base = method_fingerprint(methods.get("acd-text", alpha=0.5))
    assert base not in fp


def test_cli_generate_route_and_its_errors(tiny_model_dir):
    from typer.testing import CliRunner

    from safedecode.cli import app

    run = CliRunner().invoke
    cmd = ["generate", "--model", str(tiny_model_dir), "--method", "route", "-n", "5",
           "--base", "acd-text", "--reward", "keywords:include=the"]
    r = run(app, [*cmd, "--horizon", "2", "--margin", "0", "--json", "Hi"])
    assert r.exit_code == 0, r.output
    assert '"method": "route"' in r.output and '"tokens": 5' in r.output
    r = run(app, [*cmd, "--horizon", "2", "--stream", "Hi"])
    assert r.exit_code == 0 and r.output.strip(), r.output
    for extra, match in ((["--horizon", "0"], "horizon: must be"),
                         (["--base", "deal"], "decoding method")):
        r = run(app, [*cmd, *extra, "Hi"])
        assert r.exit_code == 2 and match in r.output, (extra, r.output)


def test_route_on_a_padded_batch_matches_torch_reference():
    """Greedy route with a reward that always keeps the base equals the base's greedy tokens
    under the reference backend too (the gate override works whatever the op backend)."""
    model, tok = tiny_llama()
    spec = methods.get("route", reward=_vowels, margin=-1e9, horizon=2, **BASE)
    got = SafeDecoder(model, tok, spec, backend="reference").generate(PROMPTS, max_new_tokens=6)
    want = SafeDecoder(model, tok, methods.get("acd-text", alpha=0.5), backend="reference"
                       ).generate(PROMPTS, max_new_tokens=6)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert torch.tensor([len(r.token_ids) for r in got]).le(6).all()


def test_eval_runs_the_router_and_caches_it(tmp_path):
    """`safedecode eval` takes a route spec (a bracketed reward), generates each item once and
    reports it; the answers equal the router run directly."""
    from safedecode.eval.datasets import Dataset, Item
    from safedecode.eval.runner import evaluate

    model, tok = tiny_llama()
    items = [Item(f"i{i}", p, "misc", "benign") for i, p in enumerate(PROMPTS)]
    sets = [Dataset("tiny", items, "memory")]
    spec = "route:base=acd-text:alpha=0.5:reward=[keywords:include=the|a]:horizon=3:margin=0"
    kw = dict(datasets=sets, out_dir=tmp_path / "run", ppl=False, max_new_tokens=6,
              batch_size=3)
    res = evaluate(model, tok, methods=[spec], **kw)
    assert res["summary"][spec]["benign"]["n"] == len(PROMPTS)
    recs = [json.loads(x) for x in open(tmp_path / "run" / "generations.jsonl")]
    assert len(recs) == len(PROMPTS) and all(r["method_fingerprint"].startswith("route-")
                                             for r in recs)
    direct = SafeDecoder(model, tok, methods.get(
        "route", base="acd-text", alpha=0.5, reward="keywords:include=the|a", horizon=3,
        margin=0)).generate(PROMPTS, max_new_tokens=6)
    assert {r["item_id"]: r["token_ids"] for r in recs} == {
        f"i{i}": r.token_ids for i, r in enumerate(direct)}
    evaluate(model, tok, methods=[spec], **kw)  # cached: nothing generated again
    assert len(open(tmp_path / "run" / "generations.jsonl").readlines()) == len(PROMPTS)


def test_on_step_reports_every_engine_step():
    model, tok = tiny_llama()
    calls = []
    spec = methods.get("route", reward=_vowels, horizon=3, **BASE)
    got = SafeDecoder(model, tok, spec).generate(PROMPTS, max_new_tokens=6,
                                                 on_step=lambda d, n: calls.append((d, n)))
    assert len(calls) >= 6 and all(n == len(PROMPTS) for _, n in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)  # never goes back
    assert calls[-1][0] == len(got) == len(PROMPTS)


def test_a_base_with_its_own_plain_branch_falls_back_to_it():
    """No branch is added where the base already has the plain model (one row fewer per
    choice), and the gated-off choice still decodes exactly the plain model."""
    model, tok = tiny_llama()
    base = contrastive((Branch(system="Be safe.", name="safe"), Branch(name="plain")),
                       (1.0, -0.5), name="c")
    spec = methods.Route(base, make_reward(_vowels), horizon=2, margin=1e9)
    assert spec.engine_method.k == base.k and spec.engine_method.fallback == 1
    got = SafeDecoder(model, tok, spec).generate(PROMPTS, max_new_tokens=6)
    want = _alone(model, tok, "plain")
    assert [r.token_ids for r in got] == [r.token_ids[:6] for r in want]


def test_router_shares_its_engine_with_other_requests_and_aborts():
    """A Router drives routed requests in an engine that also runs an unrouted one: the
    unrouted request's outputs pass through untouched (its result stays in the engine), the
    routed answers equal routing alone, and abort frees every live sequence of a request."""
    from safedecode.methods.route import Router

    model, tok = tiny_llama()
    spec = methods.get("route", reward=_vowels, horizon=3, margin=0.5, **BASE)
    want = SafeDecoder(model, tok, spec).generate(PROMPTS[:2], max_new_tokens=8)
    eng = SafeDecoder(model, tok, spec).engine(max_seqs=8)
    router = Router(eng, spec)
    sp = SamplingParams(max_new_tokens=8)
    ids = [router.add(eng.build(p), p, sp, index=i)[0] for i, p in enumerate(PROMPTS[:2])]
    other = eng.add_built(eng.build(PROMPTS[2]), sp, gates=(False,))[0]
    dropped = router.add(eng.build(PROMPTS[3]), PROMPTS[3], sp)[0]
    assert router.pending() == 3
    got, passed = {}, []
    for n in range(30):
        if n == 2:
            router.abort(dropped)  # undecided (horizon 3): both of its sequences go
            with pytest.raises(ValueError, match="no unfinished routed request"):
                router.abort(dropped)
        if not eng.has_unfinished():
            break
        for o, result in router.feed(eng.step()):
            assert o.request_id != dropped
            if o.request_id == other:
                passed.append(o)
                assert result is None
            elif result is not None:
                got[o.request_id] = result
    assert [got[i].token_ids for i in ids] == [w.token_ids for w in want]
    alone = SafeDecoder(model, tok, methods.get("plain")).generate(PROMPTS[2], max_new_tokens=8)
    assert eng.pop_result(other).token_ids == alone[0].token_ids == [o.token_id for o in passed]
    assert router.pending() == 0 and eng.state.free_slots == 8
    with pytest.raises(ValueError, match="prompt: the reward scores text"):
        router.add(eng.build("Hi"), ["Hi"], sp)
    with pytest.raises(ValueError, match=r"n: 5 routed answers need 10 sequences"):
        router.add(eng.build("Hi"), "Hi", sp, n=5)


def test_router_aborts_a_request_still_waiting_and_the_rest_go_on():
    """With two slots, a second routed request waits in the queue (its two choices as one
    unit); aborting it there frees nothing it does not hold, and the first answers as alone."""
    from safedecode.methods.route import Router

    model, tok = tiny_llama()
    spec = methods.get("route", reward=_vowels, horizon=2, margin=0.5, **BASE)
    want = SafeDecoder(model, tok, spec).generate(PROMPTS[0], max_new_tokens=6)[0]
    eng = SafeDecoder(model, tok, spec).engine(max_seqs=2)
    router = Router(eng, spec)
    sp = SamplingParams(max_new_tokens=6)
    first = router.add(eng.build(PROMPTS[0]), PROMPTS[0], sp)[0]
    waiting = router.add(eng.build(PROMPTS[1]), PROMPTS[1], sp)[0]
    router.feed(eng.step())
    assert eng.num_waiting() == 1
    router.abort(waiting)
    assert eng.num_waiting() == 0 and router.pending() == 1
    got = None
    while eng.has_unfinished():
        for o, result in router.feed(eng.step()):
            assert o.request_id == first
            got = result or got
    assert got.token_ids == want.token_ids and eng.state.free_slots == 2


def test_router_scores_on_a_thread_while_the_engine_steps():
    """With a scorer (one worker thread), a slow reward runs while the engine goes on stepping:
    both sides keep decoding until a later feed() finds the score, and the answers, the
    decisions and the freed slots equal the inline router's. A request aborted while scored is
    dropped when its score comes back; requests whose sides end before the score comes back
    are collected by feed(wait=...)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from safedecode.methods.route import Router

    model, tok = tiny_llama()
    gate = threading.Event()
    calls: list[str] = []

    def slow(prompts, texts):
        calls.append(threading.current_thread().name)
        assert gate.wait(10), "the test never let the reward go"
        return _vowels(prompts, texts)

    spec = methods.get("route", reward=_vowels, horizon=3, margin=0.5, **BASE)
    want = SafeDecoder(model, tok, spec).generate(PROMPTS, max_new_tokens=9)
    threaded = methods.Route(spec.base, make_reward(slow), horizon=3, margin=0.5)
    eng = SafeDecoder(model, tok, threaded).engine(max_seqs=10)
    with ThreadPoolExecutor(1, thread_name_prefix="rm") as pool:
        router = Router(eng, threaded, scorer=pool)
        sp = SamplingParams(max_new_tokens=9)
        ids = [router.add(eng.build(p), p, sp, index=i)[0] for i, p in enumerate(PROMPTS)]
        dropped = router.add(eng.build(PROMPTS[0]), PROMPTS[0], sp)[0]
        got: dict[int, object] = {}
        for _ in range(5):  # horizon 3: scored after step 3; the engine steps on meanwhile
            assert router.feed(eng.step()) == []  # held: no answer chosen yet
        assert router.scoring() == 1 and router.pending() == 5
        assert all(eng.num_tokens(i) == 5 for i in ids)  # base sides went on decoding
        router.abort(dropped)  # while its score is in flight
        gate.set()
        deadline = time.monotonic() + 10
        while (eng.has_unfinished() or router.scoring()) and time.monotonic() < deadline:
            outs = eng.step() if eng.has_unfinished() else []
            for o, result in router.feed(outs, wait=0.5):
                assert o.request_id != dropped
                if result is not None:
                    got[o.request_id] = result
        assert calls and set(calls) == {"rm_0"}
        assert [got[i].token_ids for i in ids] == [w.token_ids for w in want]
        assert [got[i].text for i in ids] == [w.text for w in want]
        assert router.pending() == 0 and router.scoring() == 0
        assert eng.state.free_slots == 10
        # sides that end before the score is back (max_new_tokens == horizon)
        gate.clear()
        rid = router.add(eng.build(PROMPTS[1]), PROMPTS[1], SamplingParams(max_new_tokens=3))[0]
        for _ in range(3):
            assert router.feed(eng.step()) == []
        assert not eng.has_unfinished() and router.scoring() == 1
        assert router.feed([], wait=0.01) == []  # not back yet: nothing, no hang
        gate.set()
        out = router.feed([], wait=5)
        assert [o.request_id for o, _ in out] == [rid] * 3 and out[-1][1] is not None
        short = SafeDecoder(model, tok, spec).generate(PROMPTS[1], max_new_tokens=3)[0]
        assert out[-1][1].token_ids == short.token_ids and eng.state.free_slots == 10
    with pytest.raises(ValueError, match="scorer: expected a concurrent.futures.Executor"):
        Router(eng, threaded, scorer=object())


# -- a stateful fuzz: routed and unrouted requests, aborts, a reward inline or on a thread ------
_FUZZ_SPEC = dict(reward=_vowels, horizon=3, margin=0.5, **BASE)


@functools.cache
def _alone_tokens(name: str, which: int, n: int) -> tuple[int, ...]:
    model, tok = tiny_llama()
    kw = {"alpha": BASE["alpha"]} if name != "plain" else {}
    dec = SafeDecoder(model, tok, methods.get(name, **kw))
    return tuple(dec.generate(PROMPTS[which], max_new_tokens=n, ignore_eos=True)[0].token_ids)


@functools.cache
def _routed_reference(which: int, n: int) -> tuple[int, ...]:
    """The base's or the plain model's answer decoded alone, whichever the reward keeps on
    their first ``horizon`` tokens (computed here, not by the router)."""
    _, tok = tiny_llama()
    base, plain = (_alone_tokens(m, which, n) for m in (BASE["base"], "plain"))
    cut = [tok.decode(t[:_FUZZ_SPEC["horizon"]], skip_special_tokens=True) for t in (base, plain)]
    hb, hq = _vowels([PROMPTS[which]] * 2, cut)
    return base if hb - hq > _FUZZ_SPEC["margin"] else plain


class RouterMachine(RuleBasedStateMachine):
    """Random adds of routed and unrouted requests, steps and aborts in one engine: every
    finished routed answer equals routing it alone, unrouted ones equal the plain model's, no
    output belongs to an aborted or unknown request, and no slot leaks (the reward inline, or
    on a thread while the engine steps)."""

    threaded = False

    def __init__(self):
        super().__init__()
        from concurrent.futures import ThreadPoolExecutor

        from safedecode.methods.route import Router

        model, tok = tiny_llama()
        spec = methods.get("route", **_FUZZ_SPEC)
        if self.threaded:  # slow enough that the engine steps while it scores
            spec = methods.Route(spec.base, make_reward(_slow_vowels), horizon=3, margin=0.5)
        self.pool = ThreadPoolExecutor(1) if self.threaded else None
        self.eng = SafeDecoder(model, tok, spec).engine(max_seqs=6)
        self.router = Router(self.eng, spec, scorer=self.pool)
        self.routed: dict[int, tuple[int, int]] = {}  # unfinished: id -> (prompt, tokens)
        self.added: list[int] = []  # every routed id (draws must not depend on timing)
        self.plain: dict[int, tuple[int, int]] = {}
        self.gone: set[int] = set()

    def teardown(self):
        deadline = time.monotonic() + 30
        while (self.eng.has_unfinished() or self.router.scoring()) and \
                time.monotonic() < deadline:
            self.step()
        assert self.router.pending() == 0 and self.router.scoring() == 0
        assert self.eng.state.free_slots == 6 and not self.eng.has_unfinished()
        if self.pool is not None:
            self.pool.shutdown()

    @rule(which=st.integers(0, len(PROMPTS) - 1), n=st.integers(1, 6), routed=st.booleans())
    def add(self, which, n, routed):
        sp = SamplingParams(max_new_tokens=n, ignore_eos=True)
        built = self.eng.build(PROMPTS[which])
        if routed:
            rid = self.router.add(built, PROMPTS[which], sp)[0]
            self.routed[rid] = (which, n)
            self.added.append(rid)
        else:
            self.plain[self.eng.add_built(built, sp, gates=(False,))[0]] = (which, n)

    @rule()
    def step(self):
        outs = self.eng.step() if self.eng.has_unfinished() else []
        for o, result in self.router.feed(outs, wait=0.05 if not outs else 0.0):
            assert o.request_id not in self.gone
            if o.request_id in self.plain:
                assert result is None
                if o.finish_reason:
                    got = self.eng.pop_result(o.request_id).token_ids
                    assert tuple(got) == _alone_tokens("plain", *self.plain.pop(o.request_id))
                continue
            assert o.request_id in self.routed
            if result is not None:
                assert tuple(result.token_ids) == _routed_reference(
                    *self.routed.pop(o.request_id))

    @precondition(lambda self: self.added)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(self.added))
        if rid in self.routed:  # unfinished (with the reward on a thread: timing decides)
            self.router.abort(rid)
            del self.routed[rid]
            self.gone.add(rid)
        with pytest.raises(ValueError, match="no unfinished routed request"):
            self.router.abort(rid)

    @invariant()
    def no_slot_leaks(self):
        live = self.eng._live.values()
        used = sorted(s.slot for s in live if s.slot >= 0)
        assert len(used) == len(set(used))
        assert self.eng.state.free_slots + len(used) == 6


def _slow_vowels(prompts, texts):
    time.sleep(0.004)
    return _vowels(prompts, texts)


class ThreadedRouterMachine(RouterMachine):
    threaded = True


_FUZZ = settings(max_examples=25, stateful_step_count=25, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])
RouterMachine.TestCase.settings = _FUZZ
ThreadedRouterMachine.TestCase.settings = _FUZZ
test_router_state_machine = RouterMachine.TestCase
test_threaded_router_state_machine = ThreadedRouterMachine.TestCase


def test_a_search_puts_its_reward_next_to_the_model():
    """SafeDecoder moves a search's reward (weighted parts too) to the policy model's device,
    so a GPU-served model's reward model runs on the GPU; rewards without a model ignore it."""
    from safedecode.methods.rewards import Reward

    class Placed(Reward):
        def __init__(self):
            self.devices = []

        def to(self, device):
            self.devices.append(torch.device(device))
            return self

        def __call__(self, prompts, texts):
            return _vowels(prompts, texts)

    model, tok = tiny_llama()
    one, two = Placed(), Placed()
    SafeDecoder(model, tok, methods.get("route", reward=one + 2 * two, **BASE))
    SafeDecoder(model, tok, methods.get("deal", reward=one, k=2))
    assert one.devices == [torch.device("cpu")] * 2 and two.devices == [torch.device("cpu")]
    kw = make_reward("keywords:include=sorry")
    assert kw.to("cpu") is kw
