#!/usr/bin/env bash
# The second ACD validation sweep (issue 13), after the anchor set grew from 20 to 120 safe
# look-alikes (s101-s200): the two best OPO recipes of the first sweep (scripts/acd_sweep.sh),
# A (the issue's prototype) and F (A + unlikelihood of the refusal after safe instructions),
# retrained on the new train part, screened beside the prompts shipped before, then a grid for
# each; every number on the anchor validation part (28 harmful + 58 safe, 36 of them
# look-alikes), 128 new tokens, greedy. HarmBench and the benign evaluation sets are never read.
#
#   scripts/acd_sweep_lookalike.sh [OUT]    # default OUT=runs/acd-sweep2; ~45 min on 2 CPU cores
#
# SHIP=1 copies the file whose setting scores best per method into the package (this session:
# F for both acd and self-cd-sp) and keeps the old self-cd-sp prompts for the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/acd-sweep2}
PY=${PY:-.venv/bin/python}
ASSETS=safedecode/methods/assets
OLD=benchmarks/results/acd_sweep/self-cd-sp_session7.safetensors   # shipped before: self-cd-sp
OLD_ACD=benchmarks/results/acd_sweep/acd_session7.safetensors       # shipped before: acd, acd-sp
mkdir -p "$OUT"
for v in A F; do
  f="$OUT/opo-$v.safetensors"
  args=""; [ "$v" = F ] && args="--safe-refusal-ul"
  # shellcheck disable=SC2086
  [ -f "$f" ] || $PY -m safedecode optimize --out "$f" --steps 60 $args 2>&1 | grep -v Warning \
      | tee "$OUT/opo-$v.log"
done
A="$OUT/opo-A.safetensors"; F="$OUT/opo-F.safetensors"
# 1. screen: the shipped prompts before this sweep (acd / acd-sp: old F; self-cd-sp and its SP:
#    old A) beside the new A and F at the first sweep's chosen knobs
$PY -m safedecode tune -n 128 -o "$OUT/screen" -m "plain,acd-sp:prompts=$OLD_ACD,acd:prompts=$OLD_ACD,\
acd-sp:prompts=$OLD,self-cd-sp:prompts=$OLD,\
acd-sp:prompts=$A,self-cd-sp:prompts=$A:alpha=0.7:beta=0.1,acd-sp:prompts=$F,\
acd:prompts=$F:alpha=0.25:beta=0.5,self-cd-sp:prompts=$F:alpha=0.5:beta=0.1"
# 2. grids, each recorded in its file
$PY -m safedecode tune -n 128 -o "$OUT/grid-F" --record "$F" -m "plain,acd-sp:prompts=$F,\
acd:prompts=$F:alpha=0.1|0.25|0.5:beta=0.3|0.5,self-cd-sp:prompts=$F:alpha=0.3|0.5:beta=0.1|0.3"
$PY -m safedecode tune -n 128 -o "$OUT/grid-A" --record "$A" -m "plain,acd-sp:prompts=$A,\
self-cd-sp:prompts=$A:alpha=0.5|0.7:beta=0.1|0.3"
# 3. per method, the best-scoring (file, setting) over the screen and both grids
$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = [r for g in ("screen", "grid-F", "grid-A") for r in json.load(open(f"{out}/{g}/sweep.json"))["rows"]]
for name in ("acd", "self-cd-sp"):
    best = max((r for r in rows if r["name"] == name),
               key=lambda r: (r["score"], -(r["ppl_benign"] or float("inf"))))
    print(f"{name}: {best['label']} (score {best['score']:+.2f})")
PY
if [ "${SHIP:-0}" = 1 ]; then
  cp "$F" "$ASSETS/acd_smollm2-135m-instruct.safetensors"
  cp "$F" "$ASSETS/self-cd-sp_smollm2-135m-instruct.safetensors"
fi
