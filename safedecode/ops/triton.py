"""Triton backend: allocates outputs and scratch, plans the grid, launches the kernels.

The kernels live in ``safedecode.triton_kernels.contrastive_sample`` (see its docstring for the
pass structure). Every pass runs on a ``(B, C)`` grid: the vocabulary is cut into ``C`` chunks even
at ``B = 1``. The chunk and tile sizes depend only on ``V`` (never on ``B``), so a row's arithmetic,
and hence its token, is the same alone or inside any batch.

On a GPU the launch sequence is static (no host sync: 1 stats + 1 score + 2 * ND radix + 1 final +
1 sample/logprobs = 20 launches with 4-bit digits), so a decode step can be captured in a CUDA
graph. On a machine without a GPU the kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), with larger tiles, and the passes that no
row needs are skipped (reading the parameters costs nothing there).
"""

from __future__ import annotations

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

RADIX_BITS = 4  # digit width of the top-k / top-p radix select
NB = 1 << RADIX_BITS
NS = 16  # row-state fields (see the kernels)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def load() -> None:
    """Raise RuntimeError if the kernels cannot run here."""
    if not _interpreted() and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (set TRITON_INTERPRET=1 before importing triton to run "
                           "the kernels on CPU tensors through Triton's interpreter)")


def _levels(bits: int = RADIX_BITS) -> list[tuple[int, int, int]]:
    """Radix digits of the 31-bit key, most significant first: (shift, digit mask, higher bits)."""
    out, hi = [], 31
    while hi > 0:
        lo = max(hi - bits, 0)
        out.append((lo, (1 << (hi - lo)) - 1, 0x7FFFFFFF & ~((1 << hi) - 1)))
        hi = lo
    return out


LEVELS = _levels()


@dataclass(frozen=True)
class Plan:
    """Launch geometry for one vocabulary size."""

    chunk: int  # tokens per program (a multiple of both tiles)
    n_chunks: int  # C: programs per row
    tile: int  # lanes of the streaming kernels
    radix_tile: int  # lanes of the radix kernel ([tile, NB] one-hot histograms)
    num_warps: int


def plan(v: int) -> Plan:
    """Chunking for vocabulary ``v`` (never the batch): on a GPU at most 128 chunks of at least one
    1024-token tile (radix tiles of 256); under the interpreter at most 8 larger chunks."""
    if _interpreted():
        tile_max, radix_max, max_chunks = 8192, 4096, 8
    else:
        tile_max, radix_max, max_chunks = 1024, 256, 128
    tile = max(16, min(tile_max, triton.next_power_of_2(v)))
    chunk = max(tile, triton.next_power_of_2(triton.cdiv(v, max_chunks)))
    return Plan(chunk, triton.cdiv(v, chunk), tile, min(radix_max, tile), 4)


def _check(p: Prepared) -> None:
    dev = p.logits.device
    if dev.type != "cuda" and not _interpreted():
        raise ValueError(f"logits: the triton backend needs CUDA tensors, got {dev}")


# Host-side shortcuts, used only when the parameters live on the CPU (the interpreter): reading a
# CUDA tensor would cost a device sync per step, so on a GPU every pass is launched and the kernels
# of rows with nothing to do return at once. Tests switch this off to run the GPU's sequence.
SKIP_IDLE_PASSES = True


def _hints(p: Prepared, need: int) -> tuple[bool, bool, bool]:
    """(stats pass needed, any row runs top-k, any row runs top-p); all True on a GPU."""
    if p.logits.device.type == "cuda" or not SKIP_IDLE_PASSES:
        return True, True, True
    v = p.logits.shape[2]
    rows = torch.ones_like(p.temperature, dtype=torch.bool) if need else p.temperature > 0
    stats = p.rule == 1 or bool((p.log_beta > float("-inf")).any())
    any_k = bool((rows & (p.top_k > 0) & (p.top_k < v)).any())
    any_p = bool((rows & (p.top_p < 1.0)).any())
    return stats, any_k, any_p


def _still_active(state: torch.Tensor, slot: int, mode: int) -> bool:
    """Whether any row's search ``mode`` is still running after launch ``slot`` (CPU only)."""
    if state.device.type == "cuda" or not SKIP_IDLE_PASSES:
        return True
    return bool(state[slot, :, _K.F_KACT.value if mode == 0 else _K.F_PACT.value].any())


