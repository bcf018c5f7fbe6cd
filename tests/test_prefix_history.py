"""A conversation's earlier turns shared as a prefix (``PromptBuilder``): from the second request
with the same history on, its KV is computed once and reused; the answers equal those without
any prefix cache, for text, soft-prompt and windowed branches, whole or in chunks; a history seen
once, or a branch whose hook acts on the prompt, is left as it was."""

from __future__ import annotations

import threading

import pytest
from engine_fixtures import method_named, tiny_arch, tiny_llama

from safedecode import methods
from safedecode.engine import Branch, BranchHook, SafeDecoder, SamplingParams, contrastive
from safedecode.engine.cache import TURN_STORE_BYTES
from safedecode.methods.deal import DeAL

HISTORY = [{"role": "user", "content": "What is two plus two? Answer with a number."},
           {"role": "assistant", "content": "Four."},
           {"role": "user", "content": "And three plus three, written as a word?"},
           {"role": "assistant", "content": "Six."}]
QUESTIONS = ["And four plus four?", "Name a colour.", "Why is the sky blue?"]


def _other(i: int) -> list:
    """A history no other request has (``i`` makes it new)."""
    return [{"role": "user", "content": f"Hi number {i}"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"}]


def _prompts(system: str | None = None, i: int = 0) -> list:
    head = [{"role": "system", "content": system}] if system else []
    return [head + HISTORY + [{"role": "user", "content": q}] for q in QUESTIONS] + [
        head + _other(i)]


@pytest.mark.parametrize("name, arch, system", [
    ("plain", None, None), ("acd-text", None, "You answer briefly."), ("soft", None, None),
    ("acd-text", "mistral-window", None)])
@pytest.mark.parametrize("budget", [None, 16])
def test_shared_histories_give_the_answers_of_no_prefix_cache(name, arch, system, budget):
    """Two calls of the same prompts (three sharing a history, one alone), whole prompts or
    chunked prefill: tokens and log-probs = the decoder without any prefix cache; the shared
    history's KV is stored once per branch, the lone one's never."""
    model, tok = tiny_arch(arch) if arch else tiny_llama()
    m = method_named(name, model, tok)
    dec = SafeDecoder(model, tok, m)
    before = None
    for call in range(2):
        prompts = _prompts(system, call)
        ref = SafeDecoder(model, tok, m, prefix_cache=False).generate(
            prompts, max_new_tokens=6, return_logprobs=True)
        eng = dec.engine(max_seqs=4, max_prefill_tokens=budget)
        ids = [eng.add_request(p, SamplingParams(max_new_tokens=6, logprobs=True))
               for p in prompts]
        while eng.has_unfinished():
            eng.step()
        got = [eng.pop_result(i) for i in ids]
        for g, r in zip(got, ref, strict=True):
            assert g.token_ids == r.token_ids
            assert g.logprobs == pytest.approx(r.logprobs, abs=1e-4)
        before = before if before is not None else len(dec.prefixes)
    # the history: one entry per branch with a prefix, added at its second sighting
    assert len(dec.prefixes) == before
    built = dec.builder.build(m.branches[0], prompts[0], 0)
    alone = SafeDecoder(model, tok, m).builder.build(m.branches[0], prompts[0], 0)
    assert len(built[0]) > len(alone[0]) and len(built[1]) < len(alone[1])
    other = dec.builder.build(m.branches[0], _prompts(system, 99)[-1], 0)  # seen once
    assert len(other[0]) == len(alone[0])


def test_the_history_joins_the_prefix_at_its_second_sighting():
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("acd-text"))
    br = dec.method.branches[0]
    first = dec.builder.build(br, _prompts()[0], 0)
    second = dec.builder.build(br, _prompts()[1], 1)
    assert len(second[0]) > len(first[0])
    # the prefix + suffix ids are the prompt's ids either way
    whole = first[0].ids + first[1]
    again = dec.builder.build(br, _prompts()[0], 0)
    assert again[0].ids + again[1] == whole and len(again[1]) < len(first[1])


def test_one_calls_requests_that_share_a_history_all_share_it():
    """``generate`` tells the builder what its prompts share: the first request with a
    history the others have shares it too; a history only one prompt has is not shared."""
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("acd-text"))
    fresh = SafeDecoder(model, tok, methods.get("acd-text")).builder
    dec.builder.expect(dec.method.branches, _prompts())
    for br in dec.method.branches:
        first = dec.builder.build(br, _prompts()[0], 0)
        assert len(first[0]) > len(fresh.build(br, _prompts()[0], 0)[0])
        lone = dec.builder.build(br, _prompts()[-1], 3)
        assert len(lone[0]) == len(fresh.build(br, _prompts()[-1], 3)[0])
    calls = SafeDecoder(model, tok, methods.get("acd-text"))
    got = calls.generate(_prompts(), max_new_tokens=4)
    assert len(calls.prefixes) == 2 * 1 + 2  # the branches' system prefixes and the history
    ref = SafeDecoder(model, tok, methods.get("acd-text"), prefix_cache=False)
    assert [g.token_ids for g in got] == [r.token_ids for r in ref.generate(
        _prompts(), max_new_tokens=4)]


