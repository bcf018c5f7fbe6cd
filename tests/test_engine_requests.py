"""The request-level engine: continuous batching = lone runs, fork / keep / truncate, a stateful
fuzz of add / step / abort / fork, bad input, and one host transfer per decode step."""

from __future__ import annotations

import functools

import pytest
import torch
from engine_fixtures import MIXED_PROMPTS, tiny_llama
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from safedecode import methods
from safedecode.engine import Branch, BranchHook, Engine, SafeDecoder, SamplingParams, contrastive

PROMPTS = MIXED_PROMPTS + ["Name a colour.", "Why is the sky blue?"]


def _method():
    return methods.get("acd-text", alpha=0.5)


def _drain(eng: Engine, ids=None) -> dict:
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finish_reason:
                outs[o.request_id] = eng.pop_result(o.request_id)
    return outs


def _alone(model, tok, prompt, params: SamplingParams):
    dec = SafeDecoder(model, tok, _method())
    eng = dec.engine(max_seqs=1)
    rid = eng.add_request(prompt, params)
    return _drain(eng)[rid].token_ids


def test_token_id_requests_equal_rendered_prompts():
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, _method())
    eng = dec.engine(max_seqs=2)
    msgs = [{"role": "user", "content": PROMPTS[1]}]
    ids = []
    for br in dec.method.branches:
        prefix, suffix = dec.builder.build(br, msgs, 0)
        ids.append(prefix.ids + suffix)
    rid = eng.add_tokens(ids, SamplingParams(max_new_tokens=6))
    assert _drain(eng)[rid].token_ids == _alone(model, tok, PROMPTS[1],
                                                SamplingParams(max_new_tokens=6))


def test_continuous_batching_equals_lone_runs():
    """Requests added while others run (and queued past max_seqs) with mixed parameters give
    exactly the tokens each gets alone."""
    model, tok = tiny_llama()
    eng = SafeDecoder(model, tok, _method()).engine(max_seqs=2)
    params = [SamplingParams(max_new_tokens=9),
              SamplingParams(max_new_tokens=5, temperature=0.8, top_p=0.9, seed=3),
              SamplingParams(max_new_tokens=7, temperature=1.0, top_k=20, seed=11),
              SamplingParams(max_new_tokens=4, min_p=0.1, temperature=0.7, seed=5),
              SamplingParams(max_new_tokens=6)]
    ids, results = [], {}
    for i, (p, sp) in enumerate(zip(PROMPTS, params, strict=True)):
        ids.append(eng.add_request(p, sp))
        for _ in range(i + 1):  # requests arrive at different step boundaries
            for o in eng.step():
                if o.finish_reason:
                    results[o.request_id] = eng.pop_result(o.request_id)
    results.update(_drain(eng))
    assert eng.state.free_slots == 2
    for rid, p, sp in zip(ids, PROMPTS, params, strict=True):
        assert results[rid].token_ids == _alone(model, tok, p, sp), p
        assert len(results[rid].token_ids) == sp.max_new_tokens


def _live_slots(eng: Engine) -> list[int]:
    return sorted(s.slot for s in eng._live.values() if s.slot >= 0)


def test_finished_requests_leave_no_holes_and_outputs_stay_exact():
    """Requests that end in the middle of the slots are replaced by moving the top sequence
    down: the live slots stay 0..n-1 (steps read a view) and every output is still exact."""
    model, tok = tiny_llama()
    eng = SafeDecoder(model, tok, _method()).engine(max_seqs=4)
    params = [SamplingParams(max_new_tokens=n, temperature=0.8, seed=n, ignore_eos=True)
              for n in (3, 9, 2, 12)]
    ids = [eng.add_request(p, sp) for p, sp in zip(PROMPTS, params, strict=False)]
    decoded = []
    decode = eng.runner.decode
    eng.runner.decode = lambda st, slots: decoded.append(slots) or decode(st, slots)
    results = _drain(eng)
    assert len(decoded) == 11 and all(s == tuple(range(len(s))) for s in decoded), decoded
    for rid, p, sp in zip(ids, PROMPTS, params, strict=False):
        assert results[rid].token_ids == _alone(model, tok, p, sp), p


