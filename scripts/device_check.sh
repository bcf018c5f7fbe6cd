#!/usr/bin/env bash
# One GPU session's checks, in priority order, each stage bounded in time; results packed into
# $OUT/results.tgz after every stage (so a run cut at its limit still returns what it finished).
#
#   scripts/device_check.sh [stage ...]   # stages: build info ops pytest generate engine deal serve
#                                         # (default: build info ops generate pytest)
#
# Needs: a CUDA torch, nvcc, pybind11 and (for `generate`) a model folder in $SD_MODEL, or the
# SmolLM2-135M-shaped config + tokenizer in $SD_MODEL_SHAPE (random weights are made from it:
# decoding speed does not depend on the weights' values when EOS is ignored, as the benchmark does).
# SD_DEADLINE=<s> cuts every stage to end that many seconds after the start (set it below the
# call's own limit). Prebuilt extensions (safedecode/_C*.so for this Python) skip the build when they import.
# The shape folder, made once from the embedded model:
#   python -c "from safedecode.models import load_default; m, t = load_default(); \
#              m.config.save_pretrained('.device/smollm2-shape'); t.save_pretrained('.device/smollm2-shape')"
# `serve` also needs .whl/ from scripts/device_wheels.sh (carry it: the machine has no index).
# Figures of the first run and how it was called: benchmarks/results/gpu_h200.md.
set -u
OUT=${OUT:-/tmp/sd_out}
RES=${RES:-/tmp/sd_res}
mkdir -p "$OUT" "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SAFEDECODE_CUDA_ARCHS=${SAFEDECODE_CUDA_ARCHS:-90}
PY=${PY:-python3}
STAGES=${*:-build info ops generate pytest}
DEADLINE=${SD_DEADLINE:-100000}  # seconds from the start: each stage's limit is cut to fit it
T0=$SECONDS

log() { echo "[$(date +%T) +$((SECONDS - T0))s] $*" | tee -a "$RES/log.txt"; }
pack() { tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null; }
run() {  # run <seconds> <name> <command...>: output to $RES/<name>.txt and the console tail
    local limit=$1 name=$2 left=$((DEADLINE - (SECONDS - T0) - 20))
    shift 2
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then log "skip $name: ${left}s left before the deadline"; return 124; fi
    log "start $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$RES/$name.txt" 2>&1
    local rc=$?
    tail -n 25 "$RES/$name.txt"
    log "end $name rc=$rc"
    pack
    return $rc
}

MODEL=${SD_MODEL:-}
ensure_model() {  # $MODEL: the given folder, else random weights in $SD_MODEL_SHAPE's shape
    [ -n "$MODEL" ] && return 0
    MODEL=/tmp/sd_random_model
    run 120 random_model $PY - "${SD_MODEL_SHAPE:?set SD_MODEL or SD_MODEL_SHAPE}" "$MODEL" <<'EOF'
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.bfloat16)
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, dst / f.name)
print(f"random-weight {type(model).__name__} from {src}: "
      f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters -> {dst}")
EOF
}

for stage in $STAGES; do
    case $stage in
    build)
        if $PY -c "import safedecode._C, safedecode._C_cuda" 2>/dev/null; then
            log "build: prebuilt extensions import; skipped"
        else
            run 300 build $PY setup.py build_ext --inplace -j "$(nproc)"
            mkdir -p "$RES/ext" && cp safedecode/_C*.so "$RES/ext/" 2>/dev/null
            for f in safedecode/_C*.so; do cp "$f" "$OUT/"; done  # for a later call to carry
        fi
        ;;
    info)
        run 60 info bash -c "nvidia-smi; $PY -c 'import torch, triton, transformers; \
print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)'; \
$PY -m safedecode info"
        ;;
    ops)
        run 300 ops $PY scripts/gpu_check.py --select-sweep --out "$RES/gpu_check_cuda"
        ;;
    pytest)
        run 240 pytest $PY -m pytest -q -n 8 -p no:cacheprovider --timeout 150 \
            tests/test_cuda_backend.py tests/test_ops_validation.py tests/test_ops_backends.py \
            tests/test_ops_edge_cases.py tests/test_ops_sampling_frequency.py \
            tests/test_triton_backend_smoke.py tests/test_philox.py \
            "tests/test_ta_sft.py::test_fused_loss_equals_the_plain_one_in_value_and_gradients" \
            "tests/test_ta_sft.py::test_fused_loss_does_not_depend_on_the_chunking_and_skips_frozen_weights"
        ;;
    generate)
        ensure_model
        run 60 engine_smoke $PY - "$MODEL" <<'EOF'
