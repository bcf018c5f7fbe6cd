#!/usr/bin/env bash
# The third ACD validation sweep (issue 13, session 19). Session 17 found every decoding knob of
# the shipped prompts refusing 53-65% of the held-out look-alike batch (s301-s360): the
# over-refusal lives in the optimised prompt, trained on 142 safe requests of few shapes. The
# train part has grown since (245 safe: the look-alike batches' train part and the 68 train-only
# contrast items s401-s468, harmless requests on every harmful category's topics). Recipe F (the
# shipped one) retrained on it, same settings, then judged beside the shipped prompts on the
# validation part (43 harmful + 133 safe, 60 of them the held-out batch), 64 new tokens, greedy.
# HarmBench and the benign evaluation sets are never read.
#
#   scripts/acd_sweep_s19.sh [OUT]    # default OUT=runs/acd-sweep3; ~25 min on 2 CPU cores
#
# The script prints, per method, the new prompts' best setting beside the shipped prompts' best
# (`tune`'s score); SHIP=1 copies the new file (chosen knobs recorded in it) into the package as
# `acd`'s and `acd-sp`'s prompts — run it only when the new prompts win.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/acd-sweep3}
PY=${PY:-.venv/bin/python}
ASSETS=safedecode/methods/assets
mkdir -p "$OUT"
F="$OUT/opo-F.safetensors"
[ -f "$F" ] || $PY -m safedecode optimize --out "$F" --steps 60 --safe-refusal-ul 2>&1 \
    | grep -v Warning | tee "$OUT/opo-F.log"
$PY -m safedecode tune -n 64 -o "$OUT/grid-F" --record "$F" -m "plain,acd-sp,acd,self-cd-sp,\
acd-sp:prompts=$F,acd:prompts=$F:alpha=0.1|0.3:beta=0.5,self-cd-sp:prompts=$F:alpha=0.5:beta=0.1"
$PY - "$OUT" <<'PY'
import json, sys
rows = json.load(open(f"{sys.argv[1]}/grid-F/sweep.json"))["rows"]
key = lambda r: (r["score"], -(r["ppl_benign"] or float("inf")))
for name in ("acd", "self-cd-sp"):
    new = max((r for r in rows if r["name"] == name and "prompts=" in r["label"]), key=key)
    old = max((r for r in rows if r["name"] == name and "prompts=" not in r["label"]), key=key)
    print(f"{name}: new {new['label']} ({new['score']:+.2f}) vs shipped {old['label']} "
          f"({old['score']:+.2f})")
PY
if [ "${SHIP:-0}" = 1 ]; then
  cp "$F" "$ASSETS/acd_smollm2-135m-instruct.safetensors"
fi
