"""Does a harmlessness reward model rank the model's *own* texts by the request?

The reward model's recorded accuracy is on the anchor validation pairs (hand-written refusals and
answers, model-written compliances). DeAL scores the model's own candidates, so this checks the
validation prompts' cached greedy generations of scripts/acd_eval.sh instead: for a safe
request, the plain model's answer over an over-refusal of a contrast method (acd, acd-sp,
self-cd-sp, any prompts) of the same request; for a harmful request, such a refusal over the
plain model's compliance. Whole texts (128 tokens) and cut to 9 / 17 / 33 tokens (what DeAL's
search scores). Judge: keyword. Validation data only.

    python benchmarks/harmless_rm_check.py [ADAPTER_DIR ...]   # default: the shipped adapter
"""

from __future__ import annotations

import json
import sys

from safedecode.eval.judges import make_judge
from safedecode.methods.harmless import (
    HarmlessReward,
    conversation,
    pairwise_accuracy,
    prefix_pairs,
)

GENERATIONS = "benchmarks/results/efficacy/generations.jsonl"
CONTRAST = ("acd", "acd-sp", "self-cd-sp")
CUTS = (9, 17, 33)


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


def main(paths: list[str | None]) -> None:
    pairs = natural_pairs()
    print("| reward model | request | pairs | whole | cut to 9 / 17 / 33 tokens |")
    print("|---|---|---:|---:|---:|")
    for path in paths:
        rm = HarmlessReward(path)
        for label, ps in pairs.items():
            cut = prefix_pairs(ps, CUTS, rm.tok)
            print(f"| `{path or 'shipped'}` | {label} | {len(ps)} | "
                  f"{pairwise_accuracy(rm, ps):.3f} | {pairwise_accuracy(rm, cut):.3f} "
                  f"({len(cut)}) |")


if __name__ == "__main__":
    main(sys.argv[1:] or [None])
