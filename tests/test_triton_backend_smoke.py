"""Triton-specific checks: vocabulary split across programs, the GPU launch sequence, radix-select
corner cases across many chunks, the Philox stream, and that every kernel compiles for sm_90.

The cross-backend comparisons live in tests/test_ops_*.py; here the chunking is forced small so
that a modest vocabulary spreads over dozens of programs per row under the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE
from helpers import assert_logprobs_close, make_logits

from safedecode.ops import contrastive_logprobs, contrastive_sample, philox, registry

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tb():
    registry.load("triton")
    from safedecode.ops import triton as mod

    return mod


@pytest.fixture
def many_chunks(tb, monkeypatch):
    """Chunks of 128 tokens (tiles of 64, radix tiles of 32): V = 2000 gives 16 programs a row."""

    def small(v: int):
        tile = max(16, min(64, triton_pow2(v)))
        chunk = max(tile, 128)
        return tb.Plan(chunk, -(-v // chunk), tile, min(32, tile), 4)

    monkeypatch.setattr(tb, "plan", small)
    return tb


def triton_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _both_lp(logits, w, **kw):
    return (contrastive_logprobs(logits, w, backend="reference", **kw),
            contrastive_logprobs(logits, w, backend="triton", **kw))


@pytest.mark.parametrize("interpreted", [False, True])
def test_plan_splits_the_vocabulary_at_batch_one(tb, monkeypatch, interpreted):
    monkeypatch.setattr(tb, "_interpreted", lambda: interpreted)
    for v in (32000, 151936):
        pl = tb.plan(v)
        assert pl.n_chunks > 1, "one program per row would scan the whole vocabulary"
        assert pl.n_chunks * pl.chunk >= v > (pl.n_chunks - 1) * pl.chunk
        assert pl.chunk % pl.tile == 0 and pl.chunk % pl.radix_tile == 0
    assert tb.plan(151936).n_chunks >= (5 if interpreted else 64)


def test_grid_is_batch_by_chunks(many_chunks, monkeypatch):
    tb = many_chunks
    grids = []
    for name in ("_score_kernel", "_radix_kernel", "_final_kernel"):
        kernel = getattr(tb._K, name)

        class Spy:
            def __init__(self, k=kernel, n=name):
                self.k, self.n = k, n

            def __getitem__(self, grid):
                grids.append((self.n, tuple(grid)))
                return self.k[grid]

        monkeypatch.setattr(tb._K, name, Spy())
    logits = make_logits(2, 1, 2000, device=DEVICE)
    contrastive_sample(logits, [1.0, -0.5], top_k=7, top_p=0.9, seed=0, backend="triton")
    assert grids and all(g == (1, 16) for _, g in grids), grids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_launch_sequence_matches(many_chunks, monkeypatch, dtype):
    """On a GPU every radix pass is launched (idle rows return at once); on CPU idle passes are
    skipped. Both sequences give the same tokens and log-probs."""
    logits = make_logits(3, 4, 700, dtype, seed=11, device=DEVICE)
    w = [1.0, -0.4, 0.3]
    kw = dict(temperature=torch.tensor([0.7, 0.0, 1.3, 1.0]), top_k=torch.tensor([0, 5, 40, 1]),
              top_p=torch.tensor([0.9, 1.0, 0.5, 0.99]), min_p=0.01, beta=0.05)
    seeds = torch.arange(4)
    outs = []
    for skip in (True, False):
        monkeypatch.setattr(many_chunks, "SKIP_IDLE_PASSES", skip)
        tok, lp = contrastive_sample(logits, w, seed=seeds, return_logprobs=True, backend="triton",
                                     **kw)
        outs.append((tok, lp, contrastive_logprobs(logits, w, backend="triton", **kw)))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(outs[0][2], outs[1][2])
    ref = contrastive_logprobs(logits, w, backend="reference", **kw)
    assert_logprobs_close(ref, outs[0][2])


@pytest.mark.parametrize("v", [1, 129, 2000])
def test_many_chunks_match_reference(many_chunks, v):
    logits = make_logits(2, 3, v, seed=v, device=DEVICE)
    w = torch.tensor([[1.0, -0.5], [1.5, 0.0], [0.8, 0.6]])
    kw = dict(temperature=torch.tensor([0.0, 0.8, 1.2]),
              top_k=torch.tensor([3, 0, 50]).clamp(max=v), top_p=torch.tensor([0.9, 0.7, 1.0]),
              min_p=torch.tensor([0.0, 0.02, 0.0]))
    ref, out = _both_lp(logits, w, **kw)
    assert_logprobs_close(ref, out)
    seeds = torch.tensor([5, 6, 7])
    r_tok = contrastive_sample(logits, w, seed=seeds, backend="reference", **kw)
    t_tok = contrastive_sample(logits, w, seed=seeds, backend="triton", **kw)
    assert torch.equal(r_tok, t_tok)  # fp64 masses: the same draw as the reference


def test_radix_select_ties_and_extremes(many_chunks):
    """Heavy ties (every digit of the key resolved), k at either end, p tiny or 1, min_p = 1."""
    v = 500
    base = torch.arange(v, dtype=torch.float32).remainder(7).div(2)  # 7 distinct values, tied
    logits = base.expand(1, 2, v).clone()
    logits[0, 1] = 0.0  # one fully tied row
    for kw in (dict(top_k=1), dict(top_k=150), dict(top_k=v - 1), dict(top_k=v),
               dict(top_p=1e-6), dict(top_p=0.5), dict(top_p=0.999999), dict(min_p=1.0),
               dict(top_k=300, top_p=0.3, temperature=0.3)):
        ref, out = _both_lp(logits, [1.0], **kw)
        assert torch.equal(torch.isfinite(ref), torch.isfinite(out)), kw
        assert_logprobs_close(ref, out)


def test_bf16_scores_with_ties_and_neg_inf(many_chunks):
    logits = make_logits(2, 3, 1500, torch.bfloat16, scale=1.0, seed=3, device=DEVICE)
    logits[1, :, ::3] = float("-inf")
    for kw in (dict(top_k=20), dict(top_p=0.8, temperature=0.5), dict(top_k=64, top_p=0.95),
               dict(beta=0.2, top_k=10)):
        ref, out = _both_lp(logits, [1.0, -0.7], **kw)
        assert_logprobs_close(ref, out)


def test_philox_stream_matches_python(tb):
    g = torch.Generator().manual_seed(0)
    seeds = torch.cat([torch.randint(0, 2**62, (300,), generator=g),
                       torch.tensor([0, 1, 2**32 - 1, 2**32, 2**63 - 1, -1, -(2**40)])])
    steps = torch.cat([torch.randint(0, 2**40, (300,), generator=g),
                       torch.tensor([0, 0, 7, 2**32 + 5, 2**62, 3, 2**33])])
    assert torch.equal(tb.philox_uniform(seeds, steps), philox.uniform(seeds, steps))


def test_non_contiguous_views_many_chunks(many_chunks):
    """Strided K and B dims read in place. (Offsets past 2^31 elements are covered by
    test_ops_edge_cases.py::test_row_offsets_beyond_int32; the kernels do all row / branch
    offset math in int64 and take the strides as unspecialised 64-bit-capable scalars.)"""
    base = make_logits(4, 6, 700, torch.float16, seed=9, device=DEVICE)
    view = base[::2, ::2]  # K and B both strided
    assert not view.is_contiguous()
    for kw in (dict(temperature=0.0), dict(top_k=9, seed=1), dict(top_p=0.7, seed=2)):
        r = contrastive_sample(view, [1.0, -0.3], backend="reference", **kw)
        t = contrastive_sample(view, [1.0, -0.3], backend="triton", **kw)
        assert torch.equal(r, t)


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every kernel variant lowers to a cubin (catches code only the interpreter accepts)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_triton_kernels.py")],
                         check=False, env=env, capture_output=True, text=True,
                         timeout=600)
    if "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ptxas in this triton install")
    assert res.returncode == 0, res.stderr[-3000:]