def test_a_branch_hooked_on_the_prompt_keeps_its_history_in_the_suffix():
    """A hook on the request's prompt positions acts on the history too: it is never moved
    into the (unhooked) prefix, and the answers equal the decoder without a prefix cache."""
    model, tok = tiny_llama()
    hook = BranchHook("model.layers.0", lambda h: h * 1.5, positions="prompt")
    m = contrastive([Branch(system="Be safe.", hooks=(hook,)), Branch()], [1.5, -0.5])
    dec = SafeDecoder(model, tok, m)
    prompts = _prompts()
    for _ in range(2):
        got = dec.generate(prompts, max_new_tokens=5)
    ref = SafeDecoder(model, tok, m, prefix_cache=False).generate(prompts, max_new_tokens=5)
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    hooked = dec.builder.build(m.branches[0], prompts[0], 0)
    assert len(hooked[0]) == len(SafeDecoder(model, tok, m).builder.build(
        m.branches[0], prompts[0], 0)[0])
    assert len(dec.builder.build(m.branches[1], prompts[0], 0)[1]) < len(hooked[1])
    # finished turns kept for the unhooked branch only (its answer's KV had no hook on it)
    assert len(dec.turns) == len(prompts)


def test_share_history_off():
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("plain"))
    dec.builder.share_history = False
    for _ in range(2):
        built = dec.builder.build(dec.method.branches[0], _prompts()[0], 0)
    assert len(built[0]) == len(SafeDecoder(model, tok, methods.get("plain")).builder.build(
        dec.method.branches[0], _prompts()[0], 0)[0])


def _grow(chats: list, answers: list, turn: int) -> None:
    """Each chat's next request: its answer, then a new user turn."""
    for chat, text in zip(chats, answers, strict=True):
        chat += [{"role": "assistant", "content": text},
                 {"role": "user", "content": f"Tell me more, part {turn}."}]


@pytest.mark.parametrize("name, arch, system", [
    ("plain", None, None), ("acd-text", None, "You answer briefly."), ("soft", None, None),
    ("acd-text", "qwen2-mixed", None)])  # a full layer beside a windowed one: both see the base
@pytest.mark.parametrize("keep", [True, False], ids=["turns-kept", "histories-only"])
def test_a_growing_chat_computes_only_its_new_turns(name, arch, system, keep):
    """Three chats, four turns, each turn's request its chat so far + the answer + a new
    question: tokens and log-probs = the decoder without a prefix cache, and from the second
    turn on each history's KV extends the turn before's kept prompt + answer — the model
    computes only a few columns of each history — or, with no turns kept, the turn before's
    history: exactly the new messages' columns. The chats' together in one forward per
    branch."""
    model, tok = tiny_arch(arch) if arch else tiny_llama()
    m = method_named(name, model, tok)
    dec = SafeDecoder(model, tok, m, turn_store_bytes=TURN_STORE_BYTES if keep else 0)
    ref = SafeDecoder(model, tok, m, prefix_cache=False)
    head = [{"role": "system", "content": system}] if system else []
    chats = [head + [{"role": "user", "content": f"Question {i}: what do cats eat?"}]
             for i in range(3)]
    last = None  # per chat and branch: the prefix's length the turn before
    for turn in range(4):
        before, forwards = dec.prefixes.computed_tokens, dec.prefixes.forwards
        got = dec.generate(chats, max_new_tokens=6, return_logprobs=True)
        exp = ref.generate(chats, max_new_tokens=6, return_logprobs=True)
        for g, r in zip(got, exp, strict=True):
            assert g.token_ids == r.token_ids
            assert g.logprobs == pytest.approx(r.logprobs, abs=1e-4)
        lens = [len(dec.builder.build(br, c, 0)[0]) for c in chats for br in m.branches]
        if last is not None:  # the history shared at once, only its new columns computed:
            assert all(n > p for n, p in zip(lens, last, strict=True)), turn
            # fewer than the new messages' (the turn before's prompt + answer KV was kept:
            # its last token, the end of the turn, and what its text tokenises differently)
            computed = dec.prefixes.computed_tokens - before
            if keep:
                assert 0 < computed <= (sum(lens) - sum(last)) / 2, (turn, computed)
                assert len(dec.turns) == 3 * (turn + 1) * len(m.branches)
            else:
                assert computed == sum(lens) - sum(last), turn
                assert len(dec.turns) == 0
            # the three chats' new prefixes under every branch: one forward (rows padded)
            assert dec.prefixes.forwards - forwards == 1, turn
        last = lens
        _grow(chats, [g.text for g in got], turn)


