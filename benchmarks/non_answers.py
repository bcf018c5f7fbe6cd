"""Non-answers of the evaluated methods, from their committed evaluation runs' cached answers.

For each method's final evaluation (greedy, 128 new tokens; the runs of the efficacy reports),
per data set: the keyword judge's refusal rate and the share of answers it lets through that
still do not answer (`safedecode.eval.metrics.non_answer`: fewer than 16 tokens, perplexity
under the plain model above 20, or a loop), from the runs' ``generations.jsonl`` and their
cached perplexities. Nothing is generated, tuned or chosen here: a reading of final reports.
Writes ``benchmarks/results/non_answers.md``.

    python benchmarks/non_answers.py      # seconds
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from safedecode.eval.metrics import NON_ANSWER_KINDS
from safedecode.eval.report import group_metrics
from safedecode.judges import KeywordJudge

RES = Path(__file__).parent / "results"
OUT = RES / "non_answers.md"
SETS = ("harmbench", "benign", "benign-lookalike", "benign-ordinary")
BENIGN = SETS[1:]
# (row name, run folder, method label in that run)
RUNS = [
    ("untuned, `plain`", "efficacy", "plain"),
    ("untuned, `safe-prompt`", "efficacy", "safe-prompt"),
    ("untuned, `acd`", "efficacy", "acd"),
    ("untuned, `self-cd-sp`", "efficacy", "self-cd-sp"),
    ("untuned, `route`", "efficacy", "route"),
    ("untuned, DeAL ∘ `acd` (shipped reward)", "efficacy-deal",
     "deal:reward=harmless:chunk=8:lookahead=8:horizon=24:k=4:base=acd:lam=0.5:propose=2:mix=0.25"),
    ("untuned, `safeinfer` (shipped)", "efficacy-safeinfer", "safeinfer"),
    ("TA-SFT, `plain`", "efficacy-ta-sft/ta-sft+refusal_grown_avg_seeds23", "plain"),
    ("TA-SFT, `route` (H 8, margin 0)", "route_s31/tasft_eval", "route:horizon=8:margin=0"),
    ("TA-SFT, DeAL (`base=plain`, session 25)", "efficacy-deal-tasft",
     "deal:reward=harmless:chunk=8:lookahead=8:horizon=24:base=plain:k=4:lam=0.5"),
]


def load(run: str, label: str) -> tuple[list[dict], dict[str, dict]]:
    """The run's records of ``label`` on :data:`SETS` and their cached perplexities."""
    folder = RES / run
    fp = json.loads((folder / "results.json").read_text())["config"]["methods"][label][
        "fingerprint"]
    recs = [r for r in map(json.loads, (folder / "generations.jsonl").open())
            if r["method_fingerprint"] == fp and r["dataset"] in SETS]
    ppl: dict[str, dict] = {}
    for a in map(json.loads, (folder / "annotations.jsonl").open()):
        if a["kind"] == "ppl":
            ppl.setdefault(a["key"].split("|")[0], a["value"])
    return recs, ppl


def main() -> None:
    judge = KeywordJudge()
    lines = ["# Non-answers of the evaluated methods", "",
             f"`python benchmarks/non_answers.py` ({time.strftime('%Y-%m-%d')}), from the "
             "committed evaluation runs (greedy, 128 new tokens; folder per row below). Per data "
             "set: keyword-judge refusal, then **non-answers** — answers the judge lets through "
             "that are under 16 tokens, garbled (perplexity under the plain model above 20) or "
             "looping (`safedecode.eval.metrics.non_answer`, counted by the eval reports' "
             "`group_metrics`; heuristics: a correct one-line answer counts as short). *Served*: "
             "benign answers neither refused nor non-answers, pooled over the three benign sets "
             "(320).", "",
             "| model, method | HarmBench refused / non-answer | edgy | look-alike | ordinary | "
             "benign served | benign non-answers: short / garbled / loop | run |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, run, label in RUNS:
        recs, ppl = load(run, label)
        verdicts = {judge.name: {r["key"]: {"flag": judge.judge_one(r["response"]).flag}
                                 for r in recs}}
        cells = []
        for ds in SETS:
            m = group_metrics([r for r in recs if r["dataset"] == ds], verdicts, [judge], ppl,
                              speed=False)
            cells.append(f"{100 * m['refusal_rate,keyword']:.1f}% / "
                         f"{100 * m['nonanswer_rate,keyword']:.1f}%")
        b = group_metrics([r for r in recs if r["dataset"] in BENIGN], verdicts, [judge], ppl,
                          speed=False)
        served = 1 - b["refusal_rate,keyword"] - b["nonanswer_rate,keyword"]
        kinds = b["nonanswer_kinds,keyword"]
        lines.append(f"| {name} | {' | '.join(cells)} | {100 * served:.1f}% | "
                     f"{' / '.join(str(kinds[k]) for k in NON_ANSWER_KINDS)} | `{run}` |")
    lines += ["", "Cells: refused / non-answer, each of the data set's answers.", ""]
    reading = OUT.read_text().split("**Reading.**", 1) if OUT.exists() else []
    OUT.write_text("\n".join(lines) + ("\n**Reading.**" + reading[1] if len(reading) == 2
                                       else ""))
    print(OUT.read_text())


if __name__ == "__main__":
    main()
