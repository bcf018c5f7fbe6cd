#!/usr/bin/env bash
# How DeAL's reward model and knobs for the embedded model were chosen, on the anchor set only:
# the harmlessness reward model trained on the train part (whole and cut replies), then DeAL's
# knobs (base method, k, λ) chosen with `safedecode tune` on the validation part (64 new tokens,
# greedy; chunk commits of 8 tokens, lookahead 8, search over the first 24 tokens). Two grids:
# over the undefended model (plain or the text safety prompt) and composed with the best method
# of the ACD work (self-cd-sp).
#
#   scripts/deal_sweep.sh      # about 60 minutes on 2 CPU cores; resumable
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
A=safedecode/methods/assets
R=${R:-runs}
[ -f $A/harmless_rm/metrics.json ] || $PY -m safedecode train-reward --out $A/harmless_rm
COMMON="deal:reward=harmless:chunk=8:lookahead=8:horizon=24"
$PY -m safedecode tune --out $R/deal_tune_plain -n 64 \
    -m "$COMMON:base=plain|safe-prompt:k=4|8:lam=1|3"
$PY -m safedecode tune --out $R/deal_tune_scd -n 64 \
    -m "$COMMON:base=self-cd-sp:k=4|8:lam=1|3"
