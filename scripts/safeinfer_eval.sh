#!/usr/bin/env bash
# The efficacy report of issue 14 on the embedded model: SafeInfer and its ablations (SA only,
# sGDS only) against plain and the safety prompt, on every evaluation set (all 200 HarmBench
# behaviours, the three benign sets) plus the anchor validation split, greedy, 128 new tokens.
# Knobs come from the shipped vector file (chosen on validation only: scripts/safeinfer_sweep.sh).
# plain / safe-prompt generations are reused from benchmarks/results/efficacy (same cache keys).
# Since session 27 the shipped knobs are gated (conditional steering, the probe in the vector
# file); the earlier ungated choices stay as rows of their own (their generations are cached).
# Since session 28 SA steers every position of its gated rows; session 27's SA (the first
# position) stays as a row of its own. Since session 29 SA steers the first 8 new tokens of its
# gated rows and ends them at the first sentence end; session 28's SA stays as a row.
#
#   scripts/safeinfer_eval.sh       # about 35 minutes on 2 CPU cores; resumable
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=benchmarks/results
SETS=harmbench,benign,benign-lookalike,benign-ordinary,anchor-harmful-val,anchor-safe-val
EARLIER="safeinfer-sa:steer=first:gamma=0.5:layer=10:gate=off"
EARLIER+=",safeinfer:steer=first:gamma=0.75:layer=10:unsafe=opposite:lam=0.5:gate=off"
EARLIER+=",safeinfer-sa:steer=first:gamma=1:layer=14:gate=-1"  # session 27's SA (gated)
EARLIER+=",safeinfer-sa:steer=every:gamma=0.5:layer=14:gate=0:window=off:stop=off"  # s28 SA
$PY -m safedecode eval -m "plain,safe-prompt,$EARLIER,safeinfer-sa,safeinfer-sgds,safeinfer" \
    -d "$SETS" \
    -n 128 --out "$R/efficacy-safeinfer"
$PY benchmarks/efficacy_summary.py "$R/efficacy-safeinfer" safeinfer_smollm2-135m