def _run(p: Prepared, need: int, out: torch.Tensor | None = None):
    """Launch every pass up to the final masses. ``need``: 0 sample, 1 sample + log-probs, 2 the
    log-probs op (whose ``out`` [B, V] buffer doubles as the score scratch).

    Returns (scores S, row state, final chunk masses, plan, state slot of the final state).
    """
    _check(p)
    z = p.logits
    k, b, v = z.shape
    dev = z.device
    pl = plan(v)
    c = pl.n_chunks
    cp = triton.next_power_of_2(c)
    grid = (b, c)
    f32, f64, i32, i64 = torch.float32, torch.float64, torch.int32, torch.int64
    use_stats, any_k, any_p = _hints(p, need)
    stats = torch.empty(b, c, 5, dtype=f32, device=dev)
    scores = out if out is not None else torch.empty(b, v, dtype=f32, device=dev)
    spart = torch.empty(b, c, dtype=f32, device=dev)
    sarg = torch.empty(b, c, dtype=i64, device=dev)
    sflag = torch.empty(b, c, dtype=i32, device=dev)
    nd = len(LEVELS)
    state = torch.empty(2 * nd + 1, b, NS, dtype=f64, device=dev)
    cnt = torch.empty(2, b, c, NB, dtype=i32, device=dev)
    mass = torch.empty(2, b, c, NB, dtype=f64, device=dev)
    fmass = torch.empty(b, c, dtype=f64, device=dev)
    sk, sb = z.stride(0), z.stride(1)
    opts = dict(num_warps=pl.num_warps, enable_fp_fusion=False)

    if use_stats:
        _K._stats_kernel[grid](z, sk, sb, stats, v, c, pl.chunk, ANCHOR=p.anchor, RULE=p.rule,
                               TILE=pl.tile, **opts)
    _K._score_kernel[grid](z, sk, sb, p.weights, p.log_beta, stats, scores, spart, sarg, sflag,
                           v, c, pl.chunk, K=k, ANCHOR=p.anchor, RULE=p.rule,
                           USE_STATS=use_stats, CP=cp, TILE=pl.tile, **opts)
    common = (spart, sarg, sflag, p.temperature, p.top_k, p.top_p)
    slot, prev, prev_level = 0, -1, 0  # launch counter; MODE and digit of the previous launch
    for mode, wanted in ((0, any_k), (1, any_p)):
        for level in range(nd if wanted else 0):
            shift, dmask, hi_mask = LEVELS[level]
            _K._radix_kernel[grid](scores, state, cnt, mass, *common, b, v, c, pl.chunk, slot,
                                   prev_level, LEVELS[prev_level][0], shift, dmask, hi_mask,
                                   MODE=mode, PREV=prev, NEED=need, CP=cp, NB=NB,
                                   TILE=pl.radix_tile, **opts)
            slot, prev, prev_level = slot + 1, mode, level
            if not _still_active(state, slot - 1, mode):
                break  # every row has its threshold: the next launch folds nothing in
    _K._final_kernel[grid](scores, state, cnt, mass, *common, p.log_min_p, fmass, b, v, c,
                           pl.chunk, slot, prev_level, LEVELS[prev_level][0], PREV=prev,
                           NEED=need, CP=cp, NB=NB, TILE=pl.tile, **opts)
    return scores, state, fmass, pl, slot


def contrastive_sample(
    p: Prepared, return_logprobs: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Tokens [B] int64, chosen log-probs [B] fp32 (or None) and the per-row status [B] int32."""
    _, b, v = p.logits.shape
    dev = p.logits.device
    scores, state, fmass, pl, slot = _run(p, 1 if return_logprobs else 0)
    tokens = torch.empty(b, dtype=torch.int64, device=dev)
    status = torch.empty(b, dtype=torch.int32, device=dev)
    lps = torch.empty(b, dtype=torch.float32, device=dev) if return_logprobs else None
    c = pl.n_chunks
    _K._sample_kernel[(b,)](scores, state, fmass, p.temperature, p.log_min_p, p.seed, p.step,
                            tokens, lps if lps is not None else tokens, status, b, v, c, pl.chunk,
                            slot, NEED_LP=return_logprobs, CP=triton.next_power_of_2(c),
                            TILE=pl.tile, num_warps=pl.num_warps, enable_fp_fusion=False)
    return tokens, lps, status


def contrastive_logprobs(p: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """Final normalised log-distribution [B, V] fp32 (-inf outside the final set), status [B]."""
    _, b, v = p.logits.shape
    dev = p.logits.device
    out = torch.empty(b, v, dtype=torch.float32, device=dev)
    status = torch.empty(b, dtype=torch.int32, device=dev)
    scores, state, fmass, pl, slot = _run(p, 2, out=out)
    c = pl.n_chunks
    _K._logprobs_kernel[(b, c)](scores, state, fmass, p.temperature, p.log_min_p, out, status,
                                b, v, c, pl.chunk, slot, CP=triton.next_power_of_2(c),
                                TILE=pl.tile, num_warps=pl.num_warps, enable_fp_fusion=False)
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
