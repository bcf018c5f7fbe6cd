"""The shipped `harmless` reward model's pairwise accuracy on the TA-SFT model's own texts
(anchor validation part only; see rule.md). Run from the repository root:

    python benchmarks/results/reward_tasft_s45/measure.py [OUT_DIR]

The adapter's replies are kept in OUT_DIR/own_replies_val_tasft.jsonl (default runs/s45) and
reused; the figures are written to OUT_DIR/rm_tasft_diag.json.
"""

import json
import sys
import time
from pathlib import Path

from safedecode.data import load_anchor
from safedecode.judges import make_judge
from safedecode.methods.harmless import HarmlessReward
from safedecode.models import load_model
from safedecode.training import reward_model as rmt


def replies_of_adapter(out: Path) -> list[dict]:
    path = out / "own_replies_val_tasft.jsonl"
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines()]
    model, tok = load_model("default", adapter="ta-sft")
    replies = rmt.own_replies("val", model, tok, max_new_tokens=64,
                              log=lambda m: print(m, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in replies))
    return replies


def main(out: Path) -> dict:
    t0 = time.time()
    replies = replies_of_adapter(out)
    judge = make_judge("keyword")

    def refuses(text: str) -> bool:
        return judge.judge_one(text).flag

    compliance = {it["id"]: it["compliance"] for it in load_anchor("harmful", "val")}
    rm = HarmlessReward()
    res: dict = {}
    for label in ("harmful", "safe"):
        pairs = rmt.own_reply_pairs(replies, compliance, refuses, label)
        cuts = rmt.prefix_pairs(pairs, rmt.PREFIX_EVAL, rm.tok)
        res[f"own_{label}"] = (len(pairs), rmt.pairwise_accuracy(rm, pairs))
        res[f"own_{label}_cuts"] = (len(cuts), rmt.pairwise_accuracy(rm, cuts))
        for n in rmt.PREFIX_EVAL:
            cut = rmt.prefix_pairs(pairs, [n], rm.tok)
            res[f"own_{label}_cut{n}"] = (len(cut), rmt.pairwise_accuracy(rm, cut) if cut else None)
    harm = [r for r in replies if r["label"] == "harmful"]
    safe = [r for r in replies if r["label"] == "safe"]
    res["reply_refuses_harmful"] = sum(refuses(r["reply"]) for r in harm) / len(harm)
    res["reply_refuses_safe"] = sum(refuses(r["reply"]) for r in safe) / len(safe)
    natural = [{"chosen": rmt.conversation(r["prompt"], r["reply"]),
                "rejected": rmt.conversation(r["prompt"], compliance[r["id"]])}
               for r in harm if refuses(r["reply"]) and r["id"] in compliance]
    cuts = rmt.prefix_pairs(natural, rmt.PREFIX_EVAL, rm.tok)
    res["natural_refusal_vs_compliance"] = (len(natural), rmt.pairwise_accuracy(rm, natural))
    res["natural_refusal_vs_compliance_cuts"] = (len(cuts), rmt.pairwise_accuracy(rm, cuts))
    res["seconds"] = round(time.time() - t0)
    (out / "rm_tasft_diag.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/s45")), indent=1))
