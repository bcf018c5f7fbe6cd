"""Session 31: where the router's evaluation answers came from, and the benign perplexity pooled
over the three benign evaluation sets (read after the evaluations; nothing chosen from it).

For each evaluation answer of `route` (over the untuned model: `efficacy/`; over the TA-SFT
adapter: `route_s31/tasft_eval/`), whether it is token for token the base's (`acd`) or the
plain side's greedy answer, whether the keyword judge calls it a refusal, and how many of
`acd`'s refusals it undid; then each setting's benign PPL under the untuned model, pooled as
the efficacy tables pool it (each benign set's PPL, the three evaluation sets and the anchor's
safe validation part, weighted by its size), over the untuned model's.

    .venv/bin/python benchmarks/results/route_s31/answers.py \\
        > benchmarks/results/route_s31/answers.md
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from safedecode import methods
from safedecode.eval.runner import method_fingerprint
from safedecode.judges import KeywordJudge

R = Path("benchmarks/results")
BENIGN = ("benign", "benign-lookalike", "benign-ordinary", "anchor-safe-val")
SETS = ("harmbench", *BENIGN[:3])


def load(folder: Path, method: str) -> dict:
    fp = method_fingerprint(methods.get(method)) if ":" not in method else None
    ppl = {}
    for line in open(folder / "annotations.jsonl"):
        a = json.loads(line)
        if a["kind"] == "ppl":
            ppl[a["key"].split("|")[0]] = a["value"]
    out = {}
    for line in open(folder / "generations.jsonl"):
        r = json.loads(line)
        if (r["method_fingerprint"] == fp if fp else r["method"] == method) \
                and r["dataset"] in (*SETS, *BENIGN):
            r["ppl"] = ppl[r["key"]]
            out[r["dataset"], r["item_id"]] = r
    return out


def pooled(recs: dict) -> float:
    """Each benign set's PPL (its answers' NLL over their tokens), weighted by its size."""
    total, n = 0.0, 0
    for d in BENIGN:
        rs = [r for (ds, _), r in recs.items() if ds == d]
        nll, tok = sum(r["ppl"]["nll"] for r in rs), sum(r["ppl"]["tokens"] for r in rs)
        total, n = total + len(rs) * math.exp(nll / tok), n + len(rs)
    return total / n


def main() -> None:
    judge = KeywordJudge()
    untuned = load(R / "efficacy", "plain")
    settings = {
        "`route` over the untuned model": (load(R / "efficacy", "route"),
                                            load(R / "efficacy", "acd"), untuned),
        "`route` (H 8, margin 0) over the TA-SFT adapter": (
            load(R / "route_s31/tasft_eval", "route:horizon=8:margin=0"),
            None, load(R / "efficacy-ta-sft/ta-sft+refusal_grown_avg_seeds23", "plain")),
    }
    base_ppl = pooled(untuned)
    print(f"Benign PPL (under the untuned model; {', '.join(BENIGN)}, each set's PPL weighted "
          f"by its size, as the efficacy tables pool it); the untuned model's own answers: "
          f"{base_ppl:.2f}.\n")
    for name, (route, acd, plain) in settings.items():
        print(f"## {name}\n")
        print(f"Benign PPL {pooled(route):.2f} ({pooled(route) / base_ppl:.2f}×); its plain "
              f"side alone {pooled(plain):.2f} ({pooled(plain) / base_ppl:.2f}×).\n")
        print("| data set | to the base | of them refused | to the plain side | of them refused |"
              + (" acd's refusals undone |" if acd else ""))
        print("|---|---:|---:|---:|---:|" + ("---:|" if acd else ""))
        for ds in SETS:
            c = Counter()
            for k, r in route.items():
                if k[0] != ds:
                    continue
                side = "plain" if r["token_ids"] == plain[k]["token_ids"] else "base"
                c[side] += 1
                c[side + " refused"] += judge.judge_one(r["response"]).flag
                if acd is not None and judge.judge_one(acd[k]["response"]).flag:
                    c["acd refused"] += 1
                    c["undone"] += not judge.judge_one(r["response"]).flag
            row = f"| {ds} | {c['base']} | {c['base refused']} | {c['plain']} | " \
                  f"{c['plain refused']} |"
            print(row + (f" {c['undone']} of {c['acd refused']} |" if acd else ""))
        print()


if __name__ == "__main__":
    main()
