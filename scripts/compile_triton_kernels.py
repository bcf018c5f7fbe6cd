"""Compile-only check of the Triton kernels for a GPU target, without a GPU (ptxas included).

Drives the backend's host code through a decode-shaped sweep (batches shrinking 64 -> 1, mixed
per-row parameters, K = 1..3, both rules, the three output modes) on CPU tensors with the kernel
launches recorded instead of run, then:

* counts launches per call and the distinct compiled variants per logits dtype, using Triton's own
  specialisation binder for the target (so the count is what a GPU run would compile);
* compiles every variant to PTX and cubin for ``--arch`` and reads ``ptxas -v``: registers and
  spill bytes per kernel;
* counts the global loads of the score kernel (the pass over the logits) by vector width.

Usage: ``python scripts/compile_triton_kernels.py [--arch 90] [--check] [--json FILE]``
(TRITON_INTERPRET must be unset). ``--check`` exits non-zero when a limit is broken: more than 4
launches per call, more than 12 variants per dtype, spills, or scalar 16-bit loads of the logits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from safedecode.ops import params as P  # noqa: E402
from safedecode.ops import triton as backend  # noqa: E402

K = backend._K
KERNELS = ("_stats_kernel", "_score_kernel", "_select_kernel", "_logprobs_kernel")
MAX_LAUNCHES, MAX_VARIANTS = 4, 12
V = 128256  # Llama-3 vocabulary


class Recorder:
    """Stands in for a kernel: records (fn, grid, args, kwargs) instead of launching."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **kw: self.log.append((self.fn, tuple(grid), args, kw))


def sweep(dtype: torch.dtype, log: list) -> list[int]:
    """Run the host code over decode-shaped calls; returns the launch count of each call."""
    counts = []
    g = torch.Generator().manual_seed(0)
    for b in (64, 48, 33, 17, 8, 5, 3, 2, 1):
        for kk, rule, anchor in ((2, "linear", 0), (3, "linear", 2), (1, "linear", 0),
                                 (2, "union", 0), (2, "linear", 1)):
            logits = torch.empty(kk, b, V, dtype=dtype)
            w = [1.0, 0.5][:kk] if rule == "union" else [1.0, -0.5, 0.3][:kk]
            rows = dict(temperature=torch.rand(b, generator=g).mul(1.5) * (torch.arange(b) % 3 > 0),
                        top_k=torch.randint(0, 100, (b,), generator=g),
                        top_p=torch.rand(b, generator=g).clamp(min=0.5),
                        min_p=0.02, seed=torch.arange(b), step=3)
            for beta in (0.0, 0.1, torch.full((b,), 0.1)):
                for mode in ("sample", "sample+lp", "logprobs"):
                    p = P.prepare(logits, w, rule=rule, anchor=anchor, beta=beta,
                                  check_inputs=False, **rows)
                    before = len(log)
                    if mode == "logprobs":
                        backend.contrastive_logprobs(p)
                    else:
                        backend.contrastive_sample(p, mode == "sample+lp")
                    counts.append(len(log) - before)
    return counts


def variant_key(fn, target_backend, args, kw):
    binder = create_function_from_signature(fn.signature, fn.params, target_backend)
    bound, spec, options = binder(*args, **kw)
    return repr(spec), (bound, spec, options)


