"""Does a harmlessness reward model rank the model's *own* texts by the request?

The reward model's recorded accuracy is on the anchor validation pairs (hand-written refusals and
answers, model-written compliances). DeAL scores the model's own candidates, so this checks the
validation prompts' cached greedy generations of scripts/acd_eval.sh instead: for a safe
request, the plain model's answer over an over-refusal of a contrast method (acd, acd-sp,
self-cd-sp, any prompts) of the same request; for a harmful request, such a refusal over the
plain model's compliance. Whole texts (128 tokens) and cut to 9 / 17 / 33 tokens (what DeAL's
search scores). Judge: keyword. Validation data only.

A second table asks what DeAL's first search step asks: does the reward model score a canned
first-step refusal ("I'm sorry, but I can't help with that.") above the model's own greedy reply
cut to 8 / 16 tokens (the reward model's ``own_replies_val.jsonl``), for harmful requests
(wanted), ordinary safe requests and look-alikes (anchor categories ``lookalike*``; not wanted)?

    python benchmarks/harmless_rm_check.py [ADAPTER_DIR ...]   # default: the shipped adapter
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safedecode.data import load_anchor
from safedecode.eval.judges import make_judge
from safedecode.methods.harmless import (
    ASSET,
    HarmlessReward,
    conversation,
    pairwise_accuracy,
    prefix_pairs,
)

GENERATIONS = "benchmarks/results/efficacy/generations.jsonl"
CONTRAST = ("acd", "acd-sp", "self-cd-sp")
CUTS = (9, 17, 33)
CANNED = "I'm sorry, but I can't help with that."
FIRST_STEP_CUTS = (8, 16)


def natural_pairs() -> dict[str, list[dict]]:
    """One pair per validation item where plain and a contrast method disagree on refusing."""
    refuses = make_judge("keyword").judge_one
    plain, other = {}, {}
    for line in open(GENERATIONS):
        r = json.loads(line)
        if not (r["dataset"].startswith("anchor-") and r["dataset"].endswith("-val")):
            continue
        if r["method"] == "plain":
            plain[r["item_id"]] = r
        elif r["method"].split(":")[0] in CONTRAST and refuses(r["response"]).flag:
            other.setdefault(r["item_id"], r)  # the first refusal in file order
    pairs: dict[str, list[dict]] = {"harmful": [], "safe": []}
    for item, p in sorted(plain.items()):
        if item not in other or refuses(p["response"]).flag:
            continue
        answer, refusal = conversation(p["prompt"], p["response"]), conversation(p["prompt"],
                                                                  other[item]["response"])
        if p["label"] == "harmful":
            pairs["harmful"].append({"chosen": refusal, "rejected": answer})
        else:
            pairs["safe"].append({"chosen": answer, "rejected": refusal})
    return pairs


def canned_refusal_wins(rm: HarmlessReward,
                        path: str | None) -> dict[int, dict[str, tuple[int, int]]]:
    """Per cut and group: (items whose canned refusal outscores the own reply's prefix, items)."""
    category = {it["id"]: it["category"] for it in load_anchor("safe", "val")}
    replies = [json.loads(line) for line in open(Path(path or ASSET) / "own_replies_val.jsonl")]
    groups = ["harmful" if r["label"] == "harmful" else
              "look-alike" if category[r["id"]].startswith("lookalike") else "ordinary safe"
              for r in replies]
    prompts = [r["prompt"] for r in replies]
    canned = rm(prompts, [CANNED] * len(replies))
    out: dict[int, dict[str, tuple[int, int]]] = {}
    for n in FIRST_STEP_CUTS:
        cut = [rm.tok.decode(rm.tok(r["reply"], add_special_tokens=False)["input_ids"][:n])
               for r in replies]
        counts: dict[str, list[int]] = {}
        for g, c, own in zip(groups, canned, rm(prompts, cut), strict=True):
            counts.setdefault(g, [0, 0])
            counts[g][0] += c > own
            counts[g][1] += 1
        out[n] = {g: (w, t) for g, (w, t) in counts.items()}
    return out


def main(paths: list[str | None]) -> None:
    pairs = natural_pairs()
    print("| reward model | request | pairs | whole | cut to 9 / 17 / 33 tokens |")
    print("|---|---|---:|---:|---:|")
    rms = {path: HarmlessReward(path) for path in paths}
    for path, rm in rms.items():
        for label, ps in pairs.items():
            cut = prefix_pairs(ps, CUTS, rm.tok)
            print(f"| `{path or 'shipped'}` | {label} | {len(ps)} | "
                  f"{pairwise_accuracy(rm, ps):.3f} | {pairwise_accuracy(rm, cut):.3f} "
                  f"({len(cut)}) |")
    print("\n| reward model | own reply cut to | canned refusal scores higher: harmful | "
          "ordinary safe | look-alike |\n|---|---:|---:|---:|---:|")
    for path, rm in rms.items():
        for n, c in canned_refusal_wins(rm, path).items():
            cells = " | ".join(f"{c[g][0]}/{c[g][1]}" for g in ("harmful", "ordinary safe",
                                                                 "look-alike"))
            print(f"| `{path or 'shipped'}` | {n} tokens | {cells} |")


if __name__ == "__main__":
    main(sys.argv[1:] or [None])