def test_compaction_moves_the_top_sequence_into_the_hole():
    model, tok = tiny_llama()
    eng = SafeDecoder(model, tok, _method()).engine(max_seqs=3)
    sp = SamplingParams(max_new_tokens=10, temperature=0.7, seed=2, ignore_eos=True)
    a, b, c = (eng.add_request(p, sp) for p in PROMPTS[:3])
    eng.step()
    eng.step()
    assert _live_slots(eng) == [0, 1, 2]
    eng.abort(b)
    assert _live_slots(eng) == [0, 2]
    res = _drain(eng)
    assert _live_slots(eng) == []
    assert res[c].token_ids == _alone(model, tok, PROMPTS[2], sp)
    assert res[a].token_ids == _alone(model, tok, PROMPTS[0], sp)


def test_prefill_budget_feeds_prompts_in_chunks_while_others_decode():
    """With ``max_prefill_tokens`` the prompts of requests that join running ones are fed in
    chunks of at most that many tokens per step (chunked prefill, in the packed forward):
    the running streams get a token every step, and every request ends exactly as alone."""
    model, tok = tiny_llama()
    eng = SafeDecoder(model, tok, _method()).engine(max_seqs=4, max_prefill_tokens=8)
    sp = SamplingParams(max_new_tokens=12, temperature=0.9, seed=4, ignore_eos=True)
    ids = [eng.add_request(PROMPTS[0], sp), eng.add_request(PROMPTS[1], sp)]
    fed = []
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: fed.append(kw["input_ids"].numel() if "input_ids" in kw
                                    else kw["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        eng.step()  # nothing was running: both prompts whole
        assert eng.num_waiting() == 0 and not eng._prefilling
        ids += [eng.add_request(p, SamplingParams(max_new_tokens=5)) for p in PROMPTS[2:4]]
        fed.clear()
        steps = 0
        while eng._prefilling or eng.num_waiting():
            decoding = eng.num_running() - len(eng._prefilling)
            outs = eng.step()
            steps += 1
            assert {o.request_id for o in outs} >= set(ids[:2])  # no stall
            assert fed[-1] - 2 * decoding <= 8  # K = 2 rows each + at most 8 prompt tokens
        assert steps >= 3  # the two prompts (> 8 tokens each, x 2 branches) took chunks
    finally:
        handle.remove()
    res = _drain(eng)
    for rid, p, q in zip(ids, PROMPTS, [sp, sp, SamplingParams(max_new_tokens=5),
                                         SamplingParams(max_new_tokens=5)], strict=False):
        assert res[rid].token_ids == _alone(model, tok, p, q)
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        SafeDecoder(model, tok, _method()).engine(max_prefill_tokens=0)


def test_chunked_prefill_of_rows_of_different_lengths_forks_and_aborts():
    """Chunks align a sequence's rows at their ends (a soft prompt without the prefix cache
    makes rows of different lengths); a request's choices fork after its last chunk; aborting
    a request mid-prefill frees its slot and its choices start over; nothing leaks."""
    model, tok = tiny_llama()
    ids_ = tok("You are careful.", add_special_tokens=False)["input_ids"]
    soft = model.get_input_embeddings()(torch.tensor(ids_)).detach()
    method = contrastive([Branch(soft_prompt=soft), Branch()], [1.5, -0.5])
    dec = SafeDecoder(model, tok, method, prefix_cache=False)

    def alone(p, sp):
        e = dec.engine(max_seqs=1)
        r = e.add_request(p, sp)
        return _drain(e)[r].token_ids

    eng = dec.engine(max_seqs=6, max_prefill_tokens=5)
    sp = SamplingParams(max_new_tokens=10, temperature=0.8, seed=9, ignore_eos=True)
    first = eng.add_request(PROMPTS[4], sp)
    eng.step()
    lens = dec.engine().runner.prompt_lengths(eng.build(PROMPTS[1]))
    assert len(set(lens)) == 2  # the two rows differ in length
    choices = eng.add_choices(PROMPTS[1], SamplingParams(max_new_tokens=4, seed=2,
                                                         temperature=1.0), 2)
    doomed = eng.add_choices(PROMPTS[3], SamplingParams(max_new_tokens=4), 2)
    eng.step()
    assert len(eng._prefilling) == 2  # both heads hold slots, fed in chunks
    eng.abort(doomed[0])  # mid-prefill: its second choice starts over, alone
    res = _drain(eng)
    assert eng.state.free_slots == 6 and not eng._prefilling
    assert res[first].token_ids == alone(PROMPTS[4], sp)
    for i, rid in enumerate(choices):
        assert res[rid].token_ids == alone(PROMPTS[1], SamplingParams(
            max_new_tokens=4, seed=2 + i, temperature=1.0))
    assert doomed[0] not in res
    assert res[doomed[1]].token_ids == alone(PROMPTS[3], SamplingParams(max_new_tokens=4))


def test_choices_are_forked_at_prefill_and_survive_an_abort_while_waiting():
    """add_choices: n sequences, one prefill, choice i draws with seed + i (= a lone request
    with that seed); aborting the group's head while it waits leaves the others intact."""
    model, tok = tiny_llama()
    eng = SafeDecoder(model, tok, _method()).engine(max_seqs=3)
    sp = SamplingParams(max_new_tokens=7, temperature=1.0, seed=30)
    first = eng.add_choices(PROMPTS[1], sp, 3)
    res = _drain(eng)
    for i, rid in enumerate(first):
        assert res[rid].token_ids == _alone(model, tok, PROMPTS[1], sp.with_seed(30 + i))
    blocker = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=4, ignore_eos=True))
    eng.step()
    ids = eng.add_choices(PROMPTS[2], sp, 3)  # needs 3 free slots: waits for the blocker
    eng.step()
    assert eng.num_waiting() == 1
    eng.abort(ids[0])
    res = _drain(eng)
    assert set(res) == {blocker, ids[1], ids[2]}
    for i in (1, 2):
        assert res[ids[i]].token_ids == _alone(model, tok, PROMPTS[2], sp.with_seed(30 + i))
    with pytest.raises(ValueError, match="max_seqs=3"):
        eng.add_choices(PROMPTS[0], sp, 4)


