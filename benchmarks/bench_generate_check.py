"""The generation table's core columns (transformers ``generate`` K = 1, naive K = 2, safedecode
K = 2) for B in {1, 8}, greedy and sampled, without the slower contenders: a check that the
request-level engine kept the table's ratios, on one machine in one run. Writes
``benchmarks/results/generate_check_cpu.md``. The full table: ``safedecode bench generate``.

    python benchmarks/bench_generate_check.py [--tokens 128] [--repeats 1]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from safedecode.bench.generate import Setup, prompts_for
from safedecode.bench.machine import describe, machine_line
from safedecode.bench.timing import measure_round_robin
from safedecode.models import DEFAULT_NAME

OUT = Path(__file__).parent / "results" / "generate_check_cpu.md"
NAMES = ("hf_plain", "naive_k2", "sd_k2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    st = Setup.load("cpu")
    rows = []
    for b in (1, 8):
        for mode in ("greedy", "sampled"):
            fns = st.generators(prompts_for(b), mode, args.tokens)
            res = measure_round_robin({n: fns[n] for n in NAMES}, device="cpu", warmup=1,
                                      repeats=args.repeats)
            tok = {n: b * args.tokens / res[n].median_s for n in NAMES}
            rows.append(f"| {b} | {mode} | " + " | ".join(f"{tok[n]:.1f}" for n in NAMES)
                        + f" | {tok['sd_k2'] / tok['hf_plain']:.2f} | "
                        f"{tok['sd_k2'] / tok['naive_k2']:.2f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    command = shlex.join(["python", "benchmarks/bench_generate_check.py", *sys.argv[1:]])
    OUT.write_text("\n".join([
        f"# Generation check after the request-level engine, {DEFAULT_NAME} (cpu)", "",
        f"`{command}` ({time.strftime('%Y-%m-%dT%H:%M:%S%z')})", "",
        machine_line(describe("cpu")), "",
        f"Tokens/s of whole calls, {args.tokens} new tokens per request (EOS ignored), K = 2 = "
        f"`acd-text`; round-robin, median of {args.repeats} after a warm-up. The columns of "
        "`generate_cpu.md` that the engine change could move (that table was measured on an "
        "Intel Xeon, this one on the machine named above).", "",
        "| B | mode | hf_plain | naive_k2 | sd_k2 | sd/hf plain | sd/naive |",
        "|---:|---|---:|---:|---:|---:|---:|", *rows, ""]))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
