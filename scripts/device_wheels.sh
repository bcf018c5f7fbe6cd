#!/usr/bin/env bash
# Wheels the lent GPU machine lacks for `scripts/device_check.sh serve` (it has no package index):
# the `serve` extra's FastAPI stack for its Python 3.12 / x86-64, the versions of this checkout's
# .venv, into .whl/ (ignored by git: add `/.whl/` to .git/info/exclude). Carry `.whl` in the call.
set -euo pipefail
PY=${PY:-.venv/bin/python}
pkgs=(fastapi starlette uvicorn pydantic pydantic_core annotated-types typing-inspection
      annotated-doc opentelemetry-api typing_extensions)
want=()
for p in "${pkgs[@]}"; do
    v=$($PY -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p')
    [ -n "$v" ] || { echo "device_wheels: $p is not installed in $PY's environment" >&2; exit 2; }
    want+=("$p==$v")
done
mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${want[@]}"
ls .whl