def test_raw_prompts_are_continued_as_they_are():
    model, tok = tiny_llama()
    eng = SafeDecoder(model, tok, methods.get("plain")).engine(max_seqs=1)
    text = "The capital of France is"
    built = eng.build(text, raw=True)
    assert built[0][0].ids + built[0][1] == tok(text)["input_ids"]
    with pytest.raises(ValueError, match="raw"):
        eng.add_request([{"role": "user", "content": "hi"}], raw=True)


def test_fork_then_decode_equals_decoding_the_prefix_from_scratch():
    model, tok = tiny_llama()
    eng = SafeDecoder(model, tok, _method()).engine(max_seqs=4)
    greedy = SamplingParams(max_new_tokens=12)
    rid = eng.add_request(PROMPTS[1], greedy)
    for _ in range(5):
        eng.step()
    parent_kv = eng.state.cache.layers[0].keys[:2, :, :eng.state.host_len[0]].clone()
    kids = eng.fork(rid, 3)
    k0 = eng._live[kids[0]].slot
    assert torch.equal(eng.state.cache.layers[0].keys[2 * k0:2 * k0 + 2, :, :parent_kv.shape[2]],
                       parent_kv)
    assert [eng.tokens(k) for k in kids] == [eng.tokens(rid)] * 3
    res = _drain(eng)
    ref = _alone(model, tok, PROMPTS[1], greedy)
    assert all(res[i].token_ids == ref for i in [rid, *kids])
    assert eng.state.free_slots == 4


