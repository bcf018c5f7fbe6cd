"""TA-SFT's loss: the fused linear CE / EMD loss vs the plain one (full ``[T, V]`` logits).

For T ∈ {512, 2048, 8192} scored positions and V ∈ {49152 (SmolLM2), 128256 (Llama 3)}, d = 576,
fp32 on the CPU, half the positions CE (safe answers) and half EMD (harmful answers), forward +
backward w.r.t. the hidden states and the lm_head weight (full fine-tuning; with LoRA the weight
is frozen and the fused loss skips its gradient). Each (T, V, contender) runs in a fresh
subprocess: peak extra memory = peak RSS during the loss minus RSS just before it (inputs and
weights already allocated), time = median of the timed repetitions after one warm-up. The plain
loss is not run where its estimate exceeds ``--max-plain-gb`` (it would swap or be killed on this
24 GiB machine): those cells say so. Writes ``benchmarks/results/ta_sft_loss_cpu.md`` / ``.json``.

    python benchmarks/bench_ta_sft_loss.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "ta_sft_loss_cpu"
D = 576
TS = (512, 2048, 8192)
VS = (49152, 128256)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(t: int, v: int, impl: str, reps: int) -> dict:
    import torch

    from safedecode.ops.linear_emd import fused_linear_emd_loss, reference_loss

    torch.manual_seed(0)
    h = torch.randn(t, D)
    w = torch.randn(v, D) * 0.05
    unit = torch.nn.functional.normalize(torch.randn(v, D), dim=-1)
    tgt = torch.randint(0, v, (t,))
    safe = torch.arange(t) % 2 == 0
    wce = safe.float() / int(safe.sum())
    wemd = -1.0 * (~safe).float() / int((~safe).sum())
    fn = fused_linear_emd_loss if impl == "fused" else reference_loss

    def once() -> float:
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        t0 = time.perf_counter()
        fn(hh, ww, tgt, wce, wemd, unit).backward()
        dt = time.perf_counter() - t0
        assert torch.isfinite(hh.grad).all() and torch.isfinite(ww.grad).all()
        return dt

    base = _rss_mb() + 2 * (t + v) * D * 4 / 2**20  # + the cloned leaves and their grads
    times = [once() for _ in range(reps + 1)][1:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times.sort()
    return {"T": t, "V": v, "impl": impl, "s": times[len(times) // 2],
            "peak_extra_mb": max(0.0, peak - base), "reps": reps}


def plain_estimate_gb(t: int, v: int) -> float:
    """About five fp32 [T, V] buffers alive at once (logits, log-softmax, probs, cost, grads)."""
    return 5 * t * v * 4 / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T = 512 only, one repetition")
    ap.add_argument("--max-plain-gb", type=float, default=12.0)
    ap.add_argument("--child", nargs=4)
    a = ap.parse_args()
    if a.child:
        t, v, impl, reps = a.child
        print(json.dumps(child(int(t), int(v), impl, int(reps))))
        return
    from safedecode.bench.machine import describe, machine_line

    rows = []
    for t in TS[:1] if a.quick else TS:
        for v in VS:
            reps = 1 if a.quick or t * v > 2048 * 128256 else 3
            cell = {"T": t, "V": v}
            for impl in ("fused", "plain"):
                if impl == "plain" and plain_estimate_gb(t, v) > a.max_plain_gb:
                    cell[impl] = {"skipped": f"needs ~{plain_estimate_gb(t, v):.0f} GB"}
                    continue
                res = subprocess.run([sys.executable, __file__, "--child", str(t), str(v), impl,
                                      str(reps)], capture_output=True, text=True, check=False)
                cell[impl] = json.loads(res.stdout.strip().splitlines()[-1]) \
                    if res.returncode == 0 else {"failed": res.stderr.strip()[-300:]}
                print(t, v, impl, cell[impl], file=sys.stderr)
            rows.append(cell)
    cmd = "python benchmarks/bench_ta_sft_loss.py" + (" --quick" if a.quick else "")
    lines = ["# TA-SFT loss: fused linear CE / EMD vs the plain loss", "",
             f"`{cmd}` ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine_line(describe('cpu'))}.", "",
             f"d = {D}, fp32, forward + backward (grads of hidden states and lm_head weight), "
             "half the positions CE and half EMD; peak extra memory = peak RSS during the loss "
             "minus RSS before it; each cell a fresh process.", "",
             "| T | V | fused s | plain s | plain / fused time | fused peak MB | plain peak MB "
             "| plain / fused memory |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(c: dict, key: str, spec: str) -> str:
        return format(c[key], spec) if key in c else c.get("skipped", c.get("failed", "?"))[:40]

    for c in rows:
        f, p = c["fused"], c["plain"]
        both = "s" in f and "s" in p
        dt = f"**{p['s'] / f['s']:.2f}x**" if both else "-"
        dm = f"**{p['peak_extra_mb'] / max(f['peak_extra_mb'], 1):.1f}x**" if both else "-"
        lines.append(f"| {c['T']} | {c['V']} | {fmt(f, 's', '.2f')} | {fmt(p, 's', '.2f')} | "
                     f"{dt} | {fmt(f, 'peak_extra_mb', '.0f')} | {fmt(p, 'peak_extra_mb', '.0f')} "
                     f"| {dm} |")
    lines += ["", "The fused loss keeps one chunk of `rows × V` logits (64 MiB, plus the same for "
              "the cosine similarities when the chunk has EMD rows): its extra memory is flat in "
              "T and V apart from the weight gradient itself (V × d fp32, 113 MB at V = 49152, "
              "295 MB at V = 128256), which any loss must return.", ""]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    OUT.with_suffix(".json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=1))
    print(f"wrote {OUT}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
