#!/usr/bin/env bash
# Build the C++ extension with AddressSanitizer + UBSan in a scratch copy of the tree and run the
# property (fuzz) tests and the cpp edge cases under it. Usage: scripts/sanitize.sh [pytest args]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp -r "$ROOT"/{setup.py,pyproject.toml,csrc,safedecode,triton_kernels,tests} "$WORK/"
rm -f "$WORK"/safedecode/*.so
cd "$WORK"
SAFEDECODE_SANITIZE=1 SAFEDECODE_NO_CUDA=1 "$PY" setup.py -q build_ext --inplace 2>&1 | grep -v "^copying" || true
test -f safedecode/_C*.so
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export SAFEDECODE_FUZZ_EXAMPLES=${SAFEDECODE_FUZZ_EXAMPLES:-2000}
PYTHONPATH="$WORK" "$PY" -c "import safedecode._C as c; print('sanitized build:', c.__file__)"
# (not `nm | grep -q`: with pipefail, grep exiting at the first match can fail the pipeline)
SYMS=$(nm -D "$WORK"/safedecode/_C*.so)
grep -q __asan_report <<<"$SYMS" || { echo "not an ASan build" >&2; exit 1; }
PYTHONPATH="$WORK" "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_cpp_properties.py tests/test_ops_edge_cases.py tests/test_ops_validation.py \
  -k "properties or cpp" "$@"
# the small-M GEMM (all ISA levels, strided rows, K/N tails) under the same build
PYTHONPATH="$WORK" "$PY" -m pytest -q -p no:cacheprovider tests/test_small_gemm.py -k "not decoder"
