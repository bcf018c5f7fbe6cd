"""Presence / frequency penalties and logit bias (``SamplingParams``): the engine's tokens equal a
from-scratch loop that applies them to every branch's logits, per request in a shared batch,
through forks and truncations."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import SAMPLING_PROMPTS, fork_then_truncate, tiny_acd_decoder

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
    """Weights (1, -0.5) (sum 0.5, the anchor 1), self-cd's (-1.5, 2.5) (the anchor negative),
    and (1, -1) (sum 0: a bias on the branches alike would cancel)."""
    model, tok = acd.model, acd.tok
    return {"acd-text": acd, "self-cd": SafeDecoder(model, tok, methods.get("self-cd")),
            "acd-text-1": SafeDecoder(model, tok, methods.get("acd-text", alpha=1.0))}


def _from_scratch(dec, prompt: str, n: int, presence: float = 0.0, frequency: float = 0.0,
                  bias: dict[int, float] | None = None, repetition: float = 1.0,
                  seq_bias: dict[tuple, float] | None = None) -> list[int]:
    """Greedy tokens, every step recomputed without a cache: the repetition penalty on each
    branch's logits over that branch's prompt and the answer; the bias and penalties on the
    final score and on the anchor (its plausibility mask) — as an extra branch of weight
    ``1 - w_anchor`` holding them, beside the anchor's logits plus them. ``seq_bias``: each
    sequence's last token biased so where the anchor's prompt + the answer end in the tokens
    before it (transformers' ``sequence_bias``)."""
    m, eos = dec.method, eos_ids(dec.model, dec.tok)
    ids = []
    for branch in m.branches:
        prefix, suffix = dec.builder.build(branch, [{"role": "user", "content": prompt}], 0)
        ids.append(prefix.ids + suffix)
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            z = torch.stack([dec.model(torch.tensor([x + out])).logits[0, -1] for x in ids])
        for k, x in enumerate(ids):  # transformers' RepetitionPenaltyLogitsProcessor
            seen = torch.tensor(sorted(set(x + out)))
            zk = z[k, seen]
            z[k, seen] = torch.where(zk < 0, zk * repetition, zk / repetition)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=z.shape[-1])
        adj = -frequency * counts.float() - presence * (counts > 0).float()
        for t, b in (bias or {}).items():
            adj[t] += b
        context = ids[m.anchor] + out
        for w, b in (seq_bias or {}).items():
            if len(w) == 1 or context[len(context) - len(w) + 1:] == list(w[:-1]):
                adj[w[-1]] += b
        z[m.anchor] += adj
        w_a = m.weights[m.anchor]
        branches, weights = [*z, adj], [*m.weights, 1.0 - w_a]
        tok = int(contrastive_sample(torch.stack(branches)[:, None, :], weights, rule=m.rule,
                                     anchor=m.anchor, beta=m.beta, temperature=0.0,
                                     backend="reference")[0])
        out.append(tok)
        if tok in eos:
            break
    return out


KWS = [{"frequency": -2.0}, {"presence": -2.0}, {"frequency": 1.5, "bias": {1234: 4.0}},
       {"presence": 1.0, "frequency": 0.5, "bias": {1234: 4.0}}, {"repetition": 0.3},
       {"repetition": 4.0}, {"repetition": 0.5, "frequency": 0.5, "bias": {1234: 2.0}}]


# (1, -1) already repeats one token: negative penalties alone leave nothing to change there
@pytest.mark.parametrize("name, kw", [
    (name, kw) for name in ("acd-text", "self-cd", "acd-text-1") for kw in KWS
    if not (name == "acd-text-1" and set(kw) <= {"frequency", "presence"})])
