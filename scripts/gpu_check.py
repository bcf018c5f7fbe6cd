"""The GPU check: in a few minutes on one GPU, every fused backend against the reference, CUDA-graph
capture and replay, and timing as a fraction of HBM bandwidth and against the torch pipeline.

    python scripts/gpu_check.py        # GPU: writes benchmarks/results/gpu_check_cuda.{json,md}
    python scripts/gpu_check.py --smoke --out /tmp/x   # CPU: the same checks on small shapes
                                       # (cpp, Triton interpreted), no graphs; a test runs it

Correctness (each backend vs ``backend="reference"`` on the same device):
* tokens of mixed per-row parameters (greedy, temperature, top-k, top-p, min-p, beta) and the
  Philox draw end to end (same seed and step, same token), log-probs of the final distribution;
* the union rule (SafeInfer), K = 1..3, bf16 / fp16 / fp32;
* bad rows with ``check_inputs=False``: token -1, log-prob NaN, log-distribution all -inf, the
  other rows unaffected;
* batch invariance: a row alone and inside a batch of 64 gives the same token and log-prob bits;
* the Philox uniforms of the device against the Python stream.

CUDA graphs: a captured ``contrastive_sample_with_status`` replayed on new logits and steps equals
the eager call. Timing: B in {1, 8, 64, 256}, V = 128256, bf16, K = 2 (ACD-style step: temperature
0.7, top-k 50, top-p 0.9, beta 0.1); logits bytes over the median time, against the HBM bandwidth
(nominal where the GPU is known, and a measured copy's) and against the torch pipeline
(``reference``) and FlashInfer when importable. Targets: >= 50% of HBM at B >= 64, >= 2x the torch
pipeline at every B.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the interpreter must be on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safedecode.bench.machine import copy_bandwidth  # noqa: E402
from safedecode.bench.ops import OpCase, flashinfer_sampler, implementations, make_logits  # noqa: E402
from safedecode.bench.timing import measure  # noqa: E402
from safedecode.ops import contrastive_logprobs, contrastive_sample, philox, registry  # noqa: E402
from safedecode.ops import contrastive_sample_with_status as sample_with_status  # noqa: E402

NOMINAL_HBM_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
                    "A100-SXM4-80GB": 2039.0, "A100": 1555.0, "L40S": 864.0}
W3 = [1.0, -0.5, 0.25]


def _row_params(b: int, v: int, seed: int, device: str) -> dict:
    g = torch.Generator().manual_seed(seed)

    def pick(opts):
        return torch.tensor(opts)[torch.randint(len(opts), (b,), generator=g)].to(device)

    seed = torch.randint(0, 2**62, (b,), generator=g).to(device)
    return dict(temperature=pick([0.0, 0.5, 1.0, 1.7]),
                top_k=pick([0, 1, 5, 50, 2000]).clamp(max=v), top_p=pick([1.0, 0.95, 0.6, 1e-4]),
                min_p=pick([0.0, 0.0, 0.05]), beta=pick([0.0, 0.1, 0.5]), seed=seed,
                step=pick([0, 1, 2**33]))


def _logits(k: int, b: int, v: int, dtype: torch.dtype, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, b, v, generator=g) * 3.0).to(dtype).to(device)


def _compare(backend: str, logits, w, **kw) -> dict:
    """Tokens / log-probs of ``backend`` against the reference on the same inputs."""
    ref_t, ref_lp = contrastive_sample(logits, w, backend="reference", return_logprobs=True, **kw)
    out_t, out_lp = contrastive_sample(logits, w, backend=backend, return_logprobs=True, **kw)
    kw_lp = {k: v for k, v in kw.items() if k not in ("seed", "step")}
    ref_d = contrastive_logprobs(logits, w, backend="reference", **kw_lp)
    out_d = contrastive_logprobs(logits, w, backend=backend, **kw_lp)
    both = torch.isfinite(ref_d) & torch.isfinite(out_d)
    support_diff = int((torch.isfinite(ref_d) ^ torch.isfinite(out_d)).sum())
    return dict(rows=int(ref_t.numel()), token_mismatches=int((ref_t != out_t).sum()),
                max_lp_diff=float((ref_lp - out_lp).abs().max()) if ref_lp.numel() else 0.0,
                dist_support_diff=support_diff,
                dist_max_diff=float((ref_d - out_d)[both].abs().max()) if both.any() else 0.0)


def correctness(backend: str, device: str, smoke: bool) -> dict:
    big = 4099 if smoke else 128256
    cases = [(2, 1, big, torch.bfloat16), (3, 7, 32000 if not smoke else 2053, torch.float16),
             (2, 64 if not smoke else 9, big, torch.bfloat16), (1, 5, 4099, torch.float32)]
    out = {"random": [], "union": None, "bad_rows": None, "batch_invariance": None}
    for i, (k, b, v, dt) in enumerate(cases):
        logits = _logits(k, b, v, dt, seed=i, device=device)
        r = _compare(backend, logits, W3[:k], **_row_params(b, v, 100 + i, device))
        r.update(K=k, B=b, V=v, dtype=str(dt).split(".")[-1])
        out["random"].append(r)
    logits = _logits(2, 8, 3001 if smoke else 50257, torch.bfloat16, seed=9, device=device)
    out["union"] = _compare(backend, logits, [1.0, 0.7], rule="union", temperature=0.8, top_p=0.9,
                            seed=torch.arange(8, device=device))
    logits = _logits(2, 4, 2000, torch.float32, seed=10, device=device)
    logits[0, 1, 5] = float("nan")
    logits[0, 2] = float("-inf")
    tok, lp = contrastive_sample(logits, [1.0, -0.5], seed=3, return_logprobs=True,
                                 backend=backend, check_inputs=False)
    dist = contrastive_logprobs(logits, [1.0, -0.5], backend=backend, check_inputs=False)
    good = contrastive_sample(logits[:, [0, 3]], [1.0, -0.5], seed=3, backend=backend)
    out["bad_rows"] = dict(
        ok=bool(tok[1:3].eq(-1).all() and torch.isnan(lp[1:3]).all()
                and torch.isneginf(dist[1:3]).all() and torch.equal(tok[[0, 3]], good)),
        tokens=tok.tolist())
    logits = _logits(2, 64, 4099 if smoke else 128256, torch.bfloat16, seed=11, device=device)
    seeds = torch.arange(64, device=device)
    inv = []
    for rule, w in (("linear", [1.0, -0.5]), ("union", [1.0, 0.7])):
        kw = dict(rule=rule, temperature=0.9, top_k=50, top_p=0.9, beta=0.1)
        t_all, lp_all = contrastive_sample(logits, w, seed=seeds, return_logprobs=True,
                                           backend=backend, **kw)
        same = True
        for row in (0, 17, 63):
            t1, lp1 = contrastive_sample(logits[:, row:row + 1], w, seed=seeds[row:row + 1],
                                         return_logprobs=True, backend=backend, **kw)
            same &= bool(t1[0] == t_all[row]) and bool(lp1[0].view(torch.int32)
                                                       == lp_all[row].view(torch.int32))
        inv.append(dict(rule=rule, ok=same))
    out["batch_invariance"] = inv
    out["ok"] = (all(r["token_mismatches"] == 0 and r["dist_support_diff"] == 0
                     for r in out["random"] + [out["union"]])
                 and out["bad_rows"]["ok"] and all(x["ok"] for x in inv))
    return out


def philox_check(device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**62, (4096,), generator=g)
    steps = torch.randint(0, 2**40, (4096,), generator=g)
    want = philox.uniform(seeds, steps)
    res = {}
    for name in registry.BACKENDS:
        try:
            mod = registry.load(name)
        except RuntimeError:
            continue
        fn = getattr(mod, "philox_uniform", None)
        if fn is not None and name != "reference":
            res[name] = bool(torch.equal(fn(seeds.to(device), steps.to(device)).cpu(), want))
    return res


def graph_check(backend: str) -> dict:
    """Capture one sampling step in a CUDA graph; replay on new logits / steps vs eager."""
    b, v = 8, 128256
    static = _logits(2, b, v, torch.bfloat16, seed=20, device="cuda")
    step = torch.zeros(b, dtype=torch.int64, device="cuda")
    kw = dict(temperature=torch.full((b,), 0.7, device="cuda"), top_k=50, top_p=0.9, beta=0.1,
              seed=torch.arange(b, device="cuda"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: compile, allocate
            sample_with_status(static, [1.0, -0.5], backend=backend, step=step, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_tok, _, g_status = sample_with_status(static, [1.0, -0.5], backend=backend, step=step,
                                                **kw)
    ok = True
    for i in range(3):
        static.copy_(_logits(2, b, v, torch.bfloat16, seed=30 + i, device="cuda"))
        step.fill_(i + 1)
        graph.replay()
        eager, _, _ = sample_with_status(static, [1.0, -0.5], backend=backend, step=step, **kw)
        ok &= bool(torch.equal(g_tok, eager)) and not bool(g_status.any())
    return dict(ok=ok, replays=3)


def kernel_times(backends: list[str], batches=(1, 64), reps: int = 20) -> dict:
    """Device time per kernel of one call (torch.profiler, mean over ``reps`` calls) and the
    call's wall time, for the timing case at each B: where the time of a call goes."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    out = {}
    for be in backends:
        for b in batches:
            case = OpCase(b=b, v=128256, beta=0.1, dtype="bfloat16")
            fn = implementations(make_logits(case, "cuda"), case, [be])["fused"]
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) / reps
            kernels = {}
            for e in prof.key_averages():
                dev_us = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
                if e.device_type.name == "CUDA" and dev_us > 0:
                    kernels[e.key[:80]] = dev_us / reps
            out[f"{be}_B{b}"] = dict(wall_us=wall * 1e6, device_us=sum(kernels.values()),
                                     kernels=dict(sorted(kernels.items(), key=lambda x: -x[1])))
            print(f"  {be} B={b}: wall {wall * 1e6:.0f} us, kernels " + ", ".join(
                f"{k} {v:.1f}" for k, v in list(out[f'{be}_B{b}']['kernels'].items())[:6]),
                flush=True)
    return out