def test_forked_children_sample_their_own_streams_and_keep_releases_the_rest():
    model, tok = tiny_llama()
    eng = SafeDecoder(model, tok, _method()).engine(max_seqs=4)
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7)
    rid = eng.add_request(PROMPTS[0], sp)
    for _ in range(3):
        eng.step()
    same, other = eng.fork(rid, 2, seeds=[7, 8])
    res = _drain(eng)
    # A child with the parent's seed continues the parent's stream token for token.
    assert res[same].token_ids == res[rid].token_ids == _alone(model, tok, PROMPTS[0], sp)
    assert res[other].token_ids[:3] == res[rid].token_ids[:3]
    assert res[other].token_ids != res[rid].token_ids

    rid = eng.add_request(PROMPTS[0], sp)
    eng.step()
    kids = eng.fork(rid, 3)
    eng.step()
    eng.keep([kids[1]])
    assert eng.num_running() == 1 and eng.state.free_slots == 3
    assert list(_drain(eng)) == [kids[1]]


def test_truncate_rolls_back_text_kv_and_seed_stream():
    model, tok = tiny_llama()
    eng = SafeDecoder(model, tok, _method()).engine(max_seqs=2)
    sp = SamplingParams(max_new_tokens=12, temperature=0.9, seed=21)
    rid = eng.add_request(PROMPTS[1], sp)
    for _ in range(8):
        eng.step()
    eng.truncate(rid, 3)
    assert len(eng.tokens(rid)) == 3
    res = _drain(eng)[rid]
    ref = SafeDecoder(model, tok, _method()).generate([PROMPTS[1]], max_new_tokens=12,
                                                      temperature=0.9, seed=21)[0]
    assert res.token_ids == ref.token_ids and res.text == ref.text


def test_held_sequences_sit_steps_out_and_go_on_unchanged():
    """``step(hold=ids)``: held running sequences get no token while the others decode (and new
    requests are admitted); released, they go on as if never held — greedy and seeded. Bad
    holds are named."""
    model, tok = tiny_llama()
    eng = SafeDecoder(model, tok, _method()).engine(max_seqs=4)
    asks = [(PROMPTS[0], SamplingParams(max_new_tokens=9)),
            (PROMPTS[1], SamplingParams(max_new_tokens=8, temperature=0.9, seed=3)),
            (PROMPTS[2], SamplingParams(max_new_tokens=7))]
    a, b = (eng.add_request(p, sp) for p, sp in asks[:2])
    eng.step()
    eng.step()
    results, c = {}, None
    for n in range(4):  # a and b held while c joins and decodes
        if n == 1:
            c = eng.add_request(*asks[2])
        outs = eng.step(hold=[a, b])
        assert {o.request_id for o in outs} <= {c} and len(eng.tokens(a)) == 2
    while eng.has_unfinished():
        for o in eng.step():
            if o.finish_reason:
                results[o.request_id] = eng.pop_result(o.request_id).token_ids
    for rid, (p, sp) in zip((a, b, c), asks, strict=True):
        assert results[rid] == _alone(model, tok, p, sp)
    d = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=4))
    for hold, match in (([99], "no unfinished request 99"), ([d], "not been prefilled"),
                        ("ab", "hold: expected sequence ids"), ([True], "hold: expected")):
        with pytest.raises(ValueError, match=match):
            eng.step(hold=hold)
    eng.step()
    with pytest.raises(ValueError, match="also expanded"):
        eng.step(expand={d: 2}, hold=[d])


