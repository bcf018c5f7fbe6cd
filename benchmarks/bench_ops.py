"""Fused contrastive sampling vs the naive pipelines, one step of decoding.

Compares, for K = 2 (ACD-style ``lp_0 - 0.5 lp_1``) with temperature 0.7, top-k 50 and top-p 0.9:

* ``fused``: ``safedecode.ops.contrastive_sample`` on a fast backend (cpp here, triton/cuda on GPU);
* ``naive``: the reference backend (plain PyTorch: combine, mask, sort-based top-k/top-p, draw);
* ``hf``: the chain research code uses: two ``log_softmax``, combine, transformers'
  Temperature/TopK/TopP logits warpers, softmax and ``torch.multinomial``.

Every timing is a median over repeats of the whole call (Python overhead included), measured in
one run together with the machine's memory bandwidth (a large tensor copy, read + write bytes), so
ratios are meaningful on a noisy shared machine. Results go to ``benchmarks/results/ops_<device>``
as JSON and markdown.

    python benchmarks/bench_ops.py            # full grid
    python benchmarks/bench_ops.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from safedecode.ops import contrastive_sample, registry

ALPHA, TEMP, TOP_K, TOP_P = 0.5, 0.7, 50, 0.9


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "cpu": cpu,
        "logical_cores": torch.multiprocessing.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: str, min_time: float, max_reps: int) -> dict:
    """Median / min / max seconds of fn() over repeats after warm-up."""
    for _ in range(2):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "reps": len(times)}


def copy_bandwidth(device: str, nbytes: int = 256 << 20) -> float:
    """GB/s of a large tensor copy, counting bytes read + written (the STREAM convention)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, 1.0, 20)["min_s"]
    return 2 * nbytes / t / 1e9


def hf_chain(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """What the seed papers' code does: log_softmax x2, combine, HF warpers, multinomial."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    lp0 = torch.log_softmax(logits[0].float(), dim=-1)
    lp1 = torch.log_softmax(logits[1].float(), dim=-1)
    s = lp0 - ALPHA * lp1
    if beta > 0:
        s = s.masked_fill(lp0 < lp0.amax(dim=-1, keepdim=True) + math.log(beta), -math.inf)
    for warper in (TemperatureLogitsWarper(TEMP), TopKLogitsWarper(TOP_K), TopPLogitsWarper(TOP_P)):
        s = warper(None, s)
    return torch.multinomial(torch.softmax(s, dim=-1), 1)[:, 0]


def run(args: argparse.Namespace) -> dict:
    device = args.device
    fused = args.backend or ("cpp" if device == "cpu" else "cuda")
    registry.load(fused)
    dtype = getattr(torch, args.dtype)
    bw = copy_bandwidth(device)
    print(f"copy bandwidth: {bw:.1f} GB/s (read+write)", file=sys.stderr)
    rows = []
    for v in args.vocab:
        for b in args.batch:
            logits = (torch.randn(2, b, v, device=device) * 3).to(dtype)
            nbytes = logits.numel() * logits.element_size()
            seeds = torch.arange(b, device=device)
            for beta in args.beta:
                kw = dict(temperature=TEMP, top_k=TOP_K, top_p=TOP_P, beta=beta, seed=seeds)
                impls = {
                    "fused": lambda z=logits, kw=kw: contrastive_sample(z, [1.0, -ALPHA],
                                                                        backend=fused, **kw),
                    "naive": lambda z=logits, kw=kw: contrastive_sample(z, [1.0, -ALPHA],
                                                                        backend="reference", **kw),
                    "hf": lambda z=logits, beta=beta: hf_chain(z, beta),
                }
                res = {name: timeit(fn, device, args.min_time, args.max_reps)
                       for name, fn in impls.items()}
                f = res["fused"]["median_s"]
                row = {
                    "K": 2, "B": b, "V": v, "beta": beta, "dtype": args.dtype,
                    "fused_backend": fused,
                    **{f"{n}_us": r["median_s"] * 1e6 for n, r in res.items()},
                    **{f"{n}_us_min": r["min_s"] * 1e6 for n, r in res.items()},
                    **{f"{n}_us_max": r["max_s"] * 1e6 for n, r in res.items()},
                    "speedup_vs_naive": res["naive"]["median_s"] / f,
                    "speedup_vs_hf": res["hf"]["median_s"] / f,
                    "fused_GBps": nbytes / f / 1e9,
                    "fused_frac_copy_bw": nbytes / f / 1e9 / bw,
                }
                rows.append(row)
                print(f"V={v:>6} B={b:>3} beta={beta:<4} fused {row['fused_us']:9.1f} us  "
                      f"naive x{row['speedup_vs_naive']:6.1f}  hf x{row['speedup_vs_hf']:6.1f}  "
                      f"{row['fused_GBps']:6.2f} GB/s ({100 * row['fused_frac_copy_bw']:.0f}% of "
                      "copy bw)", file=sys.stderr)
    return {"benchmark": "ops", "device": device, "machine": machine(),
            "copy_bandwidth_GBps": bw, "params": {"alpha": ALPHA, "temperature": TEMP,
                                                  "top_k": TOP_K, "top_p": TOP_P},
            "command": " ".join(["python"] + sys.argv), "rows": rows}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Op benchmark ({result['device']})",
        "",
        f"`{result['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), GPU: {m['gpu'] or 'none'}. Copy bandwidth measured in "
        f"the same run: **{result['copy_bandwidth_GBps']:.1f} GB/s** (read + write).",
        "",
        "K = 2, temperature 0.7, top-k 50, top-p 0.9; medians of whole calls. `naive` = reference "
        "backend (PyTorch), `hf` = log_softmax + transformers warpers + multinomial.",
        "",
        "| V | B | beta | fused us | naive us | hf us | x naive | x hf | fused GB/s | % copy bw |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['V']} | {r['B']} | {r['beta']} | {r['fused_us']:.1f} | {r['naive_us']:.1f} | "
            f"{r['hf_us']:.1f} | {r['speedup_vs_naive']:.1f} | {r['speedup_vs_hf']:.1f} | "
            f"{r['fused_GBps']:.2f} | {100 * r['fused_frac_copy_bw']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small grid, short timings")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None, help="fused backend (default: cpp / cuda)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 49152, 128256, 151936])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--beta", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--max-reps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default=None, help="result file stem (default ops_<device>)")
    args = ap.parse_args(argv)
    if args.quick:
        args.vocab, args.batch, args.min_time, args.max_reps = [32000], [1, 8], 0.05, 5
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"ops_{args.device}{'_quick' if args.quick else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