def test_penalties_equal_the_loop_from_scratch(decoders, name, kw):
    """Negative penalties (a repetition penalty < 1) make the random model repeat itself;
    positive ones break the repetition a bias causes (or avoid the prompt's tokens). Either
    way the tokens = the loop from scratch."""
    bias, acd = kw.get("bias", {}), decoders[name]
    res = acd.generate(PROMPTS, max_new_tokens=10, presence_penalty=kw.get("presence", 0.0),
                       frequency_penalty=kw.get("frequency", 0.0), logit_bias=bias,
                       repetition_penalty=kw.get("repetition", 1.0))
    without = acd.generate(PROMPTS, max_new_tokens=10, logit_bias=bias)
    for prompt, r in zip(PROMPTS, res, strict=True):
        assert r.token_ids == _from_scratch(acd, prompt, 10, **kw), prompt
    assert [r.token_ids for r in res] != [r.token_ids for r in without]  # they did something


@pytest.mark.parametrize("name", ["acd-text", "self-cd", "acd-text-1"])
def test_sequence_bias_equals_the_loop_from_scratch(decoders, name):
    """transformers' ``sequence_bias``: a one-token sequence always biased, a two-token one
    only right after its first token (the answer's, or the prompt's last), several together
    and repeated in one step; each changes the greedy answer, which = the loop from
    scratch."""
    dec = decoders[name]
    prompt = PROMPTS[1]
    base = dec.generate(prompt, max_new_tokens=10, ignore_eos=True)[0].token_ids
    last = dec.builder.build(dec.method.branches[dec.method.anchor],
                             [{"role": "user", "content": prompt}], 0)[1][-1]
    cases = [{(base[1],): -50.0}, {(base[2], base[3]): -50.0},
             {(last, base[0]): -50.0, (base[0], 1234): 30.0},
             {(1234,): 3.0, (base[1], 99): 8.0, (99, 99): 2.5}]
    for seq_bias in cases:
        got = dec.generate(prompt, max_new_tokens=10, sequence_bias=seq_bias)[0].token_ids
        assert got == _from_scratch(dec, prompt, 10, seq_bias=seq_bias), seq_bias
        assert got != base[:len(got)], seq_bias


def test_bad_sequence_bias_is_named(acd):
    for bad in ({(): 1.0}, {(1, -2): 1.0}, {(1,): float("nan")}, {(1,): 1e5}, [[1, 2]],
                "x", {(1,): "a"}):
        with pytest.raises(ValueError, match="sequence_bias"):
            SamplingParams(sequence_bias=bad)
    with pytest.raises(ValueError, match="sequence_bias: token id 99999999"):
        acd.generate("Hi", max_new_tokens=2, sequence_bias={(1, 99999999): 1.0})
    assert SamplingParams(sequence_bias=[[[5, 6], 1.0], [[5, 6], -2.0]]).sequence_bias == \
        (((5, 6), -2.0),)  # transformers' list form; the last of a sequence given twice


def test_logit_bias_forces_and_bans_tokens(acd):
    plain = acd.generate(PROMPTS[1], max_new_tokens=8)[0].token_ids
    banned = {t: -100.0 for t in plain}
    r = acd.generate(PROMPTS[1], max_new_tokens=8, logit_bias=banned)[0]
    assert not set(r.token_ids) & set(plain)
    assert r.token_ids == _from_scratch(acd, PROMPTS[1], 8, bias=banned)
    forced = acd.generate(PROMPTS[1], max_new_tokens=4, logit_bias={1234: 100.0})[0]
    assert forced.token_ids == [1234] * 4


def test_adjusted_and_plain_requests_share_steps(acd):
    """Each request keeps its own penalties in one batch, the others untouched; the middle
    one ends first, so the last moves down a slot with its counts (compaction)."""
    kws = [{"frequency_penalty": 2.0, "max_new_tokens": 8}, {"max_new_tokens": 2},
           {"logit_bias": {1234: 4.0}, "frequency_penalty": 1.5, "max_new_tokens": 8}]
    eng = acd.engine(max_seqs=4)
    ids = [eng.add_request(p, SamplingParams(**kw)) for p, kw in zip(PROMPTS, kws, strict=True)]
    while eng.has_unfinished():
        eng.step()
    for rid, p, kw in zip(ids, PROMPTS, kws, strict=True):
        assert eng.pop_result(rid).token_ids == acd.generate(p, **kw)[0].token_ids


