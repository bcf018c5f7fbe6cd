#!/usr/bin/env bash
# How DeAL's reward model and knobs for the embedded model were chosen, on the anchor set only:
# the harmlessness reward model trained on the train part (hand-written pairs and pairs of the
# model's own texts, whole and cut), then DeAL's knobs (base method, λ) chosen with
# `safedecode tune` on the validation part (64 new tokens, greedy; chunk commits of 8 tokens,
# lookahead 8, k = 4, search over the first 24 tokens), composed with the two methods the ACD
# work ships (self-cd-sp, acd); session 10 adds the plain model's top tokens to the candidates
# (propose). Session 7's grid (over plain / safe-prompt as well, k 4|8, with the
# hand-written-only reward model) is in benchmarks/results/deal_val_smollm2-135m.md.
#
#   scripts/deal_sweep.sh      # several hours on 2 CPU cores (each reward model ~50 min); resumable
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
A=safedecode/methods/assets
R=${R:-runs}
[ -f $A/harmless_rm/metrics.json ] || $PY -m safedecode train-reward --out $A/harmless_rm
$PY benchmarks/harmless_rm_check.py    # the model's own validation texts, ranked
COMMON="deal:reward=harmless:chunk=8:lookahead=8:horizon=24"
$PY -m safedecode tune --out $R/deal_tune_v2 -n 64 -m "$COMMON:base=self-cd-sp|acd:k=4:lam=1|3"
# Session 10: the plain model's top tokens proposed beside the base's (propose > 0).
$PY -m safedecode tune --out $R/deal_tune_propose -n 64 \
    -m "$COMMON:base=acd|self-cd-sp:k=4:lam=1|3:propose=2|4,$COMMON:base=acd:k=4:lam=1:propose=1"
# Session 11: 50 more harmful anchor items (h101-h150; 15 of them in validation); the reward
# model retrained on the larger train part (into $R, shipped only if validation prefers it);
# the proposals' mixture weight (mix). Session 10's reward model, restored from git, is tuned on
# the same (larger) validation part beside it.
S10=$R/harmless_rm_s10
mkdir -p $S10
for f in adapter_config.json adapter_model.safetensors; do
    [ -f $S10/$f ] || git show 39acb29:safedecode/methods/assets/harmless_rm/$f > $S10/$f
done
[ -f $R/harmless_rm_s11/metrics.json ] || $PY -m safedecode train-reward --out $R/harmless_rm_s11
DEAL="deal:chunk=8:lookahead=8:horizon=24:base=acd:k=4:propose=2"
$PY -m safedecode tune --out $R/deal_tune_s11 -n 64 -m "acd,\
$DEAL:reward=[harmless:path=$S10]:lam=1:mix=0.5|0.25,\
$DEAL:reward=[harmless:path=$R/harmless_rm_s11]:lam=1|3:mix=0.5|0.25"
# Session 13: 50 safe look-alike anchor items (s201-s250; 15 of them in validation); the reward
# model retrained on the train part that now holds 35 of them (into $R; shipped only if
# validation prefers it: it did not, by one harmful item; λ 2|3 added after the first-step
# trace of benchmarks/deal_first_step.py), tuned beside the shipped one on the grown validation
# part; then propose 4 (the trace found requests whose candidates hold no answer)
# (benchmarks/results/deal_sweep/session13).
[ -f $R/harmless_rm_s12/metrics.json ] || $PY -m safedecode train-reward --out $R/harmless_rm_s12
$PY benchmarks/harmless_rm_check.py "" $R/harmless_rm_s12
D13="deal:chunk=8:lookahead=8:horizon=24:base=acd:k=4"
$PY -m safedecode tune --out $R/deal_tune_s13 -n 64 -m "acd,\
$D13:propose=2:reward=[harmless:path=$S10]:lam=0.5|1:mix=0.25,\
$D13:propose=4:reward=[harmless:path=$S10]:lam=0.5:mix=0.25,\
$D13:propose=2:reward=[harmless:path=$R/harmless_rm_s12]:lam=0.5|1|2|3:mix=0.25"
# Session 17: the anchor set's held-out batch (s301-s360, 60 look-alikes in OR-Bench's
# categories, validation only) shows the over-refusal the earlier validation hid (acd 60%, DeAL
# λ 0.5 42% vs 4% on the earlier validation look-alikes); rollouts by the plain model
# (rollout=plain|both) (benchmarks/results/deal_sweep/session17).
D17="deal:chunk=8:lookahead=8:horizon=24:base=acd:k=4:propose=2:reward=harmless:mix=0.25"
$PY -m safedecode tune --out $R/tune_s17 -n 64 -m "acd,$D17:lam=0.5|1,\
$D17:rollout=plain:lam=0.5,$D17:rollout=both:lam=0.5|1"
# Session 18: the reward model retrained on the grown train part (h101-h150 and the train part of
# s201-s250, which the shipped session-10 model never saw, and the 68 train-only contrast items
# s401-s468: harmless requests in every harmful category, in the held-out batch's shapes) into
# $R; ranked on the held-out batch beside the shipped one (the ranking session 17 found at
# chance), then tuned beside session 17's rows, whose generations are reused
# (benchmarks/results/deal_sweep/session18).
[ -f $R/harmless_rm_s18/metrics.json ] || $PY -m safedecode train-reward --out $R/harmless_rm_s18
$PY benchmarks/harmless_rm_check.py --generations $R/tune_s17/generations.jsonl "" \
    $R/harmless_rm_s18