SELECT_SWEEP = ("512x8", "1024x8", "1024x16", "2048x16")  # 512x8: the default


def select_sweep(configs=SELECT_SWEEP, device: str = "cuda", v: int = 128256, b: int = 64,
                 times_fn=None) -> dict:
    """The Triton select kernel's tile x warps (``SAFEDECODE_TRITON_SELECT``): its device time at
    B = 1 and 64 (``kernel_times``) and tokens against the reference on the timing case and on
    mixed rows, per setting. (Compile-only for sm_90: 2048x16 spills 56 B, 4096x32 640 B.)"""
    from safedecode.ops import triton as tb  # noqa: PLC0415

    out = {}
    saved = os.environ.get(tb.SELECT_ENV)
    try:
        for cfg in configs:
            os.environ[tb.SELECT_ENV] = cfg
            times = (times_fn or kernel_times)(["triton"], batches=(1, 64), reps=20)
            case = OpCase(b=b, v=v, beta=0.1, dtype="bfloat16")
            logits = make_logits(case, device)
            kw = dict(temperature=0.7, top_k=50, top_p=0.9, beta=0.1,
                      seed=torch.arange(b, device=device))
            mixed = _logits(2, b, v, torch.bfloat16, seed=41, device=device)
            out[cfg] = dict(
                select_us={n: next((t for k, t in times[f"triton_B{n}"]["kernels"].items()
                                    if "select" in k), float("nan")) for n in (1, 64)},
                wall_us={n: times[f"triton_B{n}"]["wall_us"] for n in (1, 64)},
                mismatches=_compare("triton", logits, [1.0, -0.5], **kw)["token_mismatches"]
                + _compare("triton", mixed, [1.0, -0.5],
                           **_row_params(b, v, 42, device))["token_mismatches"])
            print(f"  select {cfg}: {out[cfg]}", flush=True)
    finally:
        if saved is None:
            os.environ.pop(tb.SELECT_ENV, None)
        else:
            os.environ[tb.SELECT_ENV] = saved
    return out


