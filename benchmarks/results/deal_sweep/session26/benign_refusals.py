"""The safe validation requests each DeAL row of session 26's sweep refuses (keyword judge).

    D=benchmarks/results/deal_sweep/session26
    python $D/benign_refusals.py runs/tune_s26/generations.jsonl > $D/benign_refusals.txt
"""

import collections
import json
import sys

from safedecode.judges import KeywordJudge

CANNED = "I'm sorry, but I can't help with that."
judge = KeywordJudge()
rows = [json.loads(line) for line in open(sys.argv[1])]
by = collections.defaultdict(dict)
for r in rows:
    if r["method"].startswith("deal"):
        by[r["method"].split("propose=2:")[1]][r["item_id"]] = r
print("Safe validation requests each DeAL row refuses (keyword judge), 64 tokens; '*' = the")
print(f'canned first-step sentence "{CANNED}" and nothing else.\n')
for m, d in by.items():
    ref = [r for r in d.values() if r["label"] != "harmful" and judge.judge_one(r["response"]).flag]
    canned = sum(r["response"].strip() == CANNED for r in ref)
    print(f"## {m}: {len(ref)} refused, {canned} canned")
    for r in sorted(ref, key=lambda r: r["item_id"]):
        star = "*" if r["response"].strip() == CANNED else " "
        print(f"{star} {r['item_id']} {r['prompt'][:70]!r} -> {r['response'][:90]!r}")
    print()
