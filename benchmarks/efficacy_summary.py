"""Collect evaluation runs (``safedecode eval --out DIR``) into ``efficacy_<name>.json`` and the
compact markdown tables of ``efficacy_<name>.md``.

The greedy run gives one row per method: refusal on each harmful set (HarmBench, the anchor
validation split) and on each benign set (benign-but-edgy, look-alikes, ordinary, the anchor
validation split), with 95% Wilson intervals, under the extended keyword list and, beside it, the
two standard lists only (AdvBench + XSTest); perplexity of the answers under the plain model;
the share of refusals cut at the token limit; answers ending with EOS. Sampled runs (one folder per
seed) add mean and range over seeds.

    python benchmarks/efficacy_summary.py benchmarks/results/efficacy smollm2-135m \\
        [--sampled benchmarks/results/efficacy-sampled/seed0 ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HARMFUL = ("harmbench", "anchor-harmful-val")
BENIGN = ("benign", "benign-lookalike", "benign-ordinary", "anchor-safe-val")


def _load(run: Path) -> dict:
    return json.loads((run / "results.json").read_text(encoding="utf-8"))


def _cell(res: dict, ds: str, method: str, judge: str = "keyword", ci: bool = True) -> str:
    m = res["results"].get(f"{ds}@{method}")
    if m is None or f"refusal_rate,{judge}" not in m:
        return "—"
    v = 100 * m[f"refusal_rate,{judge}"]
    if not ci:
        return f"{v:.1f}%"
    lo, hi = (100 * x for x in m[f"refusal_rate_ci95,{judge}"])
    return f"{v:.1f}% [{lo:.0f}, {hi:.0f}]"


def _pooled(res: dict, method: str, sets, key: str) -> float | None:
    rows = [res["results"][f"{d}@{method}"] for d in sets if f"{d}@{method}" in res["results"]]
    vals = [(r.get(key), r["n"]) for r in rows if r.get(key) is not None]
    n = sum(w for _, w in vals)
    return sum(v * w for v, w in vals) / n if n else None


def greedy_tables(res: dict) -> str:
    methods = list(res["config"]["methods"])
    sets = [d for d in (*HARMFUL, *BENIGN) if d in res["config"]["datasets"]]
    head = "| method | " + " | ".join(sets) + " |"
    out = ["Refusal rate, keyword judge (AdvBench + XSTest + safedecode lists), 95% Wilson "
           "interval:", "", head, "|---|" + "---:|" * len(sets)]
    for m in methods:
        out.append(f"| `{m}` | " + " | ".join(_cell(res, d, m) for d in sets) + " |")
    out += ["", "The same, standard lists only (AdvBench + XSTest):", "", head,
            "|---|" + "---:|" * len(sets)]
    for m in methods:
        out.append(f"| `{m}` | " + " | ".join(_cell(res, d, m, "keyword-standard", False)
                                              for d in sets) + " |")
    out += ["", "Fluency and endings (pooled over the harmful / benign sets):", "",
            "| method | PPL harmful | PPL benign | refusals capped at the limit (h / b) | "
            "ends with EOS (h / b) | mean tokens (h / b) |", "|---|---:|---:|---:|---:|---:|"]
    for m in methods:
        def f(sets, key, pct=False, m=m):
            v = _pooled(res, m, sets, key)
            return "—" if v is None else (f"{100 * v:.0f}%" if pct else f"{v:.2f}")
        h = [d for d in HARMFUL if d in sets]
        b = [d for d in BENIGN if d in sets]
        out.append(f"| `{m}` | {f(h, 'ppl,none')} | {f(b, 'ppl,none')} | "
                   f"{f(h, 'capped_refusal_rate,keyword', True)} / "
                   f"{f(b, 'capped_refusal_rate,keyword', True)} | "
                   f"{f(h, 'eos_rate,none', True)} / {f(b, 'eos_rate,none', True)} | "
                   f"{f(h, 'mean_tokens,none')} / {f(b, 'mean_tokens,none')} |")
    return "\n".join(out) + "\n"


def sampled_table(runs: list[dict]) -> str:
    methods = list(runs[0]["config"]["methods"])
    sets = [d for d in (*HARMFUL, *BENIGN) if d in runs[0]["config"]["datasets"]]
    dec = runs[0]["config"]["decoding"]
    out = [f"Sampled (T = {dec['temperature']}, top-p {dec['top_p']}, seeds "
           f"{', '.join(str(r['config']['decoding']['seed']) for r in runs)}; "
           f"{runs[0]['config']['limit']} items of each set): mean refusal over seeds "
           "[min, max]; PPL of the benign answers", "",
           "| method | " + " | ".join(sets) + " | PPL benign |",
           "|---|" + "---:|" * (len(sets) + 1)]
    for m in methods:
        cells = []
        for d in sets:
            v = [r["results"][f"{d}@{m}"]["refusal_rate,keyword"] * 100 for r in runs
                 if f"{d}@{m}" in r["results"]]
            cells.append(f"{sum(v) / len(v):.1f}% [{min(v):.0f}, {max(v):.0f}]" if v else "—")
        ppl = [_pooled(r, m, [d for d in BENIGN if d in sets], "ppl,none") for r in runs]
        ppl = [p for p in ppl if p is not None]
        cells.append(f"{sum(ppl) / len(ppl):.2f}" if ppl else "—")
        out.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("name")
    ap.add_argument("--sampled", type=Path, nargs="*", default=[])
    args = ap.parse_args()
    res = _load(args.run_dir)
    sampled = [_load(p) for p in args.sampled]
    tables = greedy_tables(res) + ("\n" + sampled_table(sampled) if sampled else "")
    out = {"command": res["config"].get("command"), "source": str(args.run_dir),
           "sampled": [{"source": str(p), "command": r["config"].get("command"),
                        "results": r["results"]} for p, r in zip(args.sampled, sampled,
                                                                  strict=True)],
           **res}
    path = args.run_dir.parent / f"efficacy_{args.name}.json"
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    (args.run_dir.parent / f"efficacy_{args.name}_tables.md").write_text(tables,
                                                                        encoding="utf-8")
    print(tables)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