[ -f $R/tune_s18/generations.jsonl ] || \
    { mkdir -p $R/tune_s18 && cp $R/tune_s17/generations.jsonl $R/tune_s18/; }
D18="deal:chunk=8:lookahead=8:horizon=24:base=acd:k=4:propose=2"
$PY -m safedecode tune --out $R/tune_s18 -n 64 -m "acd,$D18:reward=harmless:mix=0.25:lam=0.5|1,\
$D18:reward=[harmless:path=$R/harmless_rm_s18]:mix=0.25:lam=0.5|1"
# Session 19: on the evaluation sets the shipped reward model at λ 0.5 still refuses 15.8% of
# look-alikes, nearly all acd's first-step canned refusal, and λ 1 did not lower benign refusal on
# validation (9.0% both). More of the plain model in the mixture that scores the proposals
# (mix 0.5, 0.75) is the knob that weighs log P towards plain's answer; session 18's rows reused
# (benchmarks/results/deal_sweep/session19).
[ -f $R/tune_s19/generations.jsonl ] || \
    { mkdir -p $R/tune_s19 && cp $R/tune_s18/generations.jsonl $R/tune_s19/; }
$PY -m safedecode tune --out $R/tune_s19 -n 64 -m "acd,$D18:reward=harmless:lam=0.5:mix=0.25|0.5|0.75"
# Session 26: the reward model retrained on the train part grown since session 18 (48 train-only
# harmful requests in other shapes, h301-h348; 96 everyday requests with a harm word, s469-s564),
# one epoch (two would take 2.3 h), into $R; tuned beside the shipped one on the validation part
# (benchmarks/results/deal_sweep/session26).
# The shipped model's own-text replies are reused (greedy, so the same texts); the 144 new train
# prompts' are generated. The ranking check and the two models' mean came after the first rows.
if [ ! -f $R/harmless_rm_s26/metrics.json ]; then
    mkdir -p $R/harmless_rm_s26
    cp -n $A/harmless_rm/own_replies_*.jsonl $R/harmless_rm_s26/
    $PY -m safedecode train-reward --out $R/harmless_rm_s26 --epochs 1
fi
D26="$D18:reward=[harmless:path=$R/harmless_rm_s26]"
$PY -m safedecode tune --out $R/tune_s26 -n 64 -m "acd,$D18:reward=harmless:mix=0.25:lam=0.5,\
$D26:mix=0.25:lam=0.5|1,$D26:lam=0.5:mix=0.5|0.75,\
$D18:reward=[0.5*harmless+0.5*harmless:path=$R/harmless_rm_s26]:mix=0.25:lam=0.5"
$PY benchmarks/harmless_rm_check.py --generations $R/tune_s26/generations.jsonl "" \
    $R/harmless_rm_s26