def test_a_chat_that_changes_an_earlier_turn_is_not_a_growing_one():
    """Only a request that continues one seen before (its messages + answer + a user turn)
    shares its history at once; one whose earlier turns differ waits for a second sighting."""
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("plain"))
    br = dec.method.branches[0]
    first = [{"role": "user", "content": "What do cats eat?"}]
    alone = dec.builder.build(br, first, 0)
    grown = first + [{"role": "assistant", "content": "Fish."},
                     {"role": "user", "content": "And dogs?"}]
    assert len(dec.builder.build(br, grown, 0)[0]) > len(alone[0])
    edited = [{"role": "user", "content": "What do cows eat?"}] + grown[1:]
    assert len(dec.builder.build(br, edited, 0)[0]) == len(alone[0])


def test_a_chats_extended_history_is_dropped_first():
    """A store with room for about one turn and a half of three chats' histories under two
    branches: each turn's histories still extend the turn before's, because the histories a
    turn extended are dropped first (not the other branch's, still to be extended)."""
    model, tok = tiny_llama()
    m = methods.get("acd-text")
    dec = SafeDecoder(model, tok, m, turn_store_bytes=0)  # histories extend histories
    chats = [[{"role": "user", "content": f"Question {i}: what do cats eat?"}] for i in range(3)]
    last = None
    for turn in range(4):
        if turn == 2:
            dec.prefixes.max_bytes = int(dec.prefixes.nbytes * 1.5)
        before = dec.prefixes.computed_tokens
        got = dec.generate(chats, max_new_tokens=6)
        lens = sum(len(dec.builder.build(br, c, 0)[0]) for c in chats for br in m.branches)
        if last is not None:
            assert dec.prefixes.computed_tokens - before == lens - last, turn
        last = lens
        _grow(chats, [g.text for g in got], turn)
    assert dec.prefixes.evicted > 0 and dec.prefixes.nbytes <= dec.prefixes.max_bytes


def test_a_history_whose_kept_turn_was_dropped_extends_the_earlier_history():
    """A turn store that keeps one finished request: the other chats' histories extend their
    earlier history instead (never computed whole again), with the same answers."""
    model, tok = tiny_llama()
    m = methods.get("acd-text")
    dec = SafeDecoder(model, tok, m, turn_store_bytes=1)  # the newest entry only
    ref = SafeDecoder(model, tok, m, prefix_cache=False)
    chats = [[{"role": "user", "content": f"Question {i}: what do cats eat?"}] for i in range(3)]
    last = None
    for turn in range(4):
        before = dec.prefixes.computed_tokens
        got = dec.generate(chats, max_new_tokens=6)
        assert [g.token_ids for g in got] == [
            r.token_ids for r in ref.generate(chats, max_new_tokens=6)]
        lens = sum(len(dec.builder.build(br, c, 0)[0]) for c in chats for br in m.branches)
        if turn >= 2:  # from the third turn, an earlier history to fall back on
            assert 0 < dec.prefixes.computed_tokens - before < lens - last, turn
        last = lens
        _grow(chats, [g.text for g in got], turn)
    assert len(dec.turns) == 1


def _vowels(prompts, texts):
    """A reward that is a known function of the text (its share of vowels)."""
    return [sum(c in "aeiou" for c in t) / max(1, len(t)) for t in texts]


@pytest.mark.parametrize("spec", [
    dict(name="route", base="acd-text", horizon=2, margin=0.0),
    dict(name="route", base="acd-text", horizon=2, margin=-1.0),  # the base always kept
    dict(name="deal", base="acd-text", k=2, lookahead=2, lam=5.0),
    dict(name="deal", base="acd-text", k=2, lookahead=1, beam=2, chunk=2, horizon=4, lam=5.0)])
