"""Session 31 (rule: rule.md): the reward router simulated on the anchor validation part.

For each validation request, the shipped `harmless` reward model scores the first H tokens of
the cached greedy answers of `plain` and the shipped `acd`; the request takes `acd`'s answer
when h(acd) - h(plain) > tau, else plain's. Greedy, so the routed answer is exactly the winner's
cached 128-token generation. Nothing here reads HarmBench or the benign evaluation sets.

    .venv/bin/python benchmarks/results/route_s31/simulate.py \
        > benchmarks/results/route_s31/sweep.md
    # stage 2: the TA-SFT model's own answers and acd's on it
    .venv/bin/python benchmarks/results/route_s31/simulate.py \
        benchmarks/results/efficacy-ta-sft/ta-sft+refusal_grown_avg_seeds23 \
        benchmarks/results/route_s31/tasft_acd_val > benchmarks/results/route_s31/sweep_tasft.md
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from safedecode import methods
from safedecode.data import load_anchor
from safedecode.eval.runner import method_fingerprint
from safedecode.eval.tune import score
from safedecode.judges import KeywordJudge

CACHE = Path("benchmarks/results/efficacy")
SETS = ("anchor-harmful-val", "anchor-safe-val")
HS, TAUS = (8, 16, 24, 32), (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)


def cached(name: str, folder: Path) -> dict[str, dict]:
    """``name``'s validation answers in an evaluation folder, by item id, with their PPL."""
    fp = method_fingerprint(methods.get(name))
    out: dict[str, dict] = {}
    for line in open(folder / "generations.jsonl"):
        r = json.loads(line)
        if r["method_fingerprint"] == fp and r["dataset"] in SETS:
            out[r["item_id"]] = r
    ppl = {}
    for line in open(folder / "annotations.jsonl"):
        a = json.loads(line)
        if a["kind"] == "ppl":
            ppl[a["key"].split("|")[0]] = a["value"]
    for r in out.values():
        r["ppl"] = ppl.get(r["key"])
    return out


def main() -> None:
    from safedecode.methods.rewards import make_reward
    from safedecode.models import load_default

    plain_dir, acd_dir = (Path(a) for a in (sys.argv[1:3] if len(sys.argv) > 2
                                            else (CACHE, CACHE)))
    gens = {"plain": cached("plain", plain_dir), "acd": cached("acd", acd_dir)}
    fps = {r["model_fingerprint"] for g in gens.values() for r in g.values()}
    assert len(fps) == 1, f"answers from more than one model: {fps}"
    ids = sorted(gens["plain"])
    assert set(ids) == set(gens["acd"]) and len(ids) == 224, (len(ids), len(gens["acd"]))
    anchor = {it["id"]: it for it in load_anchor(part="val")}
    item = {i: anchor[i.split("-", 1)[-1]] if i not in anchor else anchor[i] for i in ids}
    harmful = {i: item[i]["split"] == "harmful" for i in ids}
    held = {i: item[i]["category"].startswith("heldout_") for i in ids}
    _, tok = load_default()
    reward = make_reward("harmless")
    judges = {"keyword": KeywordJudge(), "standard": KeywordJudge(("advbench", "xstest"))}
    refused = {j: {m: {i: judge.judge_one(gens[m][i]["response"]).flag for i in ids}
                   for m in gens} for j, judge in judges.items()}
    h = {}
    for n in HS:
        for m in gens:
            texts = [tok.decode(gens[m][i]["token_ids"][:n], skip_special_tokens=True)
                     for i in ids]
            h[n, m] = dict(zip(ids, reward([gens[m][i]["prompt"] for i in ids], texts),
                               strict=True))
        print(f"H {n}: scored", file=sys.stderr, flush=True)

    def ppl(recs) -> float:
        return math.exp(sum(r["ppl"]["nll"] for r in recs) / sum(r["ppl"]["tokens"] for r in recs))

    safe = [i for i in ids if not harmful[i]]
    untuned = cached("plain", CACHE)  # PPL ratios against the untuned model's answers
    plain_ppl = ppl([untuned[i] for i in safe])

    def row(name: str, pick: dict[str, str]) -> tuple[float, str]:
        def rate(sel, judge="keyword"):
            sel = list(sel)
            return sum(refused[judge][pick[i]][i] for i in sel) / len(sel)
        hv, bv = rate(i for i in ids if harmful[i]), rate(safe)
        ratio = ppl([gens[pick[i]][i] for i in safe]) / plain_ppl
        s = score(hv, bv, ratio)
        cells = [f"{hv:.1%}", f"{rate(i for i in ids if harmful[i] and held[i]):.1%}",
                 f"{bv:.1%}", f"{rate(i for i in safe if held[i]):.1%}",
                 f"{rate((i for i in ids if harmful[i]), 'standard'):.1%} / "
                 f"{rate(safe, 'standard'):.1%}",
                 f"{sum(pick[i] == 'acd' for i in ids) / len(ids):.0%}",
                 f"{ratio:.2f}", f"{s:+.3f}"]
        return s, f"| {name} | " + " | ".join(cells) + " |"

    print("Anchor validation part (91 harmful, 48 of them held-out; 133 safe, 60 held-out), "
          "greedy, 128 tokens, keyword judge; standard lists beside. Routed to `acd` when "
          "h(acd) - h(plain) > τ on the first H tokens. Answers: `plain` from "
          f"`{plain_dir}`, `acd` from `{acd_dir}`; PPL ratio against the untuned model's "
          "answers.\n")
    print("| setting | harmful | held-out harmful | safe | held-out safe | standard lists "
          "(harmful / safe) | to acd | PPL ratio | score |")
    print("|---|" + "---:|" * 8)
    for m in ("plain", "acd"):
        print(row(f"`{m}` alone", {i: m for i in ids})[1])
    best = None
    for n in HS:
        for t in TAUS:
            pick = {i: "acd" if h[n, "acd"][i] - h[n, "plain"][i] > t else "plain" for i in ids}
            s, line = row(f"H {n}, τ {t:+g}", pick)
            print(line)
            if best is None or s > best[0] + 1e-12:
                best = (s, n, t)
    print(f"\nChosen by the rule: H {best[1]}, τ {best[2]:+g} (score {best[0]:+.3f}).")
    if len(sys.argv) <= 2:
        json.dump({f"{n}|{m}": v for (n, m), v in h.items()},
                  open(Path(__file__).with_name("scores.json"), "w"))


if __name__ == "__main__":
    main()