import sys, time, torch
from safedecode import methods
from safedecode.engine import SafeDecoder
from safedecode.models import load_model
model, tok = load_model(sys.argv[1], dtype="bfloat16", device="cuda")
dec = SafeDecoder(model, tok, methods.get("acd-text", alpha=0.5))
for b in (1, 8):
    t = time.perf_counter()
    out = dec.generate(["Why is the sky blue?"] * b, max_new_tokens=32, ignore_eos=True, seed=0)
    torch.cuda.synchronize()
    print(f"B={b}: {[len(r.token_ids) for r in out]} tokens in {time.perf_counter() - t:.2f} s")
# packed admission steps (decode + prefill in one forward) against two forwards, on the GPU
from safedecode.engine import SamplingParams
logits = {}
for packed in (True, False):
    eng = dec.engine(max_seqs=4, packed=packed)
    eng.add_request("Why is the sky blue?", SamplingParams(max_new_tokens=8, ignore_eos=True))
    eng.step()
    eng.add_request("Name three rivers in Europe.", SamplingParams(max_new_tokens=8))
    st = eng.state
    running = tuple(s.slot for s in eng._live.values() if s.slot >= 0)
    new = eng.scheduler.admit(st.free_slots)
    slots = tuple(st.acquire() for _ in new)
    with torch.no_grad():
        if packed:
            d, p = eng.runner.packed(st, running, slots, [s.built for s in new])
        else:
            d, p = eng.runner.decode(st, running), eng.runner.prefill(st, slots, [s.built for s in new])
    logits[packed] = torch.cat([d.flatten(0, 1), p.flatten(0, 1)]).float()
    print(f"packed={packed}: runner.pack={eng.runner.pack}")
diff = (logits[True] - logits[False]).abs().max().item()
same = (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean().item()
print(f"packed vs two forwards (bf16 logits): max |diff| {diff:.3g}, same argmax {same:.0%}")
EOF
        run 330 generate $PY -m safedecode bench generate --device cuda --dtype bfloat16 \
            --model "$MODEL" --repeats "${SD_REPEATS:-2}" --new-tokens "${SD_NEW_TOKENS:-128}" \
            --out "$RES/generate"
        ;;
    engine)  # continuous vs static batching, fork vs prefill (issue 12's targets) on the GPU
        ensure_model
        run 300 engine $PY benchmarks/bench_engine.py --device cuda --dtype bfloat16 \
            --model "$MODEL" --rate "${SD_RATE:-16}" --repeats "${SD_REPEATS:-2}" --out "$RES/engine"
        ;;
    deal)  # DeAL's search cost vs plain decoding and the naive baseline (issue 15) on the GPU
        ensure_model
        run 240 deal $PY benchmarks/bench_deal.py --device cuda --dtype bfloat16 --model "$MODEL" \
            --out "$RES/deal"
        ;;
    serve)  # issue 17's load benchmark on the GPU; needs the wheels of scripts/device_wheels.sh
        ensure_model
        if ! $PY -c "import fastapi, uvicorn" 2>/dev/null; then
            ls .whl/*.whl >/dev/null 2>&1 || { log "serve: no .whl/ (scripts/device_wheels.sh)"; continue; }
            $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/sd_site .whl/*.whl && export PYTHONPATH="/tmp/sd_site:$PYTHONPATH"
        fi
        run 420 serve $PY benchmarks/bench_serve.py --device cuda --dtype bfloat16 \
            --model "$MODEL" --max-prefill-tokens 0 --out "$RES/serve"
        ;;
    *) log "unknown stage $stage" ;;
    esac
done
log "done"
pack
