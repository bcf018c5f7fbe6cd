#!/usr/bin/env bash
# The ACD validation sweep (issue 13): which OPO settings and which decoding knobs, chosen on the
# anchor set's validation part only. HarmBench and the benign evaluation sets are never read here
# (`safedecode tune` and `safedecode optimize` refuse them).
#
#   scripts/acd_sweep.sh [OUT]        # default OUT=runs/acd-sweep; resumable (cached generations)
#
# 1. OPO variants, each trained on the anchor train part for 60 Adam steps (one factor changed
#    from A at a time; about 11 minutes each on 2 CPU cores):
#      A  the model's own greedy answers as safe and compliant targets, one fixed refusal
#         sentence, batches of 6 harmful + 6 safe, lr 3e-3 (the issue's prototype)
#      B  A with the data set's hand-written safe answers        (--safe-targets data)
#      C  A with the data set's varied written refusals          (--refusal varied)
#      E  A with the old optimiser settings                      (--lr 1.5e-2 --steps 39 --batch-size 8)
#      F  A plus UL(safe -> refusal) on SP                       (--safe-refusal-ul)
# 2. For each variant: its SP alone (acd-sp), Self-CD over it (alpha 0.5, beta 0.1) and ACD
#    (alpha 0.5, beta 0.1) on the validation split, 64 new tokens, greedy.
# 3. The two variants with the best scores in step 2 (same rule as `safedecode tune`) get the full
#    grid: ACD alpha x beta and Self-CD over SP alpha x beta; the chosen knobs are recorded in each
#    file; per method, the file of its best (variant, setting) is shipped when SHIP=1: acd's
#    (which acd-sp, its SP alone, shares) and self-cd-sp's.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/acd-sweep}
export OUT
PY=${PY:-.venv/bin/python}
N=${N:-64}   # new tokens per answer in the sweep (refusals are decided in the first tokens)
VARIANTS=(A B C E F)
mkdir -p "$OUT"
declare -A ARGS=(
  [A]=""
  [B]="--safe-targets data"
  [C]="--refusal varied"
  [E]="--lr 1.5e-2 --steps 39 --batch-size 8"
  [F]="--safe-refusal-ul"
)
for v in "${VARIANTS[@]}"; do
  f="$OUT/opo-$v.safetensors"
  # shellcheck disable=SC2086
  [ -f "$f" ] || $PY -m safedecode optimize --out "$f" --steps 60 ${ARGS[$v]} 2>&1 \
      | grep -v Warning | tee "$OUT/opo-$v.log"
done
grid=""
for v in "${VARIANTS[@]}"; do
  f="$OUT/opo-$v.safetensors"
  grid+="acd-sp:prompts=$f,self-cd-sp:prompts=$f:alpha=0.5:beta=0.1,acd:prompts=$f:alpha=0.5:beta=0.1,"
done
$PY -m safedecode tune -n "$N" -o "$OUT/variants" -m "plain,safe-prompt,${grid%,}"
top=$($PY - "$OUT/variants/sweep.json" <<'PY'
import json, re, sys
rows = json.load(open(sys.argv[1]))["rows"]
best = {}
for r in rows:
    m = re.search(r"opo-(\w+)\.safetensors", r["label"])
    if m:  # a variant's best score, any setting (fluent or not: the grid may fix fluency)
        best[m.group(1)] = max(best.get(m.group(1), -9), r["score"])
print(" ".join(sorted(best, key=best.get, reverse=True)[:2]))
PY
)
echo "top OPO variants on validation: $top"
for v in $top; do
  f="$OUT/opo-$v.safetensors"
  $PY -m safedecode tune -n "$N" -o "$OUT/grid-$v" --record "$f" -m \
    "plain,acd-sp:prompts=$f,acd:prompts=$f:alpha=0.25|0.5|1.0:beta=0.1|0.3|0.5,self-cd-sp:prompts=$f:alpha=0.3|0.5|0.7:beta=0.1|0.3"
done
# Per method, the (variant, setting) with the best score across the grids; its file is shipped
# for that method: acd (and acd-sp, its SP alone) and self-cd-sp each get their own.
$PY - $top <<'PY'
import json, os, shutil, sys
out = os.environ["OUT"]
rows = [r for v in sys.argv[1:] for r in json.load(open(f"{out}/grid-{v}/sweep.json"))["rows"]]
assets = {"acd": "acd_smollm2-135m-instruct", "self-cd-sp": "self-cd-sp_smollm2-135m-instruct"}
for name, asset in assets.items():
    best = max((r for r in rows if r["name"] == name),
               key=lambda r: (r["score"], -(r["ppl_benign"] or float("inf"))))
    src = best["kwargs"]["prompts"]
    print(f"{name}: {best['label']} (score {best['score']:+.2f})")
    if os.environ.get("SHIP") == "1":
        shutil.copy(src, f"safedecode/methods/assets/{asset}.safetensors")
        print(f"  shipped {src} -> safedecode/methods/assets/{asset}.safetensors")
PY
