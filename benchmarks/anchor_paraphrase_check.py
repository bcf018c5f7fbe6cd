"""Sensitivity of the benign evaluation to anchor items that paraphrase an evaluation prompt.

The overlap test (tests/test_data.py) catches shared word n-grams, not paraphrases. This flags
every benign evaluation prompt whose content words overlap an anchor safe prompt's by a Jaccard
of at least TH (default 0.3), then recomputes each method's benign refusal (keyword judge) on
the evaluation sets without them, from the cached greedy generations of scripts/acd_eval.sh:

    python benchmarks/anchor_paraphrase_check.py [TH]
"""

from __future__ import annotations

import json
import sys

from safedecode import methods
from safedecode.data import (
    load_anchor,
    load_benign,
    load_lookalike,
    load_ordinary,
    paraphrase_pairs,
)
from safedecode.eval.runner import method_fingerprint
from safedecode.judges import make_judge

GENERATIONS = "benchmarks/results/efficacy/generations.jsonl"
OLD = "benchmarks/results/acd_sweep/self-cd-sp_session7.safetensors"
def main(th: float = 0.3) -> None:
    sets = {"benign": load_benign(), "benign-lookalike": load_lookalike(),
            "benign-ordinary": load_ordinary()}
    evaluation = [e for items in sets.values() for e in items]
    ids = {oid for _, oid, _ in paraphrase_pairs(load_anchor(), evaluation, th)}
    flagged = {e["prompt"] for e in evaluation if e["id"] in ids}
    print(f"evaluation prompts with an anchor paraphrase (content-word Jaccard >= {th}): "
          f"{len(flagged)}")
    judge = make_judge("keyword")
    with open(GENERATIONS, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    runs = [("plain", {}), ("acd", {}), ("acd-sp", {}), ("self-cd-sp", {}),
            ("acd-sp", {"prompts": OLD}), ("self-cd-sp", {"prompts": OLD})]
    for name, kwargs in runs:
        fp = method_fingerprint(methods.get(name, **kwargs))
        cells = []
        for ds in sets:
            rs = [r for r in rows if r["method_fingerprint"] == fp and r["dataset"] == ds
                  and r["decoding"]["temperature"] == 0 and r["decoding"]["max_new_tokens"] == 128]
            keep = [r for r in rs if r["prompt"] not in flagged]
            if not rs:
                cells.append(f"{ds}: no cached answers")
                continue
            rate = [100 * sum(judge.judge_one(r["response"]).flag for r in x) / len(x)
                    for x in (rs, keep)]
            cells.append(f"{ds} {rate[0]:.1f}% -> {rate[1]:.1f}% (n {len(keep)})")
        label = name + (" (session-7 prompts)" if kwargs else "")
        print(f"{label} | " + "; ".join(cells))


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 0.3)
