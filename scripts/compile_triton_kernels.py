"""Compile every Triton kernel variant for a GPU target without needing a GPU (ptxas included).

Usage: ``python scripts/compile_triton_kernels.py [--arch 90]`` (TRITON_INTERPRET must be unset).
Catches code that the interpreter accepts but the compiler rejects.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from safedecode.ops import triton as backend  # noqa: E402

K = backend._K
from safedecode.ops import linear_emd  # noqa: E402

LE = linear_emd._kernels()

# Pointer element types of every kernel argument that is a pointer; other names are scalars.
PTRS = {
    "logits": "*bf16", "stats": "*fp32", "S": "*fp32", "weights": "*fp32", "log_beta": "*fp32",
    "spart": "*fp32", "sarg": "*i64", "sflag": "*i32", "state": "*fp64", "cnt": "*i32",
    "mass": "*fp64", "temperature": "*fp32", "top_k": "*i64", "top_p": "*fp32",
    "log_min_p": "*fp32", "fmass": "*fp64", "seed": "*i64", "step": "*i64", "tokens": "*i64",
    "logprobs": "*fp32", "status_out": "*i32", "out": "*fp32",
}
SCALARS = {"sk": "i64", "sb": "i64"}


def compile_one(fn, constexprs: dict, arch: int) -> float:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in PTRS:
            sig[name] = PTRS[name]
        else:
            sig[name] = SCALARS.get(name, "i32")
    if fn is K._philox_kernel:
        sig.update(seed="*i64", step="*i64", out="*fp64")
    if fn is LE._linear_emd_rows:
        sig.update(z_ptr="*fp32", c_ptr="*fp32", tgt_ptr="*i64", wce_ptr="*fp32",
                   wemd_ptr="*fp32", loss_ptr="*fp32", stride_z="i64", stride_c="i64")
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    t = time.time()
    triton.compile(src, target=GPUTarget("cuda", arch, 32),
                   options={"enable_fp_fusion": False, "num_warps": 4})
    return time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    arch = ap.parse_args().arch
    pl = backend.plan(151936)
    cp = triton.next_power_of_2(pl.n_chunks)
    jobs = []
    for rule, kk in ((0, 1), (0, 3), (1, 2)):
        jobs.append((K._stats_kernel, dict(ANCHOR=0, RULE=rule, TILE=pl.tile)))
        for use_stats in (rule == 1, True):
            jobs.append((K._score_kernel, dict(K=kk, ANCHOR=kk - 1, RULE=rule,
                                               USE_STATS=use_stats, CP=cp, TILE=pl.tile)))
    for mode, prev in ((0, -1), (0, 0), (1, 0), (1, 1)):
        for need in (0, 1, 2):
            jobs.append((K._radix_kernel, dict(MODE=mode, PREV=prev, NEED=need, CP=cp,
                                               NB=backend.NB, TILE=pl.radix_tile)))
    for prev in (-1, 0, 1):
        for need in (0, 1, 2):
            jobs.append((K._final_kernel, dict(PREV=prev, NEED=need, CP=cp, NB=backend.NB,
                                               TILE=pl.tile)))
    for lp in (False, True):
        jobs.append((K._sample_kernel, dict(NEED_LP=lp, CP=cp, TILE=pl.tile)))
    jobs.append((K._logprobs_kernel, dict(CP=cp, TILE=pl.tile)))
    jobs.append((K._philox_kernel, dict(BLOCK=256)))
    # Integer arguments equal to 1 are specialised as constants at launch (V = 1, C = 1, slot 1).
    one = dict(V=1, C=1, slot=1)
    jobs.append((K._score_kernel, dict(K=2, ANCHOR=0, RULE=0, USE_STATS=True, CP=1, TILE=16, V=1,
                                       C=1)))
    jobs.append((K._radix_kernel, dict(MODE=1, PREV=0, NEED=1, CP=1, NB=backend.NB, TILE=16,
                                       **one)))
    jobs.append((K._final_kernel, dict(PREV=1, NEED=1, CP=1, NB=backend.NB, TILE=16, **one)))
    jobs.append((K._sample_kernel, dict(NEED_LP=True, CP=1, TILE=16, **one)))
    for has_emd in (False, True):  # the fused linear CE / EMD loss (TA-SFT)
        jobs.append((LE._linear_emd_rows, dict(HAS_EMD=has_emd, BLOCK=4096)))
    for fn, cx in jobs:
        dt = compile_one(fn, cx, arch)
        print(f"ok  {fn.__name__:18s} {dt:5.1f}s  {cx}")


if __name__ == "__main__":
    main()