def compile_variant(fn, target_backend, target, bound, spec, options, workdir: Path) -> dict:
    opts, signature, constexprs, attrs = fn._pack_args(target_backend, options, bound, spec,
                                                       options)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    t = time.time()
    compiled = triton.compile(src, target=target, options=opts.__dict__)
    secs = time.time() - t
    ptx = compiled.asm["ptx"]
    cubin = workdir / f"{fn.__name__}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    res = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True,
                         check=False)
    if res.returncode:
        raise RuntimeError(f"cuobjdump failed on {fn.__name__}: {res.stderr[-2000:]}")
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)
    regs, stack, local = int(usage.group(1)), int(usage.group(2)), int(usage.group(4))
    spill = stack + local  # a spill needs local memory (the stack frame); none is the goal
    loads = defaultdict(int)
    for m in re.finditer(r"ld\.global(?:\.[a-z]+)*?(\.v[248])?\.([bfsu]\d+)", ptx):
        loads[f"{m.group(1) or ''}.{m.group(2)}".lstrip(".")] += 1
    names = fn.arg_names
    modes = {names[path[0]]: v for path, v in constexprs.items()
             if names[path[0]] in ("RULE", "USE_STATS")}
    return dict(seconds=round(secs, 1), registers=regs, spill_bytes=spill, loads=dict(loads),
                variant=" ".join(f"{k}={int(v)}" for k, v in sorted(modes.items())))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--check", action="store_true", help="exit 1 if a limit is broken")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--dtypes", default="bfloat16,float16,float32")
    a = ap.parse_args()
    target = GPUTarget("cuda", a.arch, 32)
    target_backend = make_backend(target)
    backend._check = lambda p: None  # CPU tensors stand in for device ones: nothing is launched
    report = {"arch": a.arch, "V": V, "dtypes": {}}
    problems = []
    compiled_keys: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dname in a.dtypes.split(","):
            log: list = []
            saved = {n: getattr(K, n) for n in KERNELS}
            for n in KERNELS:
                setattr(K, n, Recorder(saved[n], log))
            try:
                counts = sweep(getattr(torch, dname), log)
            finally:
                for n, fn in saved.items():
                    setattr(K, n, fn)
            variants: dict[str, dict] = {}
            for fn, _grid, args, kw in log:
                key, packed = variant_key(fn, target_backend, args, kw)
                variants.setdefault(fn.__name__ + key, (fn, packed))
            per_kernel = defaultdict(int)
            for fn, _ in variants.values():
                per_kernel[fn.__name__] += 1
            figures = []
            for vk, (fn, packed) in variants.items():
                if vk not in compiled_keys:  # select / writer variants are shared across dtypes
                    compiled_keys[vk] = compile_variant(fn, target_backend, target, *packed,
                                                        workdir=Path(tmp))
                figures.append(dict(kernel=fn.__name__, **compiled_keys[vk]))
            entry = dict(calls=len(counts), max_launches=max(counts), variants=len(variants),
                         per_kernel=dict(per_kernel), kernels=figures)
            report["dtypes"][dname] = entry
            print(f"{dname}: {len(counts)} calls, <= {max(counts)} launches per call, "
                  f"{len(variants)} compiled variants {dict(per_kernel)}")
            for f in figures:
                print(f"  {f['kernel']:17s} {f['variant']:18s} regs {f['registers']:3d}  spill "
                      f"{f['spill_bytes']:4d} B  global loads {f['loads']}  ({f['seconds']}s)")
            if max(counts) > MAX_LAUNCHES:
                problems.append(f"{dname}: {max(counts)} launches in one call (> {MAX_LAUNCHES})")
            if len(variants) > MAX_VARIANTS:
                problems.append(f"{dname}: {len(variants)} variants (> {MAX_VARIANTS})")
            for f in figures:
                if f["spill_bytes"]:
                    problems.append(f"{dname}: {f['kernel']} spills {f['spill_bytes']} bytes")
                if (f["kernel"] in ("_score_kernel", "_stats_kernel") and dname != "float32"
                        and f["loads"].get("b16", 0)):
                    problems.append(f"{dname}: {f['kernel']} loads logits as scalar 16-bit values "
                                    f"({f['loads']})")
    from safedecode.ops import linear_emd  # the fused linear CE / EMD loss (TA-SFT)  # noqa: PLC0415

    le = linear_emd._kernels()
    for has_emd in (False, True):
        sig = {n: "i32" for n in le._linear_emd_rows.arg_names}
        sig.update(z_ptr="*fp32", c_ptr="*fp32", tgt_ptr="*i64", wce_ptr="*fp32",
                   wemd_ptr="*fp32", loss_ptr="*fp32", stride_z="i64", stride_c="i64",
                   HAS_EMD="constexpr", BLOCK="constexpr")
        src = ASTSource(fn=le._linear_emd_rows, signature=sig,
                        constexprs={"HAS_EMD": has_emd, "BLOCK": 4096})
        triton.compile(src, target=target, options={"num_warps": 4, "enable_fp_fusion": True})
        print(f"ok  _linear_emd_rows HAS_EMD={has_emd}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    for msg in problems:
        print("LIMIT:", msg)
    if a.check and problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
