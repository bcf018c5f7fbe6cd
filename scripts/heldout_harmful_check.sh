#!/usr/bin/env bash
# Session 21: every shipped decoding method on the grown validation part, whose 48 new harmful
# requests (h201-h248: tasks, code, role-play and context on AILuminate's hazards, never trained
# on) are the only new generations — the rest is reused from the session-19 sweeps' caches.
# Table: benchmarks/results/heldout_harmful_s21.md (`safedecode tune` picks nothing here; no
# --record). 6 minutes on 2 CPU cores with the session-19 caches in runs/; without them every
# row is generated whole (several times longer: DeAL dominates).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=${R:-runs}
O=$R/tune_s21
mkdir -p $O
for f in generations annotations; do  # the earlier sweeps' caches, where this machine has them
  [ -f $O/$f.jsonl ] || cat $R/tune_s19/$f.jsonl $R/tune_s19_si/$f.jsonl > $O/$f.jsonl 2>/dev/null \
      || true
done
DEAL="deal:chunk=8:lookahead=8:horizon=24:base=acd:k=4:propose=2:reward=harmless:lam=0.5:mix=0.25"
$PY -m safedecode tune --out $O -n 64 -m "acd,self-cd-sp,safeinfer,$DEAL"
