"""How short a common start is still worth sharing (``engine.prompts.MIN_SHARED_TOKENS``): one
call of ``n`` raw prompts that start with the same ``L`` tokens (then 24 tokens of their own),
one token generated, with leading-token sharing on (any whole 16-token block shared) against
off (``builder.share_tokens = False``), on the embedded model, ``plain`` and ``acd-text``. A
fresh decoder per call (nothing stored before), median of alternated runs. Writes
``benchmarks/results/min_shared_cpu.md``.

    python benchmarks/bench_min_shared.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

from safedecode import methods
from safedecode.bench.machine import describe, git_commit, machine_line
from safedecode.engine import SafeDecoder
from safedecode.engine import engine as engine_mod
from safedecode.engine import prompts as prompts_mod
from safedecode.models import load_default

OUT = Path(__file__).parent / "results" / "min_shared_cpu.md"
WORDS = ("apple river stone cloud forest candle window garden silver ocean thunder meadow "
         "lantern harbor pepper violin marble canyon feather copper").split()


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model, tok = load_default()
    prompts_mod.MIN_SHARED_TOKENS = engine_mod.MIN_SHARED_TOKENS = prompts_mod.TOKEN_BLOCK
    rows = []
    for name in ("plain", "acd-text"):
        for n in (2, 8):
            for length in (16, 32, 64):
                common = _text(0, length)
                batch = [f"{common} | {_text(i + 1, 24)}" for i in range(n)]
                shared = len(tok(common, add_special_tokens=False)["input_ids"])
                times: dict[bool, list[float]] = {True: [], False: []}
                for _ in range(args.repeats):
                    for share in (False, True):
                        dec = SafeDecoder(model, tok, methods.get(name))
                        dec.builder.share_tokens = share
                        t0 = time.perf_counter()
                        dec.generate(batch, raw=True, max_new_tokens=1)
                        times[share].append(time.perf_counter() - t0)
                off, on = (statistics.median(times[s]) for s in (False, True))
                rows.append(f"| `{name}` | {n} | {shared} | {off:.3f} | {on:.3f} | "
                            f"**{off / on:.2f}×** |")
                print(rows[-1], flush=True)
    OUT.write_text(f"""# The shortest common start worth sharing

`python {shlex.join(['benchmarks/bench_min_shared.py', *sys.argv[1:]])}`

{machine_line(describe("cpu"))}, commit {git_commit()}

One call of `n` raw prompts that start with the same tokens (then ~24 tokens of their own),
one token generated; leading-token sharing on (every whole 16-token block the prompts have in
common shared) against off; a fresh decoder per call, so the shared run is computed in the call
(its own forward) and copied into each request's rows. Median of {args.repeats} alternated
runs, seconds per call.

| method | n | common tokens | off: s | on: s | speed-up |
|---|---:|---:|---:|---:|---:|
""" + "\n".join(rows) + "\n")
    print(OUT.read_text())


if __name__ == "__main__":
    main()