def nominal_hbm(name: str) -> float | None:
    for key, bw in NOMINAL_HBM_GBPS.items():
        if key in name:
            return bw
    return None


def timing(backends: list[str], device: str, smoke: bool, min_time: float) -> dict:
    copy_bw = copy_bandwidth(device, nbytes=(16 << 20) if smoke else (1 << 30), max_reps=10)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    hbm = nominal_hbm(name) if device == "cuda" else None
    rows = []
    for b in ((1, 8) if smoke else (1, 8, 64, 256)):
        case = OpCase(b=b, v=4099 if smoke else 128256, beta=0.1, dtype="bfloat16")
        logits = make_logits(case, device)
        nbytes = logits.numel() * logits.element_size()
        fns = implementations(logits, case, backends)
        fns.pop("hf", None)
        row = {"B": b, "V": case.v, "K": case.k, "dtype": case.dtype, "logits_bytes": nbytes}
        for fname, fn in fns.items():
            label = backends[0] if fname == "fused" else fname
            t = measure(fn, device=device, min_time=min_time, min_reps=3, max_reps=200).median_s
            row[f"{label}_us"] = t * 1e6
        for be in backends:
            t = row[f"{be}_us"] / 1e6
            row[f"{be}_GBps"] = nbytes / t / 1e9
            row[f"{be}_frac_copy_bw"] = row[f"{be}_GBps"] / copy_bw
            if hbm:
                row[f"{be}_frac_hbm"] = row[f"{be}_GBps"] / hbm
            row[f"{be}_vs_torch"] = row["naive_us"] / row[f"{be}_us"]
            if "flashinfer_us" in row:
                row[f"{be}_vs_flashinfer"] = row["flashinfer_us"] / row[f"{be}_us"]
        rows.append(row)
        print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()), flush=True)
    targets = {}
    for be in backends:
        frac = [r.get(f"{be}_frac_hbm", r[f"{be}_frac_copy_bw"]) for r in rows if r["B"] >= 64]
        targets[be] = dict(hbm_50pct_at_B64plus=bool(frac) and min(frac) >= 0.5,
                           torch_2x_every_B=all(r[f"{be}_vs_torch"] >= 2.0 for r in rows))
    return dict(gpu=name, nominal_hbm_GBps=hbm, copy_bandwidth_GBps=copy_bw,
                flashinfer=flashinfer_sampler() is not None and device == "cuda", rows=rows,
                targets=targets)


