"""Thin wrapper kept for old command lines: ``python benchmarks/bench_generate.py [OPTIONS]`` is
``safedecode bench generate [OPTIONS]`` (the code lives in ``safedecode/bench/``)."""

import sys

from safedecode.cli import app

if __name__ == "__main__":
    app(["bench", "generate", *sys.argv[1:]])
