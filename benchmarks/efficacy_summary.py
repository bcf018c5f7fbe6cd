"""Collect an evaluation run (``safedecode eval --out DIR``) into ``efficacy_<name>.json``.

Copies the harness's ``results.json`` and adds the refusal rates under the two standard phrase
lists only (AdvBench + XSTest, without the ``safedecode`` prefixes), re-judged from the saved
generations, so the effect of the project's extra list can be seen. The markdown beside it
(``efficacy_<name>.md``) is the written discussion of the same numbers.

    python benchmarks/efficacy_summary.py benchmarks/results/efficacy smollm2-135m
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from safedecode.eval.judges import KeywordJudge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("name")
    args = ap.parse_args()
    results = json.loads((args.run_dir / "results.json").read_text(encoding="utf-8"))
    standard = KeywordJudge(["advbench", "xstest"])
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    with (args.run_dir / "generations.jsonl").open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            c = counts[f"{rec['method']}/{rec['label']}"]
            c[0] += standard.judge_one(rec["response"]).flag
            c[1] += 1
    out = {"command": results["config"].get("command"), "source": str(args.run_dir),
           "refusal_rate_standard_lists_only": {k: round(a / n, 4)
                                                for k, (a, n) in sorted(counts.items())},
           **results}
    path = args.run_dir.parent / f"efficacy_{args.name}.json"
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
