"""Thin wrapper kept for old command lines: ``python benchmarks/bench_ops.py [OPTIONS]`` is
``safedecode bench ops [OPTIONS]`` (the code lives in ``safedecode/bench/``)."""

import sys

from safedecode.cli import app

if __name__ == "__main__":
    app(["bench", "ops", *sys.argv[1:]])