def test_abort_frees_the_slot_and_waiting_requests_join():
    model, tok = tiny_llama()
    eng = SafeDecoder(model, tok, _method()).engine(max_seqs=1, max_queue=2)
    a = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=50, ignore_eos=True))
    b = eng.add_request(PROMPTS[1], SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match="max_queue"):
        eng.add_request(PROMPTS[2])
    eng.step()
    assert eng.num_running() == 1 and eng.num_waiting() == 1
    eng.abort(a)
    res = _drain(eng)
    assert list(res) == [b] and len(res[b].token_ids) == 3
    with pytest.raises(ValueError, match="request_id"):
        eng.abort(a)
    with pytest.raises(ValueError, match="request_id"):
        eng.abort(12345)


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("temperature", -0.1),
    ("temperature", float("nan")), ("top_k", -1), ("top_k", True), ("top_p", 0.0),
    ("top_p", 1.5), ("min_p", -0.2), ("min_p", 1.1), ("seed", -1), ("seed", 2**64),
    ("stop", "abc"), ("stop", [""]), ("stop_token_ids", [-3]), ("logprobs", "yes"),
    ("ignore_eos", 1),
])
def test_every_sampling_field_out_of_range_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_raw_token_id_prompts_follow_each_branch_system_text():
    """A raw prompt given as ids: each branch's system text and separator tokenised alone,
    then the ids as they are; bad ids named."""
    model, tok = tiny_llama()
    eng = SafeDecoder(model, tok, _method()).engine(max_seqs=2)
    built = eng.build([5, 6, 7], raw=True)
    for branch, (prefix, suffix) in zip(eng.method.branches, built, strict=True):
        head = f"{branch.system}\n\n" if branch.system else ""
        assert list(prefix.ids) == (tok(head)["input_ids"] if head else [])
        assert suffix == [5, 6, 7]
    assert any(b.system for b in eng.method.branches)  # a branch with a text prompt
    for bad in ([5, -1], [10**9]):
        with pytest.raises(ValueError, match=r"prompts\[0\]"):
            eng.build(bad, raw=True)
    with pytest.raises(ValueError, match="raw"):
        eng.build([5, 6], raw=False)
    # generate takes them too: one id list, or several; for `plain` = the text they encode
    plain = SafeDecoder(model, tok, methods.get("plain"))
    ids = tok("Once upon a time")["input_ids"]
    by_text = plain.generate("Once upon a time", raw=True, max_new_tokens=5)[0].token_ids
    assert plain.generate(ids, raw=True, max_new_tokens=5)[0].token_ids == by_text
    two = plain.generate([ids, ids[:2]], raw=True, max_new_tokens=5)
    assert two[0].token_ids == by_text and len(two) == 2


def test_bad_engine_calls_name_what_was_wrong():
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, _method())
    with pytest.raises(ValueError, match="max_seqs"):
        dec.engine(max_seqs=0)
    with pytest.raises(ValueError, match="max_len"):
        dec.engine(max_len=10**6)
    eng = dec.engine(max_seqs=2, max_len=128)
    with pytest.raises(ValueError, match="max_len"):
        eng.add_request("hi " * 60)
    with pytest.raises(ValueError, match="params"):
        eng.add_request("hi", {"temperature": 0.5})
    with pytest.raises(ValueError, match="empty prompt"):
        eng.add_request(" ")
    rid = eng.add_request("hi", SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="prefilled"):
        eng.fork(rid, 1)
    eng.step()
    with pytest.raises(ValueError, match="n: forking 2"):
        eng.fork(rid, 2)
    with pytest.raises(ValueError, match="n: must be"):
        eng.truncate(rid, 5)
    with pytest.raises(ValueError, match="still running"):
        eng.pop_result(rid)
    with pytest.raises(ValueError, match="decoding parameter"):
        SamplingParams.from_kwargs(temprature=0.3)
    with pytest.raises(ValueError, match="ids: expected 2"):
        eng.add_tokens([[1, 2, 3]])


class _SyncCounter:
    """Counts reads of device values into Python (each one a host sync on a GPU)."""

    NAMES = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=orig, **kw):
                self.count += 1
                return _orig(t, *a, **kw)
            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("extra", [{}, {"top_logprobs": 5, "frequency_penalty": 0.5,
                                        "logit_bias": {7: 1.0}, "repetition_penalty": 1.2},
                                   {"min_tokens": 10, "allowed_token_ids": (7, 8, 9, 10),
                                    "bad_words_ids": ((7, 8), (9,)),
                                    "sequence_bias": {(8, 7): 1.0, (10,): -1.0}}])