def test_fork_and_truncate_keep_the_counts(acd):
    """A fork continues with its parent's counts; a truncated sequence counts only the tokens
    it kept: both decode what the request alone decodes (greedy)."""
    kw = {"frequency_penalty": 1.5, "logit_bias": {1234: 4.0}}  # 1234 three times, then not
    params = SamplingParams(max_new_tokens=10, **kw)
    alone = acd.generate(PROMPTS[2], max_new_tokens=10, **kw)[0].token_ids
    assert alone[:3] == [1234] * 3 and 1234 not in alone[3:]
    parent, kid = fork_then_truncate(acd, PROMPTS[2], params, fork_at=4, keep=2, max_seqs=4)
    assert kid == alone and parent == alone


@pytest.mark.parametrize("kw, match", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"logit_bias": {5: 101.0}}, r"logit_bias\[5\]"),
    ({"logit_bias": {-3: 1.0}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "pairs"),
])
def test_bad_adjustments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_logit_bias_outside_the_vocabulary_is_named(acd):
    with pytest.raises(ValueError, match="logit_bias: token id 10000000 is outside"):
        acd.generate("Hi", max_new_tokens=2, logit_bias={10_000_000: 1.0})


def test_a_slot_reused_after_a_biased_request_is_clean(acd):
    """A plain request in the slot a biased one left, stepping beside another biased one
    (so the step adjusts every row), decodes as it does alone (found by the stateful test)."""
    eng = acd.engine(max_seqs=2)
    biased = SamplingParams(max_new_tokens=1, logit_bias={1234: 100.0})
    eng.add_request(PROMPTS[0], biased)
    eng.step()
    plain = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=3))
    other = eng.add_request(PROMPTS[1], biased)
    while eng.has_unfinished():
        eng.step()
    alone = acd.generate(PROMPTS[0], max_new_tokens=3)[0].token_ids
    assert eng.pop_result(plain).token_ids == alone
    assert eng.pop_result(other).token_ids == [1234]


def test_repetition_penalty_through_fork_and_truncate(acd):
    """Under a strong repetition penalty a fork goes on with its parent's context, and a
    sequence rolled back to 3 tokens forgets the ones it dropped (which it would take again):
    both decode what the request alone decodes."""
    kw = {"repetition_penalty": 4.0}
    alone = acd.generate(PROMPTS[1], max_new_tokens=10, **kw)[0].token_ids
    parent, kid = fork_then_truncate(acd, PROMPTS[1], SamplingParams(max_new_tokens=10, **kw),
                                     fork_at=4, keep=3)
    assert parent == alone and kid == alone


def test_choices_of_one_prompt_keep_the_repetition_context(acd):
    """``n`` choices are forked after one prefill: each truncated choice still knows its
    prompt for the repetition penalty (sampled, seeded: each = its seed alone)."""
    kw = {"repetition_penalty": 4.0, "temperature": 0.01}
    eng = acd.engine(max_seqs=3)
    ids = eng.add_choices(PROMPTS[1], SamplingParams(max_new_tokens=8, seed=7, **kw), 2)
    for _ in range(5):
        eng.step()
    for rid in ids:
        eng.truncate(rid, 2)
    while eng.has_unfinished():
        eng.step()
    for i, rid in enumerate(ids):
        alone = acd.generate(PROMPTS[1], max_new_tokens=8, seed=7 + i, **kw)[0].token_ids
        assert eng.pop_result(rid).token_ids == alone


def test_a_fork_stepping_alone_keeps_its_repetition_penalty(acd):
    """A fork moved down twice (its parent aborted, then a plain request ending below it)
    steps alone into a slot a plain request left, and still penalises."""
    kw = {"repetition_penalty": 4.0}
    alone = acd.generate(PROMPTS[1], max_new_tokens=10, **kw)[0].token_ids
    eng = acd.engine(max_seqs=3)
    eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=5))
    a = eng.add_request(PROMPTS[1], SamplingParams(max_new_tokens=10, **kw))
    for _ in range(2):
        eng.step()
    kid = eng.fork(a, 1)[0]
    eng.abort(a)
    while eng.has_unfinished():
        eng.step()
    assert eng.pop_result(kid).token_ids == alone