def test_a_growing_chat_under_a_search_keeps_its_chosen_answer(spec):
    """A search's answer (route's winner, DeAL's chosen candidate: a fork) is kept for the
    chat's next turn like a plain request's: the answers = no prefix cache, and each turn
    computes fewer history columns than the new messages' (route's plain winner kept for the
    branch its rows ran: the fallback)."""
    model, tok = tiny_llama()
    spec = dict(spec)
    m = methods.get(spec.pop("name"), reward=_vowels, **spec)
    dec = SafeDecoder(model, tok, m)
    ref = SafeDecoder(model, tok, m, prefix_cache=False)
    branches = dec.method.branches
    chats = [[{"role": "user", "content": f"Question {i}: what do cats eat?"}] for i in range(3)]
    last = None
    for turn in range(3):
        before = dec.prefixes.computed_tokens
        got = dec.generate(chats, max_new_tokens=6, return_logprobs=True)
        exp = ref.generate(chats, max_new_tokens=6, return_logprobs=True)
        for g, r in zip(got, exp, strict=True):
            assert g.token_ids == r.token_ids
        lens = [len(dec.builder.build(br, c, 0)[0]) for c in chats for br in branches]
        if last is not None:
            computed = dec.prefixes.computed_tokens - before
            assert 0 < computed < sum(lens) - sum(last), (turn, computed)
        if isinstance(m, DeAL):  # every chat's answer kept under every branch, each turn
            assert len(dec.turns) == 3 * (turn + 1) * len(branches), turn
        last = lens
        _grow(chats, [g.text for g in got], turn)


def test_a_fork_that_outlives_its_parent_keeps_the_turn():
    """``fork`` then releasing the parent (a search keeping a child): the child's answer is
    kept for the chat's next turn in the parent's place."""
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("acd-text"))
    eng = dec.engine(max_seqs=2)
    chat = [{"role": "user", "content": "Question 1: what do cats eat?"}]
    root = eng.add_request(chat, SamplingParams(max_new_tokens=5, temperature=0))
    eng.step()
    child = eng.fork(root, 1)[0]
    eng.release(root)
    while eng.has_unfinished():
        eng.step()
    assert len(eng.pop_result(child).token_ids) == 5
    assert len(dec.turns) == len(dec.method.branches)


def _kept_answers(dec, chat, branch) -> list[list[int]]:
    """The token ids of the sequences kept for ``chat``'s next turn under ``branch``."""
    pre, suf = dec.builder.build(branch, chat, 0)
    return [[*done.ids, *done.tail_ids]
            for done in dec.builder.finished_sequences(dec.builder.turn_of(pre, suf))]


@pytest.mark.parametrize("spec", [
    dict(name="deal", base="acd-text", k=3, lookahead=4, lam=5.0),
    dict(name="deal", base="acd-text", k=2, lookahead=3, beam=2, chunk=2, lam=5.0),
    dict(name="route", base="acd-text", horizon=32, margin=0.0),
    dict(name="route", base="acd-text", horizon=32, margin=-1.0)])
def test_a_search_keeps_its_chosen_answer_when_candidates_end_before_the_choice(spec):
    """Candidates (DeAL's rollouts, route's two answers) that all end before the search chooses
    — each of the first kept while its siblings ran: the chat's next turn extends the chosen
    answer, the only one kept, under every branch that kept one, and no loser's KV stays in
    the turn store."""
    model, tok = tiny_llama()
    spec = dict(spec)
    m = methods.get(spec.pop("name"), reward=_vowels, **spec)
    dec = SafeDecoder(model, tok, m)
    chats = [[{"role": "user", "content": f"Question {i}: what do cats eat?"}] for i in range(4)]
    got = dec.generate(chats, max_new_tokens=12)
    kept = 0
    for chat, g in zip(chats, got, strict=True):
        answer = g.token_ids[:-1]
        for br in dec.method.branches:
            answers = _kept_answers(dec, chat, br)
            assert len(answers) <= 1, (chat, br.name)
            kept += len(answers)
            assert all(ids[-len(answer):] == answer for ids in answers), (chat, br.name)
    assert kept >= len(chats)  # every chat kept (route's plain winner: its fallback row)
    assert len(dec.turns) == kept  # nothing else: the losers' KV was dropped