def test_one_host_transfer_per_decode_step(monkeypatch, extra):
    """Also with the best tokens, penalties, a logit bias, token bans and sequence biases
    asked: one read per step."""
    model, tok = tiny_llama()
    eng = SafeDecoder(model, tok, methods.get("acd-text", alpha=0.5)).engine(max_seqs=4)
    for p in PROMPTS[:3]:
        eng.add_request(p, SamplingParams(max_new_tokens=20, temperature=0.7, seed=1,
                                          logprobs=True, **extra))
    eng.step()  # admission + prefill
    counter = _SyncCounter(monkeypatch)
    for _ in range(5):
        counter.count = 0
        outs = eng.step()
        assert len(outs) == 3
        assert counter.count == 1, f"{counter.count} host reads in one decode step"


# -- a stateful fuzz: random add / step / abort / fork sequences ----------------------------
MAX_NEW = 6


# a penalised request: the bias makes token 1234 likely, the penalty stops it after a few, so
# its tokens depend on its own counts (kept through forks, slot moves and others' aborts);
# 1234 never twice in a row (a two-token bad word, read from its own tokens) and token 5
# never (its ban row)
ADJUST = {"frequency_penalty": 1.5, "logit_bias": {1234: 4.0}, "repetition_penalty": 2.0,
          "bad_words_ids": ((1234, 1234), (5,))}


@functools.cache
def _greedy_reference(which: int, adjusted: bool = False) -> tuple[int, ...]:
    model, tok = tiny_llama()
    return tuple(_alone(model, tok, PROMPTS[which], _params(MAX_NEW, adjusted)))


def _params(n: int, adjusted: bool) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **(ADJUST if adjusted else {}))


class EngineMachine(RuleBasedStateMachine):
    """Greedy requests over a small prompt pool, some with penalties and a logit bias: every
    finished sequence (forks included) must hold a prefix of its prompt's lone greedy run with
    its parameters, and slots never leak."""

    budget = None  # max_prefill_tokens (the chunked variant below sets one)

    def __init__(self):
        super().__init__()
        model, tok = tiny_llama()
        self.eng = SafeDecoder(model, tok, _method()).engine(max_seqs=3, max_queue=4,
                                                             max_prefill_tokens=self.budget)
        self.prompt: dict[int, tuple[int, bool]] = {}
        self.want: dict[int, int] = {}
        self.finished: set[int] = set()

    @rule(which=st.integers(0, len(PROMPTS) - 1), n=st.integers(1, MAX_NEW),
          adjusted=st.booleans())
    def add(self, which, n, adjusted):
        if self.eng.num_waiting() >= 4:
            with pytest.raises(ValueError, match="max_queue"):
                self.eng.add_request(PROMPTS[which])
            return
        rid = self.eng.add_request(PROMPTS[which], _params(n, adjusted))
        self.prompt[rid], self.want[rid] = (which, adjusted), n

    @rule()
    def step(self):
        for o in self.eng.step():
            assert o.request_id in self.prompt
            if o.finish_reason:
                res = self.eng.pop_result(o.request_id)
                ref = _greedy_reference(*self.prompt[o.request_id])
                assert tuple(res.token_ids) == ref[:self.want[o.request_id]]
                self.finished.add(o.request_id)

    @precondition(lambda self: self.eng.has_unfinished())
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.eng._live)))
        self.eng.abort(rid)

    @precondition(lambda self: self.eng.state.free_slots > 0 and any(
        s.slot >= 0 and s.built is None for s in self.eng._live.values()))
    @rule(data=st.data())
    def fork(self, data):
        running = sorted(i for i, s in self.eng._live.items() if s.slot >= 0 and s.built is None)
        rid = data.draw(st.sampled_from(running))
        n = data.draw(st.integers(1, self.eng.state.free_slots))
        for kid in self.eng.fork(rid, n):
            self.prompt[kid], self.want[kid] = self.prompt[rid], self.want[rid]

    @invariant()
    def no_slot_leaks(self):
        st_ = self.eng.state
        used = sorted(s.slot for s in self.eng._live.values() if s.slot >= 0)
        assert len(used) == len(set(used))
        assert st_.free_slots + len(used) == st_.max_seqs
        assert self.eng.num_running() + self.eng.num_waiting() == len(self.eng._live)


EngineMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_engine_state_machine = EngineMachine.TestCase


class ChunkedEngineMachine(EngineMachine):
    """The same with prompts fed in chunks of at most 3 tokens while others decode."""

    budget = 3


ChunkedEngineMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_chunked_engine_state_machine = ChunkedEngineMachine.TestCase


def test_compiled_decode_equals_eager_and_compiles_once():
    """``compile=True``: the same greedy tokens as eager, one graph for every step of a batch
    shape, reused by later calls."""
    import warnings

    from torch._dynamo.utils import counters

    model, tok = tiny_llama()
    m = _method()
    eager = SafeDecoder(model, tok, m)
    comp = SafeDecoder(model, tok, m, compile=True)
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for prompt in (PROMPTS[0], PROMPTS[3]):
            got = comp.generate([prompt], max_new_tokens=10)[0].token_ids
            assert got == eager.generate([prompt], max_new_tokens=10)[0].token_ids
    assert counters["stats"]["unique_graphs"] == 1
    hook = BranchHook("model.layers.0", lambda h: h)
    with pytest.raises(ValueError, match="compile"):
        SafeDecoder(model, tok, contrastive([Branch(hooks=(hook,))], [1.0]), compile=True)


@pytest.mark.parametrize("name", ["acd-text", "route", "deal"])
def test_generate_max_batch_is_continuous_batching_with_the_same_answers(name):
    """``generate(max_batch=N, on_result=cb)``: at most N requests decode at once (a search's
    answers with their sequences), the others join as earlier ones finish; the answers equal
    all-at-once generation (greedy and seeded), and ``cb`` sees each result once, as it
    finishes. Bad values are named."""
    model, tok = tiny_llama()
    kw = {"acd-text": dict(alpha=0.5), "route": dict(base="acd-text", reward="length:target=4",
                                                     horizon=2),
          "deal": dict(base="acd-text", reward="keywords:include=a", k=2, lookahead=2)}[name]
    dec = SafeDecoder(model, tok, methods.get(name, **kw))
    prompts = PROMPTS[:5]
    made = []
    orig = dec.engine

    def engine(**ekw):
        made.append(ekw["max_seqs"])
        return orig(**ekw)
    dec.engine = engine
    seen: list = []
    for decoding in (dict(max_new_tokens=6), dict(max_new_tokens=6, temperature=0.9, seed=4)):
        seen.clear()
        got = dec.generate(prompts, max_batch=2, on_result=lambda i, r: seen.append((i, r)),
                           **decoding)
        want = dec.generate(prompts, **decoding)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert sorted(i for i, _ in seen) == list(range(5))  # each once, as it finished
        assert all(r is got[i] for i, r in seen)
    per = getattr(dec.search, "sequences_per_request", 1)
    assert made == [2 * per, 5 * per] * 2
    streamed = {}
    for ev in dec.stream(prompts, max_batch=2, max_new_tokens=6):
        streamed[ev.index] = streamed.get(ev.index, "") + ev.text
    assert [streamed[i] for i in range(5)] == [
        r.text for r in dec.generate(prompts, max_new_tokens=6)]
    for bad, match in ((dict(max_batch=0), "max_batch: must be"),
                       (dict(max_batch=True), "max_batch: must be"),
                       (dict(on_result=3), "on_result: expected a callable")):
        with pytest.raises(ValueError, match=match):
            dec.generate(prompts, max_new_tokens=2, **bad)