def write_md(report: dict, path: Path) -> None:
    lines = [f"# Fused op on {report['device']}", "",
             f"Command: `{report['command']}` ({report['seconds']:.0f} s, "
             f"commit {report['commit']})",
             "", "## Correctness against the reference", ""]
    for be, c in report["correctness"].items():
        lines.append(f"- **{be}**: {'ok' if c['ok'] else 'FAILED'}; token mismatches "
                     f"{[r['token_mismatches'] for r in c['random']]}, union "
                     f"{c['union']['token_mismatches']}, bad rows {c['bad_rows']['ok']}, batch "
                     f"invariance {[x['ok'] for x in c['batch_invariance']]}")
    lines.append(f"- Philox uniforms equal to the Python stream: {report['philox']}")
    for be, g in report.get("graphs", {}).items():
        lines.append(f"- CUDA graph capture + replay ({be}): {'ok' if g.get('ok') else g}")
    t = report["timing"]
    lines += ["", "## Timing (K = 2, bf16, temperature 0.7, top-k 50, top-p 0.9, beta 0.1)", "",
              f"GPU {t['gpu']}; nominal HBM {t['nominal_hbm_GBps']} GB/s; measured copy "
              f"{t['copy_bandwidth_GBps']:.0f} GB/s; FlashInfer: {t['flashinfer']}", ""]
    bes = report["backends"]
    head = ["B", "V"] + [f"{be} us" for be in bes] + ["torch us"] + \
        [f"{be} % HBM" for be in bes] + [f"{be} vs torch" for be in bes]
    if t["flashinfer"]:
        head += ["flashinfer us"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in t["rows"]:
        cells = [str(r["B"]), str(r["V"])] + [f"{r[f'{be}_us']:.1f}" for be in bes] + \
            [f"{r['naive_us']:.1f}"] + \
            [f"{100 * r.get(f'{be}_frac_hbm', r[f'{be}_frac_copy_bw']):.1f}" for be in bes] + \
            [f"{r[f'{be}_vs_torch']:.2f}x" for be in bes]
        if t["flashinfer"]:
            cells.append(f"{r.get('flashinfer_us', float('nan')):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Targets (>= 50% of HBM at B >= 64; >= 2x torch at every B): {t['targets']}",
              ""]
    if report.get("kernels") and "error" not in report["kernels"]:
        lines += ["## Where a call's time goes (torch.profiler, mean of 20 calls)", "",
                  "| case | wall us | device us | kernels (us) |", "|---|---|---|---|"]
        for case, r in report["kernels"].items():
            ks = "; ".join(f"`{k}` {v:.1f}" for k, v in r["kernels"].items())
            lines.append(f"| {case} | {r['wall_us']:.0f} | {r['device_us']:.0f} | {ks} |")
        lines.append("")
    elif report.get("kernels"):
        lines += [f"Kernel profile failed: {report['kernels']['error']}", ""]
    sw = report.get("select_sweep")
    if sw and "error" not in sw:
        lines += ["## Triton select kernel: tile x warps (`SAFEDECODE_TRITON_SELECT`)", "",
                  "| setting | select us B=1 | select us B=64 | call wall us B=1 | B=64 | "
                  "token mismatches vs reference |", "|---|---|---|---|---|---|"]
        for cfg, r in sw.items():
            lines.append(f"| {cfg} | {r['select_us'][1]:.1f} | {r['select_us'][64]:.1f} | "
                         f"{r['wall_us'][1]:.0f} | {r['wall_us'][64]:.0f} | {r['mismatches']} |")
        lines.append("")
    elif sw:
        lines += [f"Select sweep failed: {sw['error']}", ""]
    path.write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check_cuda",
                    help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--smoke", action="store_true", help="small shapes, no graphs (CPU)")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per timing")
    ap.add_argument("--select-sweep", action="store_true", help="GPU: also time the Triton "
                    "select kernel's tile x warps settings (SAFEDECODE_TRITON_SELECT)")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not a.smoke:
        print("no GPU here (torch.cuda.is_available() is False): nothing measured; run with "
              "--smoke for the CPU check of this script", file=sys.stderr)
        return 2
    t0 = time.time()
    status = registry.status()
    backends = [b for b in (("cuda", "triton") if device == "cuda" else ("cpp", "triton"))
                if status[b] == "ok"]
    print(f"device {device}; backends {status}", flush=True)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "torch": torch.__version__, "backends": backends, "backend_status": status,
              "correctness": {}, "graphs": {}}
    for be in backends:
        print(f"correctness: {be}", flush=True)
        report["correctness"][be] = correctness(be, device, a.smoke)
    report["philox"] = philox_check(device)
    if device == "cuda":
        for be in backends:
            try:
                report["graphs"][be] = graph_check(be)
            except Exception as exc:  # noqa: BLE001 - reported, not fatal: the rest still runs
                report["graphs"][be] = dict(ok=False, error=f"{type(exc).__name__}: {exc}")
        try:
            report["kernels"] = kernel_times(backends)
        except Exception as exc:  # noqa: BLE001 - a profiler problem must not lose the rest
            report["kernels"] = dict(error=f"{type(exc).__name__}: {exc}")
        if a.select_sweep and "triton" in backends:
            try:
                report["select_sweep"] = select_sweep()
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                report["select_sweep"] = dict(error=f"{type(exc).__name__}: {exc}")
    print("timing", flush=True)
    report["timing"] = timing(backends, device, a.smoke, a.min_time if not a.smoke else 0.02)
    report["seconds"] = time.time() - t0
    try:
        from safedecode.bench.machine import git_commit  # noqa: PLC0415

        report["commit"] = git_commit()
    except ImportError:
        report["commit"] = None
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    write_md(report, a.out.with_suffix(".md"))
    ok = all(c["ok"] for c in report["correctness"].values()) and all(report["philox"].values()) \
        and all(g.get("ok") for g in report["graphs"].values())
    print(f"{'ok' if ok else 'FAILED'}: {a.out.with_suffix('.json')} ({report['seconds']:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