def test_discard_turn_forgets_one_of_a_familys_kept_answers():
    """A fork family's answers that end are each kept for the chat's next turn;
    ``discard_turn`` drops one (its KV leaves the turn store), then the other; a sequence that
    kept nothing, or was discarded, is a no-op."""
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("plain"))
    eng = dec.engine(max_seqs=2)
    chat = [{"role": "user", "content": "Question 1: what do cats eat?"}]
    root = eng.add_request(chat, SamplingParams(max_new_tokens=6, temperature=1.0, seed=0))
    eng.step()
    child = eng.fork(root, 1)[0]  # draws with a seed of its own: another answer
    while eng.has_unfinished():
        eng.step()
    first = eng.pop_result(root).token_ids[:-1]
    second = eng.pop_result(child).token_ids[:-1]
    assert first != second
    (br,) = dec.method.branches
    assert len(dec.turns) == 2
    assert sorted(ids[-5:] for ids in _kept_answers(dec, chat, br)) == sorted([first, second])
    eng.discard_turn(root)
    assert len(dec.turns) == 1
    assert [ids[-5:] for ids in _kept_answers(dec, chat, br)] == [second]
    eng.discard_turn(root)  # again: a no-op
    eng.discard_turn(child)
    assert len(dec.turns) == 0 and _kept_answers(dec, chat, br) == []


def test_a_chat_goes_on_from_whichever_of_its_choices_it_continues():
    """``n`` choices of a chat request are each kept: the next turn, continuing any one of
    them, computes fewer columns than its new messages (the choice's answer is shared)."""
    model, tok = tiny_llama()
    chat = [{"role": "user", "content": "Question 1: what do cats eat?"}]
    for pick in range(3):
        dec = SafeDecoder(model, tok, methods.get("plain"))
        (br,) = dec.method.branches
        eng = dec.engine(max_seqs=3)
        ids = eng.add_choices(chat, SamplingParams(max_new_tokens=8, temperature=1.0, seed=1), 3)
        while eng.has_unfinished():
            eng.step()
        got = [eng.pop_result(i) for i in ids]
        assert len({tuple(g.token_ids) for g in got}) == 3
        grown = [*chat, {"role": "assistant", "content": got[pick].text},
                 {"role": "user", "content": "Tell me more."}]
        new = sum(map(len, dec.builder.build(br, grown, 0))) - \
            sum(map(len, dec.builder.build(br, chat, 0)))
        before = dec.prefixes.computed_tokens
        dec.generate([grown], max_new_tokens=2)
        assert 0 < dec.prefixes.computed_tokens - before < new - 4, pick


@pytest.mark.parametrize("name", ["route", "deal"])
def test_an_aborted_search_keeps_no_answer_for_the_chats_next_turn(name):
    """A search aborted after its candidates ended, while the reward that would choose is in
    flight: what the ended candidates kept for the chat's next turn is dropped (no one got
    that answer)."""
    from concurrent.futures import ThreadPoolExecutor

    from safedecode.methods.deal import Searcher
    from safedecode.methods.rewards import make_reward
    from safedecode.methods.route import Router

    gate = threading.Event()

    def slow(prompts, texts):
        assert gate.wait(10), "the test never let the reward go"
        return _vowels(prompts, texts)

    model, tok = tiny_llama()
    if name == "route":
        spec = methods.Route(methods.get("acd-text"), make_reward(slow), horizon=3, margin=0.0)
    else:
        spec = methods.get("deal", base="acd-text", reward=make_reward(slow), k=2,
                           lookahead=4, lam=5.0)
    dec = SafeDecoder(model, tok, spec)
    eng = dec.engine(max_seqs=8)
    question = "Question 1: what do cats eat?"
    chat = [{"role": "user", "content": question}]
    try:
        with ThreadPoolExecutor(1) as pool:
            search = (Router if name == "route" else Searcher)(eng, spec, scorer=pool)
            rid = search.add(eng.build(chat), question, SamplingParams(max_new_tokens=3))[0]
            for _ in range(10):  # held: nothing chosen yet
                if search.scoring():
                    break
                out = search.feed(eng.step()) if name == "route" else search.step()
                assert out == []
            assert not eng.has_unfinished()
            assert search.scoring() == 1  # every candidate ended; the reward not back
            assert len(dec.turns) > 0  # the premise: the ended candidates kept their turn
            search.abort(rid)
            assert len(dec.turns) == 0
    finally:
        gate.set()
