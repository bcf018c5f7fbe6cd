"""Triton backend: allocates outputs and scratch, plans the grid, launches the kernels.

The kernels live in ``safedecode.triton_kernels.contrastive_sample`` (see its docstring for the
pass structure): at most four launches per call (stats, score, select, and the log-probs writer for
``contrastive_logprobs``), on a geometry that depends only on ``V`` (never on ``B``), so a row's
arithmetic, and hence its token, is the same alone or inside any batch. No launch depends on a
value read back from the device, so a decode step can be captured in a CUDA graph.

On a machine without a GPU the kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), with larger tiles.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from .params import Prepared

try:
    from safedecode.triton_kernels import contrastive_sample as _K
except ImportError:  # source checkout without the package mapping: load the file directly
    _path = Path(__file__).resolve().parents[2] / "triton_kernels" / "contrastive_sample.py"
    _spec = importlib.util.spec_from_file_location("_safedecode_triton_kernels", _path)
    _K = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_K)

N_ROW = 4  # row record of the log-probs kernel
N_TRACE = 2  # select kernel's per-row trace: full-row passes, elements read

# Per-row [passes over the row, elements read] of the last call's select kernel (a device tensor,
# never read here: tests and benchmarks look at it).
last_trace: torch.Tensor | None = None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def load() -> None:
    """Raise RuntimeError if the kernels cannot run here."""
    if not _interpreted() and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (set TRITON_INTERPRET=1 before importing triton to run "
                           "the kernels on CPU tensors through Triton's interpreter)")


@dataclass(frozen=True)
class Plan:
    """Launch geometry for one vocabulary size."""

    chunk: int  # tokens per program of the (B, C) kernels (a multiple of ``tile``)
    n_chunks: int  # C: programs per row
    tile: int  # lanes of the (B, C) kernels
    select_tile: int  # lanes of the per-row select kernel ([tile, 16] histograms)
    num_warps: int
    select_warps: int

    @property
    def select_tiles(self) -> int:
        """Tiles of a row in the select kernel, rounded up to a power of two (its NT)."""
        return triton.next_power_of_2(triton.cdiv(self.n_chunks * self.chunk, self.select_tile))


SELECT_ENV = "SAFEDECODE_TRITON_SELECT"  # "<tile>x<warps>": the select kernel's geometry


@functools.lru_cache(maxsize=16)
def select_override(value: str | None) -> tuple[int, int] | None:
    """``(tile, warps)`` from a ``SAFEDECODE_TRITON_SELECT`` value such as ``2048x16`` (None when
    unset). The select program walks its row in tiles of ``tile`` lanes on ``warps`` warps: on a
    GPU it is latency-bound at small B (benchmarks/results/gpu_h200.md), so fewer, wider tiles
    may be faster; ``scripts/gpu_check.py --select-sweep`` times the choices."""
    if not value:
        return None
    try:
        tile, warps = (int(x) for x in value.lower().split("x"))
    except ValueError:
        raise ValueError(f"{SELECT_ENV}: expected <tile>x<warps> such as 1024x8, got "
                         f"{value!r}") from None
    if not 16 <= tile <= 8192 or tile & (tile - 1):
        raise ValueError(f"{SELECT_ENV}: tile must be a power of two in [16, 8192], got {tile}")
    if warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"{SELECT_ENV}: warps must be one of 1, 2, 4, 8, 16, 32, got {warps}")
    return tile, warps


def plan(v: int) -> Plan:
    """Chunking for vocabulary ``v`` (never the batch): on a GPU at most 128 chunks of at least one
    1024-token tile; under the interpreter at most 8 larger chunks. The select kernel's tile and
    warps: 512 x 8 on a GPU unless ``SAFEDECODE_TRITON_SELECT`` says otherwise."""
    if _interpreted():
        tile_max, select_max, max_chunks = 8192, 4096, 8
    else:
        tile_max, select_max, max_chunks = 1024, 512, 128
    tile = max(16, min(tile_max, triton.next_power_of_2(v)))
    chunk = max(tile, triton.next_power_of_2(triton.cdiv(v, max_chunks)))
    sel = select_override(os.environ.get(SELECT_ENV))
    if sel is None:
        select_tile, select_warps = min(select_max, tile), 8
    else:
        select_tile, select_warps = max(16, min(sel[0], triton.next_power_of_2(v))), sel[1]
    return Plan(chunk, triton.cdiv(v, chunk), tile, select_tile, 4, select_warps)


def _check(p: Prepared) -> None:
    dev = p.logits.device
    if dev.type != "cuda" and not _interpreted():
        raise ValueError(f"logits: the triton backend needs CUDA tensors, got {dev}")


def _needs_stats(p: Prepared) -> bool:
    """Whether the stats pass runs: the union rule, or a plausibility mask on some row. Known on
    the host without a sync (a scalar ``beta``), else assumed."""
    if p.rule == 1:
        return True
    if p.beta_off is not None:
        return not p.beta_off
    if p.log_beta.device.type == "cpu":  # the interpreter: reading costs nothing
        return bool((p.log_beta > float("-inf")).any())
    return True


def _run(p: Prepared, need: int, out: torch.Tensor | None = None):
    """Launch stats (if needed), score and select. ``need``: 0 sample, 1 sample + log-probs, 2 the
    log-probs op (whose ``out`` [B, V] buffer doubles as the score scratch).

    Returns (scores, tokens, log-probs, status, row records, plan)."""
    global last_trace
    _check(p)
    z = p.logits
    k, b, v = z.shape
    dev = z.device
    pl = plan(v)
    c = pl.n_chunks
    cp = triton.next_power_of_2(c)
    grid = (b, c)
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    use_stats = _needs_stats(p)
    stats = torch.empty(b, c, 5, dtype=f32, device=dev)
    scores = out if out is not None else torch.empty(b, v, dtype=f32, device=dev)
    spart = torch.empty(b, c, dtype=f32, device=dev)
    sarg = torch.empty(b, c, dtype=i64, device=dev)
    sflag = torch.empty(b, c, dtype=i32, device=dev)
    fcnt = torch.empty(b, c, dtype=i32, device=dev)  # finite scores per chunk (with a mask)
    ckey = torch.empty(b, v, dtype=i32, device=dev)  # candidate keys, indices; radix scratch
    cidx = torch.empty(b, v, dtype=i32, device=dev)
    work = torch.empty(b, v, dtype=i32, device=dev)
    rows = torch.empty(b, N_ROW, dtype=torch.float64, device=dev)
    trace = torch.empty(b, N_TRACE, dtype=i64, device=dev)
    tokens = torch.empty(b, dtype=i64, device=dev)
    status = torch.empty(b, dtype=i32, device=dev)
    lps = torch.empty(b, dtype=f32, device=dev) if need == 1 else None
    sk, sb = z.stride(0), z.stride(1)
    opts = dict(num_warps=pl.num_warps, enable_fp_fusion=False)

    if use_stats:
        _K._stats_kernel[grid](z, sk, sb, stats, p.anchor, v, c, CHUNK=pl.chunk, RULE=p.rule,
                               TILE=pl.tile, **opts)
    # With a plausibility mask (not the union rule's stats alone) the score kernel also writes
    # each chunk's finite indices into `work` (the select's radix scratch, free until then) and
    # their count into `fcnt`.
    compact = use_stats and p.beta_off is not True
    _K._score_kernel[grid](z, sk, sb, p.weights, p.log_beta, p.temperature, stats, scores, spart,
                           sarg, sflag, work, fcnt, k, p.anchor, need, v, c, CHUNK=pl.chunk,
                           RULE=p.rule, USE_STATS=use_stats, COMPACT=compact, CP=cp,
                           TILE=pl.tile, **opts)
    _K._select_kernel[(b,)](scores, spart, sarg, sflag, p.temperature, p.top_k, p.top_p,
                            p.log_min_p, p.seed, p.step, ckey, cidx, work, fcnt, rows, trace,
                            tokens, lps if lps is not None else scores, status, need, v, c, CP=cp,
                            NT=pl.select_tiles, TILE=pl.select_tile, CHUNK=pl.chunk,
                            GATHER=compact, num_warps=pl.select_warps, enable_fp_fusion=False)
    last_trace = trace
    return scores, tokens, lps, status, rows, pl


def contrastive_sample(
    p: Prepared, return_logprobs: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Tokens [B] int64, chosen log-probs [B] fp32 (or None) and the per-row status [B] int32."""
    _, tokens, lps, status, _, _ = _run(p, 1 if return_logprobs else 0)
    return tokens, lps, status


def contrastive_logprobs(p: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """Final normalised log-distribution [B, V] fp32 (-inf outside the final set and on bad rows),
    status [B]."""
    _, b, v = p.logits.shape
    out = torch.empty(b, v, dtype=torch.float32, device=p.logits.device)
    scores, _, _, status, rows, pl = _run(p, 2, out=out)
    _K._logprobs_kernel[(b, pl.n_chunks)](scores, rows, p.temperature, p.log_min_p, out, v,
                                          CHUNK=pl.chunk, TILE=pl.tile, num_warps=pl.num_warps,
                                          enable_fp_fusion=False)
    return out, status


def philox_uniform(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The kernels' Philox uniforms for int64 ``seed`` / ``step`` [N] (a test hook)."""
    seed = seed.to(torch.int64).contiguous()
    step = step.to(torch.int64).contiguous()
    out = torch.empty(seed.shape, dtype=torch.float64, device=seed.device)
    n = seed.numel()
    if n:
        _K._philox_kernel[(triton.cdiv(n, 256),)](seed, step, out, n, BLOCK=256)
    return out
