#!/usr/bin/env bash
# The final efficacy report of issue 13 on the embedded model: every method on every evaluation set
# (all 200 HarmBench behaviours, the three benign sets) plus the anchor validation split, greedy,
# 128 new tokens; then sampled decoding (T 0.7, top-p 0.9, three seeds) of the two contrast
# methods and the gated ACD on 10 items of each set (a smoke-sized check of greedy's picture;
# time-boxed on 2 cores).
# Knobs come from the shipped prompts file (chosen by scripts/acd_sweep.sh on validation only).
# Since session 29 the file also holds a harmful-request probe (`safedecode acd-gate --layer 14`)
# and `acd:gate=0` is ACD's contrast on the requests it flags, the plain model elsewhere
# (chosen on validation: benchmarks/results/acd_gate_s29/).
#
# Since session 31 `route` is the reward router over `acd` (the `harmless` reward model compares
# acd's and the plain model's first 16 tokens; margin -2; chosen on validation:
# benchmarks/results/route_s31/).
#
#   scripts/acd_eval.sh            # about 45 minutes on 2 CPU cores; resumable
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=benchmarks/results
SETS=harmbench,benign,benign-lookalike,benign-ordinary,anchor-harmful-val,anchor-safe-val
# acd-sp is ACD's SP alone; the second acd-sp is the SP that self-cd-sp contrasts (its own file)
SELF_SP=safedecode/methods/assets/self-cd-sp_smollm2-135m-instruct.safetensors
# the prompts shipped before the anchor set's 100 look-alikes (session 7's self-cd-sp: variant A,
# trained on 20 look-alikes), kept for the comparison and for Self-CD over an over-refusing SP
OLD=benchmarks/results/acd_sweep/self-cd-sp_session7.safetensors
# the gate's probe: since session 30 the shipped file's is also fitted on the train requests in
# four content-neutral forms (`safedecode acd-gate --layer 14 --forms all`;
# benchmarks/results/acd_gate_s30/); session 29's probe (train requests as written) kept here:
S29=benchmarks/results/acd_gate_s29/acd_gate.safetensors
$PY -m safedecode eval \
    -m "plain,safe-prompt,acd-sp,acd,acd:gate=0,route,acd:prompts=$S29:gate=0,acd-sp:prompts=$SELF_SP,self-cd-sp,acd-sp:prompts=$OLD,self-cd-sp:prompts=$OLD" \
    -d "$SETS" \
    -n 128 --out "$R/efficacy"
for s in 0 1 2; do
  $PY -m safedecode eval -m self-cd-sp,acd,acd:gate=0,route -d "$SETS" -n 128 --limit 10 -t 0.7 \
      --top-p 0.9 --seed "$s" --out "$R/efficacy-sampled/seed$s"
done
$PY benchmarks/efficacy_summary.py "$R/efficacy" smollm2-135m \
    --sampled "$R"/efficacy-sampled/seed{0,1,2}
