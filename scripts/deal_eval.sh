#!/usr/bin/env bash
# The efficacy report of issue 15 on the embedded model: DeAL with the harmlessness reward, over
# the undefended model and composed with self-cd-sp (the best method of the ACD work), against
# plain, the safety prompt and self-cd-sp alone, on every evaluation set (all 200 HarmBench
# behaviours, the three benign sets) plus the anchor validation split, greedy, 128 new tokens.
# DeAL's knobs were chosen on the validation part only (scripts/deal_sweep.sh,
# benchmarks/results/deal_val_smollm2-135m.md). plain / safe-prompt / self-cd-sp generations are
# reused from benchmarks/results/efficacy (same cache keys).
#
#   scripts/deal_eval.sh       # about 60 minutes on 2 CPU cores; resumable
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=benchmarks/results
E=$R/efficacy-deal
SETS=harmbench,benign,benign-lookalike,benign-ordinary,anchor-harmful-val,anchor-safe-val
# The settings `tune` chose (runs/deal_tune_plain, runs/deal_tune_scd):
DEAL_PLAIN=deal:reward=harmless:chunk=8:lookahead=8:horizon=24:base=safe-prompt:k=4:lam=1
DEAL_SCD=deal:reward=harmless:chunk=8:lookahead=8:horizon=24:base=self-cd-sp:k=4:lam=1
mkdir -p "$E"
if [ ! -s "$E/generations.jsonl" ]; then  # reuse the bases' generations and their perplexities
  grep -E '"method": "(plain|safe-prompt|self-cd-sp)"' $R/efficacy/generations.jsonl \
      > "$E/generations.jsonl"
  $PY - "$E" "$R/efficacy" <<'PY'
import json, sys
keys = {json.loads(l)["key"] for l in open(f"{sys.argv[1]}/generations.jsonl")}
with open(f"{sys.argv[1]}/annotations.jsonl", "a") as out:
    for line in open(f"{sys.argv[2]}/annotations.jsonl"):
        if json.loads(line)["key"].split("|")[0] in keys:
            out.write(line)
PY
fi
$PY -m safedecode eval -m "plain,safe-prompt,self-cd-sp,$DEAL_PLAIN,$DEAL_SCD" -d "$SETS" \
    -n 128 --out "$E"
$PY benchmarks/efficacy_summary.py "$E" deal_smollm2-135m
