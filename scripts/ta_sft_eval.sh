#!/usr/bin/env bash
# The data-efficiency report of issue 16 on the embedded model: TA-SFT, plain SFT on refusals and
# TA-SFT + refusal, each with the knobs its validation sweep chose (scripts/ta_sft_sweep.sh, at 50
# harmful examples), fine-tuned on 25, 50 and 100 harmful examples (nested: the data file's first
# N), then plain greedy decoding, 128 new tokens, on every evaluation set and the anchor
# validation split. The untuned row reuses benchmarks/results/efficacy's plain generations.
#
#   scripts/ta_sft_eval.sh          # about 70 minutes on 2 CPU cores; resumable
#   scripts/ta_sft_eval.sh shipped  # the shipped adapter's row alone (about 8 minutes)
#   (shipped_s19 measured session 19's adapter; it is kept as it is — run it from git history)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=${R:-runs/tasft}
STAGE=${1:-all}
E=benchmarks/results/efficacy-ta-sft
SETS=harmbench,benign,benign-lookalike,benign-ordinary,anchor-harmful-val,anchor-safe-val
mkdir -p "$E/none"
if [ ! -f "$E/none/results.json" ]; then
  grep '"method": "plain"' benchmarks/results/efficacy/generations.jsonl > "$E/none/generations.jsonl"
  $PY -m safedecode eval -m plain -d "$SETS" -n 128 --out "$E/none" > "$E/none.log" 2>&1
fi
final() {  # name, finetune args...
  local name=$1; shift
  [ -f "$E/$name/results.json" ] && return 0
  [ -f "$R/final/$name/safedecode.json" ] || \
    $PY -m safedecode finetune --data "$R/data.jsonl" --out "$R/final/$name" "$@"
  $PY -m safedecode eval -m plain -d "$SETS" -n 128 --adapter "$R/final/$name" --out "$E/$name" \
      > "$E/$name.log" 2>&1
}
# Chosen on validation (benchmarks/results/ta_sft_val_smollm2-135m.md; rule of `safedecode tune`:
# harmful refusal − 2 × benign refusal among settings with benign PPL ≤ 1.5× the untuned model's).
SFT_KNOBS="--epochs 3 --lr 2e-3"
TAR_KNOBS="--lam 1 --epochs 3 --lr 7e-4"
TA_KNOBS="--lam 4 --epochs 3 --lr 2e-4"
# Session 25: ta-sft at n = 100 was never run on runs/tasft/data.jsonl (that file is gone); it was
# trained on session 24's file instead (its first 100 harmful examples = 2 answers to 50 prompts;
# 328 safe answers, not 71), before the loop below would train it on $R/data.jsonl:
[ "$STAGE" = shipped ] || [ -f "$E/ta-sft_n100/results.json" ] || \
  R=runs/tasft_s24 final ta-sft_n100 --method ta-sft --harmful 100 $TA_KNOBS
[ "$STAGE" = shipped ] || for n in 50 25 100; do
  final "sft_n$n" --method sft --harmful "$n" $SFT_KNOBS
  final "ta-sft+refusal_n$n" --method ta-sft+refusal --harmful "$n" $TAR_KNOBS
  final "ta-sft_n$n" --method ta-sft --harmful "$n" $TA_KNOBS
done
# Session 19: the adapter shipped since — TA-SFT + refusal on the grown train part's data
# (runs/tasft_s18/data.jsonl: 100 harmful examples, 238 safe answers), λ 1, lr 2e-3, 3 epochs,
# chosen on validation (benchmarks/results/ta_sft_val_smollm2-135m.md §Session 19).
# Session 20: the adapter shipped since — 207 harmful examples, --safe-weight 3 (the rule's pick on
# validation, §Session 20 there), and the same with 170 Magpie records (runs/tasft_s20/data.jsonl),
# which was shipped for the length of one evaluation (its folder's results name it
# "+ta_sft_lora"). The session-19 row above measured the adapter shipped then.
[ -f "$E/shipped_s20/results.json" ] || $PY -m safedecode eval -m plain -d "$SETS" -n 128 \
    --adapter ta-sft --out "$E/shipped_s20" > "$E/shipped_s20.log" 2>&1
M=runs/tasft_s20/ad/ta-sft+refusal_n207_lam1_e3_lr2e-3_sw3_magpie200
[ "$STAGE" = shipped ] || [ -f "$E/ta-sft+refusal_n207_sw3_magpie/results.json" ] || \
  $PY -m safedecode eval -m plain -d "$SETS" -n 128 --adapter "$M" \
      --out "$E/ta-sft+refusal_n207_sw3_magpie" > "$E/ta-sft+refusal_n207_sw3_magpie.log" 2>&1
# Session 21: the adapter shipped since — every harmful example of the grown train part (298: both
# samples of 155 prompts, the 48 train-only task-shaped requests among them), safe weight 3, the
# rule's pick on the grown validation part (runs/tasft_s21/data.jsonl; ta_sft_val §Session 21).
M=runs/tasft_s21/ad/ta-sft+refusal_all_lam1_e3_lr2e-3_sw3
[ "$STAGE" = shipped ] || [ -f "$E/ta-sft+refusal_all_sw3_tasks/results.json" ] || \
  $PY -m safedecode eval -m plain -d "$SETS" -n 128 --adapter "$M" \
      --out "$E/ta-sft+refusal_all_sw3_tasks" > "$E/ta-sft+refusal_all_sw3_tasks.log" 2>&1
