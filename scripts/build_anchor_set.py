"""Build ``safedecode/data/anchor.jsonl`` (ACD's anchor set) from the hand-written part.

``scripts/data/anchor_written.jsonl`` holds what the project wrote: harmful instructions with a
refusal, safe instructions with an answer. The ``compliance`` field of each harmful item is never
written by hand: it is generated here by the embedded default model, SmolLM2-135M-Instruct,
answering the instruction under the adversarial system prompt
``safedecode.methods.prompts.ADVERSARIAL``.

1. Greedy decoding (80 new tokens) for every harmful item, in batches.
2. An answer cut at the token limit is first trimmed back to its last sentence end (a
   ``.``/``!``/``?`` not preceded by a digit, or a line break); nothing else is changed. The kept
   text is *acceptable* unless it refuses (a refusal phrase anywhere in it) or is degenerate:
   fewer than 8 words; mostly non-letters; repetitive (under 70% distinct word 3-grams, or a
   sentence of 4+ words said twice); or unfinished (ending in a colon: what is left of a list
   that was cut at the token limit).
3. Items whose greedy answer is not acceptable are retried with sampling (T=0.8, top_p=0.95,
   seed=1, then 2, ... 6); the first acceptable answer is kept.
4. An item with no acceptable answer after all 7 attempts is dropped from the shipped file (it
   stays in the written source); the summary and ``safedecode/data/README.md`` list it.

``compliance_source`` records how each answer was made. The output is deterministic (greedy, and
sampling with explicit per-request seeds). Run from the repository root (a few CPU minutes)::

    .venv/bin/python scripts/build_anchor_set.py
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WRITTEN = REPO / "scripts" / "data" / "anchor_written.jsonl"
OUTPUT = REPO / "safedecode" / "data" / "anchor.jsonl"

MAX_NEW_TOKENS = 80
TEMPERATURE, TOP_P = 0.8, 0.95
SEEDS = range(1, 7)
MODEL_LABEL = "SmolLM2-135M-Instruct"
FIELD_ORDER = ("id", "split", "category", "part", "prompt", "refusal", "compliance",
               "compliance_source", "answer")

REFUSAL_PHRASES = (
    "i can't", "i cannot", "i can not", "i won't", "i will not", "i'm sorry", "i am sorry",
    "i apologize", "i apologise", "i'm unable", "i am unable", "not able to", "as an ai",
    "i must decline", "i refuse", "i'm not going to", "i am not going to", "can't help",
    "cannot help", "can't assist", "cannot assist", "can't provide", "cannot provide",
    "i don't condone", "i do not condone", "not appropriate", "against my", "i'm not comfortable",
    "i am not comfortable", "i'd rather not", "i would rather not", "i'm not allowed",
    "i am not allowed", "instead, i", "i'm here to help with safe", "not something i",
)

_SENTENCE_END = re.compile(r"(?<!\d)[.!?][\"')\]]*(?=\s|$)|\n")


def refuses(text: str) -> bool:
    low = text.lower().replace("\u2019", "'")
    return any(p in low for p in REFUSAL_PHRASES)


def degenerate(text: str) -> str | None:
    """Why ``text`` is unusable as a compliant answer, or None."""
    words = re.findall(r"\w+", text.lower())
    if len(words) < 8:
        return "too short"
    letters = sum(c.isalpha() for c in text)
    if letters < 0.5 * len(text.replace(" ", "")):
        return "mostly non-letters"
    tri = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    if len(set(tri)) < 0.7 * len(tri):
        return "repetitive"
    sentences = Counter(" ".join(re.findall(r"\w+", s.lower()))
                        for s in re.split(r"[.!?\n]+", text))
    if any(n >= 2 and len(s.split()) >= 4 for s, n in sentences.items()):
        return "repetitive"
    if text.rstrip().endswith(":"):
        return "unfinished (only an introduction)"
    return None


def trim(text: str, finish_reason: str) -> tuple[str, str]:
    """(kept text, note): strip whitespace; if cut at the token limit, keep whole sentences."""
    text = text.strip()
    if finish_reason != "length":
        return text, ""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if not ends:
        return text, f"; cut at {MAX_NEW_TOKENS} tokens (no sentence end to trim to)"
    note = f"; cut at {MAX_NEW_TOKENS} tokens, trimmed to last sentence end"
    return text[:ends[-1]].rstrip(), note


def judge(text: str, finish_reason: str) -> tuple[str, str, str | None]:
    """(kept text, trimming note, rejection reason or None)."""
    kept, note = trim(text, finish_reason)
    if refuses(kept):
        return kept, note, "refusal"
    return kept, note, degenerate(kept)


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def generate(dec, prompts: list[str], batch_size: int, **sampling) -> list:
    out = []
    for i in range(0, len(prompts), batch_size):
        out += dec.generate(prompts[i:i + batch_size], max_new_tokens=MAX_NEW_TOKENS, **sampling)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--written", type=Path, default=WRITTEN)
    ap.add_argument("--out", type=Path, default=OUTPUT)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--log", type=Path, default=None,
                    help="also write every attempt (kept text, verdict) here as JSONL, for review")
    args = ap.parse_args(argv)

    from safedecode.engine import SafeDecoder
    from safedecode.engine.branches import plain
    from safedecode.methods.prompts import ADVERSARIAL
    from safedecode.models import load_default

    items = read_jsonl(args.written)
    harmful = [x for x in items if x["split"] == "harmful"]
    t0 = time.perf_counter()
    model, tok = load_default()
    dec = SafeDecoder(model, tok, plain(system=ADVERSARIAL))
    print(f"model loaded in {time.perf_counter() - t0:.1f} s; {len(harmful)} harmful items")

    chosen: dict[str, tuple[str, str]] = {}  # id -> (compliance, compliance_source)
    rejected: dict[str, list[str]] = {x["id"]: [] for x in harmful}
    attempts = [("greedy", {"temperature": 0.0})]
    attempts += [(f"sampled T={TEMPERATURE} top_p={TOP_P} seed={s}",
                  {"temperature": TEMPERATURE, "top_p": TOP_P, "seed": s}) for s in SEEDS]
    how = Counter()
    log = []
    for label, sampling in attempts:
        todo = [x for x in harmful if x["id"] not in chosen]
        if not todo:
            break
        t1 = time.perf_counter()
        results = generate(dec, [x["prompt"] for x in todo], args.batch_size, **sampling)
        for x, r in zip(todo, results, strict=True):
            kept, note, why = judge(r.text, r.finish_reason)
            log.append({"id": x["id"], "attempt": label, "finish_reason": r.finish_reason,
                        "raw": r.text, "kept": kept, "rejected": why})
            if why is None:
                chosen[x["id"]] = (kept, f"{MODEL_LABEL} {label}, ADVERSARIAL prompt{note}")
                how["greedy" if label == "greedy" else "sampled"] += 1
            else:
                rejected[x["id"]].append(f"{label}: {why}")
        print(f"{label}: {len(todo)} items, {sum(x['id'] in chosen for x in todo)} accepted "
              f"({time.perf_counter() - t1:.1f} s)")

    out_items, dropped = [], []
    for src in items:
        x = dict(src)
        if x["split"] == "harmful":
            if x["id"] not in chosen:
                dropped.append(x["id"])
                continue
            x["compliance"], x["compliance_source"] = chosen[x["id"]]
        out_items.append({k: x[k] for k in FIELD_ORDER if k in x})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for x in out_items:
            f.write(json.dumps(x, ensure_ascii=False) + "\n")

    if args.log:
        with args.log.open("w", encoding="utf-8") as f:
            for entry in log:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    seeds = Counter(src.split("seed=")[1].split(",")[0] for _, src in chosen.values()
                    if "seed=" in src)
    trimmed = sum("trimmed" in src for _, src in chosen.values())
    uncut = sum("no sentence end" in src for _, src in chosen.values())
    print("\nsummary")
    by_seed = ", ".join(f"seed {k}: {seeds[k]}" for k in sorted(seeds, key=int))
    print(f"  harmful items: {len(harmful)}; accepted: {len(chosen)} (greedy {how['greedy']}, "
          f"sampled {len(chosen) - how['greedy']}{' - ' + by_seed if by_seed else ''})")
    print(f"  trimmed at a sentence end: {trimmed}; cut with no sentence end: {uncut}")
    reasons = Counter(r.split(": ")[1] for rs in rejected.values() for r in rs)
    print(f"  rejected attempts by reason: {dict(reasons)}")
    print(f"  dropped (no acceptable answer in {len(attempts)} attempts): {dropped or 'none'}")
    print(f"  wrote {len(out_items)} items to {args.out} "
          f"({len(out_items) - len(chosen)} safe, {len(chosen)} harmful) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
