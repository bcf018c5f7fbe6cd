#!/usr/bin/env bash
# TA-SFT knobs on the embedded model, chosen on the anchor set only: the data from its train part
# (`safedecode finetune-data`), every knob (λ, epochs) judged on its validation part (greedy,
# 64 new tokens, plain decoding of the fine-tuned model; perplexity under the plain model).
# Resumable: a finished configuration is skipped.
#
#   scripts/ta_sft_sweep.sh         # about 25 minutes on 2 CPU cores (+ session 18's block)
#   scripts/ta_sft_sweep.sh s18     # session 18's block alone (about 25 minutes)
#   scripts/ta_sft_sweep.sh s19     # session 19's block alone (about 35 minutes)
#   scripts/ta_sft_sweep.sh s20     # session 20's blocks: s20 (safe weight, about 50 minutes),
#   scripts/ta_sft_sweep.sh s20c    # (Magpie data, then one adapter: about 30 minutes) and
#   scripts/ta_sft_sweep.sh s20d    # (both at 207 examples: about 45 minutes), in this order
#   scripts/ta_sft_sweep.sh s21     # session 21: the grown train part, with and without Magpie
#   scripts/ta_sft_sweep.sh s21b    # session 21: the shipped recipe again with seed 1 (~25 min)
#   scripts/ta_sft_sweep.sh s22     # session 22: away from the refusal on safe prompts, λ_r 1
#   scripts/ta_sft_sweep.sh s22b    # (two seeds, ~50 min), its first token alone (one, ~25 min)
#   scripts/ta_sft_sweep.sh s22c    # and λ_r 0.5 (two seeds, ~50 min); s22d: unlikelihood
#   scripts/ta_sft_sweep.sh s23     # session 23: the shipped recipe for 5 epochs, every epoch's
#                                   # checkpoint judged (one run per seed: SEEDS="0 1", ~45 min each)
#   scripts/ta_sft_sweep.sh s23b    # the shipped recipe with the learning rate decaying linearly
#                                   # to 0 (SEEDS, default 0; ~25 min each)
#   scripts/ta_sft_sweep.sh s24     # session 24: the shipped recipe on data grown by 96 train-only
#                                   # trigger-word requests (SEEDS="0 1"; data 5 min, ~22 min each),
#                                   # and the seeds' adapters averaged (SEEDS="2 3": the replication)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=${R:-runs/tasft}
STAGE=${1:-all}
run() {  # name, finetune args...
  local name=$1; shift
  [ -f "$R/val/$name/results.json" ] && return 0
  [ -f "$R/ad/$name/safedecode.json" ] || \
    $PY -m safedecode finetune --data "${DATA:-$R/data.jsonl}" --out "$R/ad/$name" "$@"
  $PY -m safedecode eval -m plain -d anchor-harmful-val,anchor-safe-val -n 64 \
      --adapter "$R/ad/$name" --out "$R/val/$name" > "$R/val/$name.log" 2>&1
}
if [ "$STAGE" = all ]; then
mkdir -p "$R/val"
[ -f "$R/data.jsonl" ] || $PY -m safedecode finetune-data --out "$R/data.jsonl"
# lr 2e-4 (the usual LoRA rate) barely moves the EMD of the harmful answers in 3 epochs (0.44 ->
# 0.55 at λ = 4): the negative-EMD gradient p_j·(C_jy − EMD) vanishes where the model is sure of
# its harmful token. So the grid's main axis is the learning rate.
for lam in 1 4; do run "ta-sft_n50_lam${lam}_e3" --harmful 50 --lam "$lam" --epochs 3; done
for lam in 1 4; do run "ta-sft_n50_lam${lam}_e3_lr2e-3" --harmful 50 --lam "$lam" --epochs 3 --lr 2e-3; done
run ta-sft_n50_lam4_e3_lr1e-2 --harmful 50 --lam 4 --epochs 3 --lr 1e-2
run sft_n50_e3_lr2e-3 --method sft --harmful 50 --epochs 3 --lr 2e-3
run sft_n50_e3 --method sft --harmful 50 --epochs 3
# CE towards the refusal plus −λ·EMD away from the model's own answer (safedecode's extension).
for lam in 1 4; do
  run "ta-sft+refusal_n50_lam${lam}_e3_lr2e-3" --method ta-sft+refusal --harmful 50 --lam "$lam" \
      --epochs 3 --lr 2e-3
done
run "ta-sft+refusal_n50_lam1_e3" --method ta-sft+refusal --harmful 50 --lam 1 --epochs 3
# The untuned model on the same split (the reference row).
[ -f "$R/val/none/results.json" ] || $PY -m safedecode eval -m plain \
    -d anchor-harmful-val,anchor-safe-val -n 64 --out "$R/val/none" > "$R/val/none.log" 2>&1
