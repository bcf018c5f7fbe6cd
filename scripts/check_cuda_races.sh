#!/usr/bin/env bash
# Run the CUDA kernels in the CPU emulator under ThreadSanitizer (csrc/cuda/emu/race_check.cpp):
# a missing __syncthreads around shared memory shows up as a data race. No GPU needed.
# Exits non-zero on a race or a build failure. Environment: CXX (default g++).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CXX=${CXX:-g++}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$CXX" -std=c++20 -O1 -g -fsanitize=thread -ffp-contract=off -DSD_EMULATE -pthread \
  "$ROOT/csrc/cuda/emu/race_check.cpp" -o "$TMP/race_check"
# V, shared-memory candidate capacity (0 = global-memory path), rule.
for args in "111 256 0" "1500 0 0" "1500 256 1" "3000 1024 0" "5000 128 1"; do
  # shellcheck disable=SC2086
  TSAN_OPTIONS="halt_on_error=1 exitcode=66" "$TMP/race_check" $args
done
echo "no data races"
