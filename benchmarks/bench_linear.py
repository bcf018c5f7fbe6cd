"""The decode-time linear layers of the default model: torch's GEMM vs safedecode's small-M GEMM.

Streams the weight shapes of SmolLM2-135M (30 layers of q/k/v/o/gate/up/down + the 49152 x 576
lm_head, 538 MB fp32, random values: far larger than the caches, so every call reads its weights
from DRAM, as in a real decode step) for M = 1..16 input rows. The layers are ``nn.Linear``
modules called as the model calls them: on torch's GEMM, and inside ``small_gemm_linears`` (the
engine's path), alternating per pass (median of 7 passes each). Reports ms per pass, weight GB/s
and the ratio measured in the same run, the largest difference from torch on the lm_head; then
the same in cache (a 1024-row layer, GFLOP/s: the kernel's compute rate) and the Python cost of
one module call on a 16 x 16 layer. Writes ``benchmarks/results/linear_cpu.md``.

    python benchmarks/bench_linear.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from safedecode import _C
from safedecode.bench.machine import describe, machine_line
from safedecode.ops.linear import small_gemm_linears

OUT = Path(__file__).parent / "results" / "linear_cpu.md"
HIDDEN, INTER, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
ROWS = (1, 2, 4, 8, 16, 24, 32, 48, 64)


def layers() -> torch.nn.ModuleList:
    torch.manual_seed(0)
    shapes = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTER, HIDDEN),
              (INTER, HIDDEN), (HIDDEN, INTER)] * LAYERS + [(VOCAB, HIDDEN)]
    return torch.nn.ModuleList(torch.nn.Linear(k, n, bias=False) for n, k in shapes)


def one_pass(mods: torch.nn.ModuleList, xs: dict[int, torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for mod in mods:
        mod(xs[mod.in_features])
    return time.perf_counter() - t0


def warm_us(k: int, m: int, calls: int = 400) -> tuple[float, float]:
    """µs per call of one in-cache ``nn.Linear(k, 1024 or 16)`` on m rows: (torch, routed)."""
    mod = torch.nn.Linear(k, 1024 if k > 16 else 16, bias=False)
    x = torch.randn(m, k)
    out = []
    for routed in (False, True):
        with small_gemm_linears(mod, enabled=routed):
            for _ in range(20):
                mod(x)
            t0 = time.perf_counter()
            for _ in range(calls):
                mod(x)
            out.append((time.perf_counter() - t0) / calls * 1e6)
    return out[0], out[1]


def main() -> None:
    mods = layers()
    nbytes = sum(p.numel() * 4 for p in mods.parameters())
    lines = ["# Decode-time linear layers: torch `F.linear` vs safedecode's small-M GEMM", "",
             f"`python benchmarks/bench_linear.py` ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine_line(describe('cpu'))}. Small-M GEMM ISA: {_C.cpu_isa()}.", "",
             f"One pass = every linear layer of SmolLM2-135M once ({len(mods)} matrices, "
             f"{nbytes / 1e6:.0f} MB fp32, cold in cache); median of 7 passes per contender, "
             "alternated.", "",
             "| rows M | torch ms | small-M ms | torch GB/s | small-M GB/s | torch / small-M "
             "| max abs diff (lm_head) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    with torch.no_grad():
        for m in ROWS:
            xs = {k: torch.randn(m, k) for k in (HIDDEN, INTER)}
            head = mods[-1]
            with small_gemm_linears(head):
                err = (head(xs[HIDDEN]) - F.linear(xs[HIDDEN], head.weight)).abs().max().item()
            t = {"torch": [], "small": []}
            for _ in range(8):
                t["torch"].append(one_pass(mods, xs))
                with small_gemm_linears(mods):
                    t["small"].append(one_pass(mods, xs))
            tt, ts = (statistics.median(v[1:]) for v in (t["torch"], t["small"]))
            row = (f"| {m} | {tt * 1e3:.1f} | {ts * 1e3:.1f} | {nbytes / tt / 1e9:.1f} | "
                   f"{nbytes / ts / 1e9:.1f} | **{tt / ts:.2f}** | {err:.1e} |")
            print(row, file=sys.stderr)
            lines.append(row)
        lines += ["", "In cache: one 1024 x K layer called 400 times (µs per call, GFLOP/s):", "",
                  "| K | rows M | torch µs | small-M µs | torch GFLOP/s | small-M GFLOP/s |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for k in (HIDDEN, INTER):
            for m in (2, 8, 16, 32, 64):
                tt, ts = warm_us(k, m)
                flop = 2 * m * 1024 * k
                row = (f"| {k} | {m} | {tt:.1f} | {ts:.1f} | {flop / tt / 1e3:.0f} | "
                       f"{flop / ts / 1e3:.0f} |")
                print(row, file=sys.stderr)
                lines.append(row)
        tt, ts = warm_us(16, 2)
        lines += ["", f"Python cost of one module call, 16 x 16 layer, 2 rows: torch {tt:.2f} µs, "
                  f"routed {ts:.2f} µs.", ""]
        print(lines[-2], file=sys.stderr)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
