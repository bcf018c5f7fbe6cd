#!/usr/bin/env bash
# The efficacy report of issue 15 on the embedded model: DeAL with the harmlessness reward
# composed with the two methods the ACD work ships (acd, self-cd-sp), against plain, the safety
# prompt and the bases alone, on every evaluation set (all 200 HarmBench behaviours, the three
# benign sets) plus the anchor validation split, greedy, 128 new tokens. DeAL's knobs were chosen
# on the validation part only (scripts/deal_sweep.sh, benchmarks/results/deal_val_smollm2-135m.md).
# The bases' generations are reused from benchmarks/results/efficacy (same cache keys).
#
#   scripts/deal_eval.sh       # about 60 minutes per new DeAL setting on 2 CPU cores; resumable
#                              # (session 18: only DEAL18 is new)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=benchmarks/results
E=$R/efficacy-deal
SETS=harmbench,benign,benign-lookalike,benign-ordinary,anchor-harmful-val,anchor-safe-val
# The settings `tune` chose: session 10 (runs/deal_tune_propose), with the plain model's top-2
# tokens proposed beside the base's top-4: the best over all (acd) and over self-cd-sp; session 9
# (runs/deal_tune_v2), without proposals, kept for the comparison.
# Sessions 9-17 used session 10's reward model, restored from git here: a reward's cache key is
# its adapter's hash, so those rows stay cached after the shipped model changed (session 18).
S10=runs/harmless_rm_s10
mkdir -p $S10
for f in adapter_config.json adapter_model.safetensors; do
    [ -f $S10/$f ] || git show 39acb29:safedecode/methods/assets/harmless_rm/$f > $S10/$f
done
DEAL="deal:reward=[harmless:path=$S10]:chunk=8:lookahead=8:horizon=24:k=4"
DEAL_ACD_P=$DEAL:base=acd:lam=1:propose=2
DEAL_SCD_P=$DEAL:base=self-cd-sp:lam=1:propose=2
DEAL_ACD=$DEAL:base=acd:lam=3
DEAL_SCD=$DEAL:base=self-cd-sp:lam=1
# Session 11 (runs/deal_tune_s11, benchmarks/results/deal_sweep/session11): the plain model's
# proposals scored under a 0.25 mix of the plain model into the base (mix=0.25).
DEAL_ACD_M=$DEAL_ACD_P:mix=0.25
# Session 13 (runs/deal_tune_s13, benchmarks/results/deal_sweep/session13): λ 0.5 with mix 0.25,
# chosen on the validation part grown by 15 safe look-alike items.
DEAL_ACD_L=$DEAL:base=acd:lam=0.5:propose=2:mix=0.25
# Session 14 (runs/deal_tune_s13): propose 4 ties λ 0.5's score on validation (97.7% / 5.5%,
# the same refusals) with a lower benign perplexity, the rule's tie-break.
DEAL_ACD_P4=$DEAL:base=acd:lam=0.5:propose=4:mix=0.25
# Session 18 (runs/tune_s18, benchmarks/results/deal_sweep/session18): the shipped reward model,
# retrained with the contrast batch, at the same knobs (λ 0.5 the rule's choice again).
DEAL18=deal:reward=harmless:chunk=8:lookahead=8:horizon=24:k=4:base=acd:lam=0.5:propose=2:mix=0.25
mkdir -p "$E"
# Copy the bases' cached generations (and their perplexities) that this folder lacks.
$PY - "$E" "$R/efficacy" <<'PY'
import json, sys
from pathlib import Path
from safedecode import methods
from safedecode.eval.runner import method_fingerprint
out, src = Path(sys.argv[1]), Path(sys.argv[2])
fps = {method_fingerprint(methods.get(m)) for m in ("plain", "safe-prompt", "acd", "self-cd-sp")}
have = set()
if (out / "generations.jsonl").is_file():
    have = {json.loads(l)["key"] for l in open(out / "generations.jsonl")}
new = [l for l in open(src / "generations.jsonl")
       if json.loads(l)["method_fingerprint"] in fps and json.loads(l)["key"] not in have]
keys = {json.loads(l)["key"] for l in new}
with open(out / "generations.jsonl", "a") as f:
    f.writelines(new)
with open(out / "annotations.jsonl", "a") as f:
    f.writelines(l for l in open(src / "annotations.jsonl")
                 if json.loads(l)["key"].split("|")[0] in keys)
print(f"reused {len(new)} cached generations")
PY
# Session 19: the anchor validation part has 60 more safe items since session 17 (the held-out
# batch), which every row would have to generate; the run keeps the bases, session 13's row
# (the same knobs, session 10's reward model) and the new one. The other rows' figures are in
# efficacy_deal_smollm2-135m.md (their generations stay cached here: ALL=1 adds them back).
M="plain,safe-prompt,acd,self-cd-sp,$DEAL18,$DEAL_ACD_L"
[ "${ALL:-0}" = 1 ] && M="$M,$DEAL_ACD,$DEAL_SCD,$DEAL_ACD_P,$DEAL_SCD_P,$DEAL_ACD_M,$DEAL_ACD_P4"
$PY -m safedecode eval -m "$M" -d "$SETS" -n 128 --out "$E"
$PY benchmarks/efficacy_summary.py "$E" deal_smollm2-135m