# Stage 2: where over-alignment starts — a middle learning rate and one epoch at the high one.
for m in sft ta-sft+refusal; do
  run "${m}_n50_lam1_e3_lr7e-4" --method "$m" --harmful 50 --lam 1 --epochs 3 --lr 7e-4
  run "${m}_n50_lam1_e1_lr2e-3" --method "$m" --harmful 50 --lam 1 --epochs 1 --lr 2e-3
done
fi
# Session 18: the train part has grown since the data above was made (h101-h150, the train part
# of the look-alike batches s101-s250 and the 68 train-only contrast items s401-s468): 71 safe
# answers then, every safe train prompt now. The data is made again and the chosen knobs
# retrained on it; both adapters (and the untuned model) are judged on the grown validation part,
# whose held-out batch (s301-s360) tells whether the over-refusal carries beyond the train items
# (`python benchmarks/ta_sft_summary.py OUT.md none=runs/tasft_s18/val/none ...`).
R=${R18:-runs/tasft_s18}
mkdir -p "$R/val"
# (the blocks of session 22 on need none of this: they train on their own data)
[[ "$STAGE" =~ ^s2[2-9] ]] || [ -f "$R/data.jsonl" ] || \
  $PY -m safedecode finetune-data --out "$R/data.jsonl"
# the chosen knobs (lr 7e-4), and lr 2e-3, which over-refused with the 71 safe answers
[[ "$STAGE" =~ ^s(19|2[0-9]) ]] || for lr in 7e-4 2e-3; do
  run "ta-sft+refusal_n50_lam1_e3_lr$lr" --method ta-sft+refusal --harmful 50 --lam 1 --epochs 3 \
      --lr $lr
done
# `shipped` is whatever adapter the package holds: in session 18 the n = 50 / 71-safe one; since
# session 19 the n = 100 one below, since session 20 the n = 207 / safe-weight-3 one (a cached
# row in runs/ stays the adapter of its time).
for m in none shipped; do
  [[ "$STAGE" =~ ^s2[2-9] ]] && continue
  [ -f "$R/val/$m/results.json" ] && continue
  ad=(); [ $m = shipped ] && ad=(--adapter safedecode/methods/assets/ta_sft_lora)
  $PY -m safedecode eval -m plain -d anchor-harmful-val,anchor-safe-val -n 64 "${ad[@]}" \
      --out "$R/val/$m" > "$R/val/$m.log" 2>&1
done
# Session 19: with 238 safe answers the 50 harmful examples (50 prompts, one sample each) are
# outweighed, so refusal fell with over-refusal. The harmful side grown to 100 and to every
# harmful example of the train part (207: 107 prompts), at lr 2e-3.
if [ "$STAGE" = s19 ] || [ "$STAGE" = all ]; then
  for n in 100 207; do
    run "ta-sft+refusal_n${n}_lam1_e3_lr2e-3" --method ta-sft+refusal --harmful $n --lam 1 \
        --epochs 3 --lr 2e-3
  done
fi
# Session 20: the over-refusals are the refusal template on a topic word. The safe answers'
# weight in the CE (--safe-weight: a safe token against a refusal token) at 100 examples, and at
# 207 (which reaches 98% refusal but over-refuses 38%).
if [ "$STAGE" = s20 ]; then
  for sw in 2 4; do
    run "ta-sft+refusal_n100_lam1_e3_lr2e-3_sw$sw" --method ta-sft+refusal --harmful 100 --lam 1 \
        --epochs 3 --lr 2e-3 --safe-weight $sw
  done
  run "ta-sft+refusal_n207_lam1_e3_lr2e-3_sw3" --method ta-sft+refusal --harmful 207 --lam 1 \
      --epochs 3 --lr 2e-3 --safe-weight 3
fi
# Session 20, second block: retention beyond the anchor set's topics — 200 everyday requests the
# model writes itself (Magpie), with its own greedy answers, added to the same data.
if [ "$STAGE" = s20c ]; then
  D=${R%_s18}_s20
  mkdir -p "$D"
  [ -f "$D/data.jsonl" ] || $PY -m safedecode finetune-data --extend "$R/data.jsonl" --magpie 200 \
      --out "$D/data.jsonl"
  R0=$R; R=$D; mkdir -p "$R/val"
  run "ta-sft+refusal_n100_lam1_e3_lr2e-3_magpie200" --method ta-sft+refusal --harmful 100 \
      --lam 1 --epochs 3 --lr 2e-3
  R=$R0
