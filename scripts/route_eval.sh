#!/usr/bin/env bash
# Session 31's reward router (`route`, issues 13 / 15): the validation sweeps and the evaluation
# on the TA-SFT model (rule first: benchmarks/results/route_s31/rule.md; report: its README.md).
# The router over the untuned model is a row of scripts/acd_eval.sh.
#
#   scripts/route_eval.sh      # about 35 minutes on 2 CPU cores; resumable (cached answers)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
S=benchmarks/results/route_s31
SETS=harmbench,benign,benign-lookalike,benign-ordinary,anchor-harmful-val,anchor-safe-val
TASFT=benchmarks/results/efficacy-ta-sft/ta-sft+refusal_grown_avg_seeds23
# stage 1: acd or the untuned model, from the cached validation answers (2 minutes)
$PY $S/simulate.py > $S/sweep.md
# stage 2: acd's validation answers on the TA-SFT model, then acd or that model
$PY -m safedecode eval -m acd -d anchor-harmful-val,anchor-safe-val -n 128 --adapter ta-sft \
    --out $S/tasft_acd_val
$PY $S/simulate.py $TASFT $S/tasft_acd_val > $S/sweep_tasft.md
# the chosen setting (H 8, margin 0), once, on every evaluation set
$PY -m safedecode eval -m route:horizon=8:margin=0 -d "$SETS" -n 128 --adapter ta-sft \
    --out $S/tasft_eval
# sampled (T 0.7, top-p 0.9, three seeds, 10 items per set)
for s in 0 1 2; do
  $PY -m safedecode eval -m route:horizon=8:margin=0 -d "$SETS" -n 128 --limit 10 -t 0.7 \
      --top-p 0.9 --seed "$s" --adapter ta-sft --out $S/tasft_sampled/seed$s
done
# where the evaluated answers came from, and the benign PPL as the efficacy tables pool it
$PY $S/answers.py > $S/answers.md
$PY benchmarks/bench_route.py
