"""``SafeDecoder(compile=True)`` at B = 1 greedy, K = 2 (ACD text prompts), against eager K = 2 and
transformers ``generate`` (K = 1), on the embedded model; the same measurement as the generation
benchmark's compiled section, on its own. Writes ``benchmarks/results/compile_cpu.{md,json}``.

    python benchmarks/bench_compile.py [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from safedecode.bench.generate import GenConfig, Setup, run_compiled
from safedecode.bench.machine import describe, machine_line
from safedecode.models import DEFAULT_NAME

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.tokens < 1 or args.repeats < 1:
        ap.error("--tokens and --repeats: must be >= 1")
    cfg = GenConfig(new_tokens=args.tokens, repeats=args.repeats)
    st = Setup.load("cpu")
    t0 = time.perf_counter()
    r = run_compiled(st, cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    r["wall_s"] = time.perf_counter() - t0
    r["command"] = shlex.join(["python", "benchmarks/bench_compile.py", *sys.argv[1:]])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_cpu.json").write_text(json.dumps(r, indent=1))
    md = [f"# `SafeDecoder(compile=True)`, {DEFAULT_NAME} (cpu)", "",
          f"`{r['command']}` ({time.strftime('%Y-%m-%dT%H:%M:%S%z')})", "",
          machine_line(describe("cpu")), "",
          f"B = 1, greedy, {args.tokens} new tokens (EOS ignored), ACD-style K = 2 (`acd-text`); "
          f"tokens/s of whole calls (median of {args.repeats} round-robin runs after a warm-up).",
          "", "| contender | tokens/s | s per call |", "|---|---:|---:|",
          *(f"| {n} | {r[f'{n}_tok_s']:.1f} | {r[f'{n}_s']:.2f} |"
            for n in ("hf_plain", "sd_k2", "sd_k2_compiled")), "",
          f"Compiled K = 2 / transformers `generate` K = 1: **{r['compiled_vs_hf_plain']:.2f}x**; "
          f"compiled / eager K = 2: {r['compiled_vs_eager']:.2f}x. First call (compiling): "
          f"{r['first_call_s']:.0f} s.", ""]
    (args.out / "compile_cpu.md").write_text("\n".join(md))
    print(f"wrote {args.out / 'compile_cpu.md'}")


if __name__ == "__main__":
    main()