fi
# Session 20, third block: the safe weight at 207 examples (sw 3 cut the over-refusal 38 -> 14%),
# and with the Magpie data.
if [ "$STAGE" = s20d ]; then
  run "ta-sft+refusal_n207_lam1_e3_lr2e-3_sw6" --method ta-sft+refusal --harmful 207 --lam 1 \
      --epochs 3 --lr 2e-3 --safe-weight 6
  D=${R%_s18}_s20
  R0=$R; R=$D; mkdir -p "$R/val"
  run "ta-sft+refusal_n207_lam1_e3_lr2e-3_sw3_magpie200" --method ta-sft+refusal --harmful 207 \
      --lam 1 --epochs 3 --lr 2e-3 --safe-weight 3
  R=$R0
fi
# Session 21: the harmful validation part grown by 48 held-out requests in other shapes (tasks,
# code, role-play, context; h201-h248) and the train part by 48 such requests (h301-h348). The
# data made again on the grown train part, with and without the Magpie requests; every harmful
# example (both samples of the 155 train prompts), safe weight 3 (session 20's choice).
if [ "$STAGE" = s21 ]; then
  # the adapters of sessions 18-20 on the grown part: each folder's generations are reused, only
  # the 48 new requests are generated (the adapter's folder beside its val folder)
  for v in "$R"/val/* "${R%_s18}_s20"/val/*; do
    [ -d "$v" ] || continue
    ad=(); [ "${v##*/}" = none ] || ad=(--adapter "${v%/val/*}/ad/${v##*/}")
    [ "${v##*/}" = shipped ] && continue  # the adapter shipped then: its own row is the sw3 one
    $PY -m safedecode eval -m plain -d anchor-harmful-val,anchor-safe-val -n 64 "${ad[@]}" \
        --out "$v" > "$v.log" 2>&1
  done
  D=${R%_s18}_s21
  mkdir -p "$D/val"
  [ -f "$D/data.jsonl" ] || $PY -m safedecode finetune-data --out "$D/data.jsonl"
  [ -f "$D/data_magpie.jsonl" ] || $PY -m safedecode finetune-data --extend "$D/data.jsonl" \
      --magpie 200 --out "$D/data_magpie.jsonl"
  R0=$R; R=$D
  run "ta-sft+refusal_all_lam1_e3_lr2e-3_sw3" --method ta-sft+refusal --lam 1 --epochs 3 \
      --lr 2e-3 --safe-weight 3
  DATA=$D/data_magpie.jsonl run "ta-sft+refusal_all_lam1_e3_lr2e-3_sw3_magpie200" \
      --method ta-sft+refusal --lam 1 --epochs 3 --lr 2e-3 --safe-weight 3
  R=$R0
fi
# Session 21, second block: how much of a few points on this part is the seed alone — the shipped
# recipe trained again with seed 1 (LoRA init and data order; the data file is the same).
if [ "$STAGE" = s21b ]; then
  R0=$R; R=${R%_s18}_s21
  run "ta-sft+refusal_all_lam1_e3_lr2e-3_sw3_seed1" --method ta-sft+refusal --lam 1 --epochs 3 \
      --lr 2e-3 --safe-weight 3 --seed 1
  R=$R0
fi
# Session 22: the over-refusals are the refusal template on a topic word or a task verb. The
# paper's loss mirrored on the safe side: −λ_r·EMD away from the template ("I can't / won't help
# with that.") on every safe train prompt, on top of the shipped recipe; two seeds per setting
# (session 21: the seed alone moves the score by 0.085). Reference: the shipped recipe, seeds 0
# and 1 (session 21's rows). s22: λ_r 1 on the whole refusal (~50 min) — seed 1 followed "I"
# with word salad ("I strugg strugg …"); s22b: λ_r 1 on its first token alone (seed 0, ~25
# min: it opened with "Ensuring" and looped as well, so seed 1 was not run); s22c: λ_r 0.5 on the
# whole refusal (~50 min; seed 0 looped 4 times and lost the gain, so seed 1 was stopped).
# s22d: λ_r 1 with unlikelihood instead of the EMD for the push (seed 0 only, ~25 min: the
# session's time allowed one).
if [[ "$STAGE" =~ ^s22 ]]; then
  R0=$R; R=${R%_s18}_s21; mkdir -p "$R/val"
  tag=away1; extra=(--away-refusal 1); seeds="0 1"
  [ "$STAGE" = s22b ] && { tag=away1_first1; extra=(--away-refusal 1 --away-tokens 1); seeds=0; }
  [ "$STAGE" = s22c ] && { tag=away0.5; extra=(--away-refusal 0.5); }
  [ "$STAGE" = s22d ] && { tag=away1_ul; extra=(--away-refusal 1 --away-loss unlikelihood); seeds=0; }
  for seed in $seeds; do
    run "ta-sft+refusal_all_lam1_e3_lr2e-3_sw3_${tag}_seed$seed" --method ta-sft+refusal \
        --lam 1 --epochs 3 --lr 2e-3 --safe-weight 3 "${extra[@]}" --seed $seed
  done
  R=$R0
