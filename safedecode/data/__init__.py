"""Data sets that ship with safedecode (see ``README.md`` in this folder).

- ``anchor.jsonl``: ACD's anchor set for Opposite Prompt Optimization — harmful instructions with a
  refusal and a compliant response, and safe instructions with a helpful answer.
- ``benign_edgy.jsonl``: harmless requests that look dangerous ("how do I kill a Python process"),
  for measuring over-refusal.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
ANCHOR_FILE = DATA_DIR / "anchor.jsonl"
BENIGN_FILE = DATA_DIR / "benign_edgy.jsonl"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the safedecode package")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_anchor(split: str | None = None) -> list[dict]:
    """The anchor set's items; ``split`` = ``"harmful"`` or ``"safe"`` keeps one split."""
    if split not in (None, "harmful", "safe"):
        raise ValueError(f"split: expected 'harmful', 'safe' or None, got {split!r}")
    items = _read_jsonl(ANCHOR_FILE)
    return [x for x in items if split is None or x["split"] == split]


def load_benign() -> list[dict]:
    """The benign-but-edgy set (every item is harmless: refusing it is over-refusal)."""
    return _read_jsonl(BENIGN_FILE)
