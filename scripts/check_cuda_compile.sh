#!/usr/bin/env bash
# Compile every csrc/**/*.cu with `nvcc -c` for one architecture (quick syntax + ptxas check; no
# GPU needed) into a temporary directory. Exits non-zero if any file fails to compile.
#   scripts/check_cuda_compile.sh [--strict] [--verbose]
#     --strict   treat nvcc/host-compiler warnings as errors (-Werror all-warnings)
#     --verbose  print ptxas register / spill statistics
#     --usage    print one line per kernel: registers, spill bytes (ptxas -v, summarised)
# Environment: NVCC (default nvcc), CUDA_ARCH (default sm_90).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NVCC=${NVCC:-nvcc}
ARCH=${CUDA_ARCH:-sm_90}
STRICT=0
VERBOSE=0
USAGE=0
for arg in "$@"; do
  case "$arg" in
    --strict) STRICT=1 ;;
    --verbose) VERBOSE=1 ;;
    --usage) USAGE=1 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
command -v "$NVCC" >/dev/null || { echo "nvcc not found (set NVCC)" >&2; exit 127; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mapfile -t FILES < <(cd "$ROOT" && find csrc -name '*.cu' -not -path '*/emu/*' | sort)
if [ "${#FILES[@]}" -eq 0 ]; then
  echo "no .cu files under csrc/" >&2
  exit 1
fi

FLAGS=(-c -std=c++17 -O3 -arch="$ARCH" -Xcompiler -fPIC,-Wall,-Wextra)
[ "$STRICT" = 1 ] && FLAGS+=(-Werror all-warnings)
{ [ "$VERBOSE" = 1 ] || [ "$USAGE" = 1 ]; } && FLAGS+=(-Xptxas -v)

status=0
for f in "${FILES[@]}"; do
  obj="$TMP/$(echo "$f" | tr '/' '_').o"
  if (cd "$ROOT" && "$NVCC" "${FLAGS[@]}" "$f" -o "$obj") 2>"$TMP/log"; then
    echo "ok    $f ($ARCH)"
  else
    echo "FAIL  $f ($ARCH)"
    status=1
  fi
  if [ "$USAGE" = 1 ] && [ -s "$TMP/log" ]; then
    # "Compiling entry function 'X'" then "Used N registers" and "... spill stores, ... loads".
    awk '/Compiling entry function/ { match($0, /\x27[^\x27]+\x27/); name = substr($0, RSTART + 1, RLENGTH - 2) }
         /bytes spill stores/ { split($0, a, ","); st = a[2] + 0; ld = a[3] + 0 }
         /Used [0-9]+ registers/ { match($0, /Used [0-9]+/); r = substr($0, RSTART + 5, RLENGTH - 5);
           printf "      %-60s regs %3d  spill %d B\n", name, r, st + ld }' "$TMP/log" |
      { command -v c++filt >/dev/null && c++filt || cat; } |
      sed -E 's/safedecode::cuda:://g; s/\(safedecode::cuda::Params\)//; s/void //' | sort -u
  fi
  if [ -s "$TMP/log" ]; then
    if [ "$VERBOSE" = 1 ]; then
      cat "$TMP/log"
    else
      grep -v '^ptxas info' "$TMP/log" | grep -v 'bytes stack frame' || true
    fi
  fi
done
exit "$status"
