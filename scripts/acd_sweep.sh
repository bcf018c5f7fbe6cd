#!/usr/bin/env bash
# The ACD validation sweep (issue 13): which OPO settings and which decoding knobs, chosen on the
# anchor set's validation part only. HarmBench and the benign evaluation sets are never read here
# (`safedecode tune` and `safedecode optimize` refuse them).
#
#   scripts/acd_sweep.sh [OUT]        # default OUT=runs/acd-sweep; resumable (cached generations)
#
# 1. OPO variants, each trained on the anchor train part (one factor changed from A at a time):
#      A  the model's own answers as safe and compliant targets, one fixed refusal, lr 3e-3, 60 steps
#      B  A with the data set's hand-written safe answers        (--safe-targets data)
#      C  A with the data set's varied written refusals          (--refusal varied)
#      D  A with the data set's compliant texts for the AP       (--compliance-targets data)
#      E  A with the old optimiser settings (--lr 1.5e-2 --steps 39 --batch-size 8)
# 2. For each variant: its SP alone, Self-CD over it and ACD (alpha 0.5, beta 0.1) on the
#    validation split.
# 3. For the best variant: the full grid of ACD (alpha x beta) and Self-CD over SP (alpha x beta).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/acd-sweep}
PY=${PY:-.venv/bin/python}
N=${N:-64}   # new tokens per answer in the sweep (refusals are decided in the first tokens)
mkdir -p "$OUT"
declare -A ARGS=(
  [A]=""
  [B]="--safe-targets data"
  [C]="--refusal varied"
  [D]="--compliance-targets data"
  [E]="--lr 1.5e-2 --steps 39 --batch-size 8"
)
for v in A B C D E; do
  f="$OUT/opo-$v.safetensors"
  [ -f "$f" ] || $PY -m safedecode optimize --out "$f" --steps 60 ${ARGS[$v]} 2>&1 \
      | grep -v Warning | tee "$OUT/opo-$v.log"
done
grid=""
for v in A B C D E; do
  f="$OUT/opo-$v.safetensors"
  grid+="acd-sp:prompts=$f,self-cd-sp:prompts=$f:alpha=0.5:beta=0.1,acd:prompts=$f:alpha=0.5:beta=0.1,"
done
$PY -m safedecode tune -n "$N" -o "$OUT/variants" -m "plain,safe-prompt,${grid%,}"
