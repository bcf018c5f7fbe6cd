#!/usr/bin/env bash
# TA-SFT knobs on the embedded model, chosen on the anchor set only: the data from its train part
# (`safedecode finetune-data`), every knob (λ, epochs) judged on its validation part (greedy,
# 64 new tokens, plain decoding of the fine-tuned model; perplexity under the plain model).
# Resumable: a finished configuration is skipped.
#
#   scripts/ta_sft_sweep.sh         # about 40 minutes on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=${R:-runs/tasft}
mkdir -p "$R/val"
[ -f "$R/data.jsonl" ] || $PY -m safedecode finetune-data --out "$R/data.jsonl"
run() {  # name, finetune args...
  local name=$1; shift
  [ -f "$R/val/$name/results.json" ] && return 0
  [ -f "$R/ad/$name/safedecode.json" ] || \
    $PY -m safedecode finetune --data "$R/data.jsonl" --out "$R/ad/$name" "$@"
  $PY -m safedecode eval -m plain -d anchor-harmful-val,anchor-safe-val -n 64 \
      --adapter "$R/ad/$name" --out "$R/val/$name" > "$R/val/$name.log" 2>&1
}
for lam in 1 4 0.5 2; do run "ta-sft_n50_lam${lam}_e3" --harmful 50 --lam "$lam" --epochs 3; done
run sft_n50_e3 --method sft --harmful 50 --epochs 3
for lam in 1 4; do
  for e in 1 6; do run "ta-sft_n50_lam${lam}_e${e}" --harmful 50 --lam "$lam" --epochs "$e"; done
done