fi
# Session 23: over-alignment against training length at the shipped data size. On the safe train
# prompts the shipped adapter refuses 3 of 253 (1.2%): its over-refusals are a generalisation
# gap, not items it failed to fit, so on-policy "away" targets would find nothing to push on.
# Instead one run of the shipped recipe for 5 epochs keeps every epoch's checkpoint (constant
# learning rate: the checkpoint at epoch k is the k-epoch run; epoch 3 is the shipped recipe).
if [ "$STAGE" = s23 ]; then
  R0=$R; R=${R%_s18}_s21; mkdir -p "$R/val"
  for seed in ${SEEDS:-0}; do
    name="ta-sft+refusal_all_lam1_e5_lr2e-3_sw3_seed$seed"
    [ -f "$R/ad/$name/safedecode.json" ] || \
      $PY -m safedecode finetune --data "$R/data.jsonl" --out "$R/ad/$name" \
          --method ta-sft+refusal --lam 1 --epochs 5 --lr 2e-3 --safe-weight 3 --seed $seed \
          --save-steps 105 --keep-checkpoints
    for ep in 2 4 5 3 1; do  # 105 steps an epoch (834 examples, batch 8)
      v="$R/val/${name}_ep$ep"
      [ -f "$v/results.json" ] && continue
      $PY -m safedecode eval -m plain -d anchor-harmful-val,anchor-safe-val -n 64 \
          --adapter "$R/ad/$name/checkpoints/checkpoint-$((105 * ep))" --out "$v" > "$v.log" 2>&1
    done
  done
  R=$R0
fi
# Session 23, second block: both 5-epoch runs wander along the refusal frontier from epoch to
# epoch (benign refusal 4.5 -> 7.5 -> 11.3 -> 8.3% in one, 10.5 -> 15.8 -> 8.3 -> 13.5% in the
# other) — what a constant learning rate of 2e-3 does at the end of training. The usual fix: decay
# it (linearly to 0 over the 3 epochs), so the adapter settles instead of stopping mid-swing.
# (Seeds 0 and 1: 95.6% / 17.3% and 92.3% / 13.5%, two-run score +0.63 — no better.)
if [ "$STAGE" = s23b ]; then
  R0=$R; R=${R%_s18}_s21; mkdir -p "$R/val"
  for seed in ${SEEDS:-0}; do
    run "ta-sft+refusal_all_lam1_e3_lr2e-3lin_sw3_seed$seed" --method ta-sft+refusal --lam 1 \
        --epochs 3 --lr 2e-3 --lr-schedule linear --safe-weight 3 --seed $seed
  done
  R=$R0
fi
# Session 24: every knob so far moved along one frontier, and the shipped adapter refuses 3 of
# its 253 safe train prompts: its over-refusals are a generalisation gap. The lever left is the
# data: 96 train-only everyday requests with a harm word (s469-s564: eight in each of twelve
# genres, tasks and questions), answered by the model itself like every safe record.
# (Seeds 0 / 1: +0.57 / +0.72, no better alone; their exact average +0.76, and seeds 2 + 3's
# +0.70 — 86.8% / 8.3% on validation, every target met on the evaluation sets under the extended
# judge; ta_sft_val_smollm2-135m.md and efficacy_ta_sft_smollm2-135m.md §Session 24.)
if [ "$STAGE" = s24 ]; then
  R0=$R; R=${R%_s18}_s24; mkdir -p "$R/val"
  [ -f "$R/data.jsonl" ] || $PY -m safedecode finetune-data --out "$R/data.jsonl"
  for seed in ${SEEDS:-0}; do
    run "ta-sft+refusal_all_lam1_e3_lr2e-3_sw3_seed$seed" --method ta-sft+refusal --lam 1 \
        --epochs 3 --lr 2e-3 --safe-weight 3 --seed $seed
  done
  # the seeds' adapters averaged exactly (`safedecode average-adapters`) and judged the same way
  name="ta-sft+refusal_all_lam1_e3_lr2e-3_sw3_avg_seeds${SEEDS:-0}"; name=${name// /}
  [ -f "$R/ad/$name/safedecode.json" ] || $PY -m safedecode average-adapters -o "$R/ad/$name" \
      $(for seed in ${SEEDS:-0}; do echo "$R/ad/ta-sft+refusal_all_lam1_e3_lr2e-3_sw3_seed$seed"; done)
  run "$name"
  R=$R0
fi
