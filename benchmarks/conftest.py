"""pytest-benchmark versions of the ``safedecode bench`` cases (same definitions, smaller grid).

Not part of the normal test run (pytest's ``testpaths`` is ``tests/``); run them with

    pytest benchmarks/ --benchmark-only                      # table in the terminal
    pytest benchmarks/ --benchmark-only --benchmark-autosave # keep a run in .benchmarks/
    pytest-benchmark compare                                 # compare saved runs

``SAFEDECODE_BENCH_DEVICE=cpu|cuda`` picks the device (default: cuda when available).
"""

from __future__ import annotations

import os

import pytest
import torch

from safedecode.bench.machine import describe, require_device


def bench_device() -> str:
    return os.environ.get("SAFEDECODE_BENCH_DEVICE") or (
        "cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device() -> str:
    """The device the cases run on (a clear error when CUDA is asked for and missing)."""
    dev = bench_device()
    require_device(dev)
    return dev


def pytest_benchmark_update_machine_info(config, machine_info) -> None:
    """Add safedecode's machine description (CPU, cores, threads, versions, GPU) to each run."""
    machine_info["safedecode"] = describe(bench_device())
