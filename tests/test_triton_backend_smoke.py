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
        return tb.Plan(chunk, -(-v // chunk), tile, min(32, tile), 4, 8)

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
        assert pl.chunk % pl.tile == 0 and pl.chunk % pl.select_tile == 0
    assert tb.plan(151936).n_chunks >= (5 if interpreted else 64)


KERNELS = ("_stats_kernel", "_score_kernel", "_select_kernel", "_logprobs_kernel")


@pytest.fixture
def launches(many_chunks, monkeypatch):
    """Record (kernel name, grid) of every launch."""
    tb = many_chunks
    log = []
    for name in KERNELS:
        kernel = getattr(tb._K, name)

        class Spy:
            def __init__(self, k=kernel, n=name):
                self.k, self.n = k, n

            def __getitem__(self, grid):
                log.append((self.n, tuple(grid)))
                return self.k[grid]

        monkeypatch.setattr(tb._K, name, Spy())
    return log


def test_grid_is_batch_by_chunks_and_select_is_per_row(launches):
    logits = make_logits(2, 1, 2000, device=DEVICE)
    contrastive_logprobs(logits, [1.0, -0.5], top_k=7, top_p=0.9, beta=0.1, backend="triton")
    names = [n for n, _ in launches]
    assert names == list(KERNELS), names
    for name, grid in launches:
        assert grid == ((1,) if name == "_select_kernel" else (1, 16)), (name, grid)


@pytest.mark.parametrize("case", ["sample", "logprobs", "beta-tensor", "union", "greedy"])
def test_at_most_four_launches_per_call(launches, case):
    """The launch sequence is fixed by host-known facts only (no device read): stats when the
    union rule or a plausibility mask may need it, score, select, and the log-probs writer."""
    logits = make_logits(2, 3, 2000, device=DEVICE)
    w = [1.0, -0.5]
    if case == "sample":
        contrastive_sample(logits, w, top_k=5, top_p=0.8, seed=1, backend="triton")
        expected = ["_score_kernel", "_select_kernel"]  # beta is the scalar 0: no stats pass
    elif case == "logprobs":
        contrastive_logprobs(logits, w, top_p=0.8, beta=0.1, backend="triton")
        expected = list(KERNELS)
    elif case == "beta-tensor":
        contrastive_sample(logits, w, beta=torch.tensor([0.0, 0.1, 0.0]), seed=1,
                           backend="triton")
        expected = ["_stats_kernel", "_score_kernel", "_select_kernel"]
    elif case == "union":
        contrastive_sample(logits, [1.0, 0.5], rule="union", seed=1, backend="triton")
        expected = ["_stats_kernel", "_score_kernel", "_select_kernel"]
    else:
        contrastive_sample(logits, w, temperature=0.0, backend="triton")
        expected = ["_score_kernel", "_select_kernel"]
    assert [n for n, _ in launches] == expected


def test_select_reads_the_row_twice_not_per_digit(many_chunks):
    """Top-k and top-p: two full-row passes (bucket histogram, compaction of the candidates); the
    radix digits, top-p, the final mass and the draw read the candidate list. (The previous
    design read the row in up to 16 radix passes plus the final one.)"""
    tb = many_chunks
    v = 2000
    logits = make_logits(2, 4, v, scale=4.0, seed=5, device=DEVICE)
    kw = dict(top_k=torch.tensor([50, 0, 50, 0]), top_p=torch.tensor([0.9, 0.9, 1.0, 1.0]),
              temperature=torch.tensor([0.8, 1.0, 1.0, 1.0]))
    r = contrastive_sample(logits, [1.0, -0.5], seed=3, backend="reference", **kw)
    t = contrastive_sample(logits, [1.0, -0.5], seed=3, backend="triton", **kw)
    assert torch.equal(r, t)
    passes, reads = tb.last_trace[:, 0].tolist(), tb.last_trace[:, 1].tolist()
    assert passes == [2, 2, 2, 1], passes  # row 3: no search, only the final mass over the row
    assert all(rd < 4 * v for rd in reads), reads
    greedy = contrastive_sample(logits, [1.0, -0.5], temperature=0.0, top_k=5, backend="triton")
    assert torch.equal(greedy, contrastive_sample(logits, [1.0, -0.5], temperature=0.0, top_k=5,
                                                  backend="reference"))
    assert tb.last_trace[:, 0].tolist() == [0, 0, 0, 0]  # greedy rows: the argmax only


def test_bad_rows_give_an_all_neg_inf_distribution(tb):
    """One convention on every backend: token -1, log-prob NaN, log-distribution all -inf."""
    logits = make_logits(2, 3, 300, device=DEVICE)
    logits[0, 1, 7] = float("nan")
    logits[0, 2] = float("-inf")
    kw = dict(check_inputs=False)
    out = contrastive_logprobs(logits, [1.0, -0.5], backend="triton", **kw)
    ref = contrastive_logprobs(logits, [1.0, -0.5], backend="reference", **kw)
    assert torch.isneginf(out[1:]).all() and torch.isneginf(ref[1:]).all()
    assert_logprobs_close(ref[:1], out[:1])
    tok, lp = contrastive_sample(logits, [1.0, -0.5], seed=0, return_logprobs=True,
                                 backend="triton", **kw)
    assert tok[1:].tolist() == [-1, -1] and torch.isnan(lp[1:]).all() and tok[0] >= 0


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
    base = torch.arange(v, dtype=torch.float32, device=DEVICE).remainder(7).div(2)  # 7 values
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
    got = tb.philox_uniform(seeds.to(DEVICE), steps.to(DEVICE))  # the kernels' device
    assert torch.equal(got.cpu(), philox.uniform(seeds, steps))


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


def test_kernels_compile_for_sm90_within_the_limits():
    """The compile-only check (also run by `make test`): every variant of a decode-shaped sweep
    lowers to a cubin for sm_90, <= 4 launches per call, <= 12 variants per dtype, no spills,
    vector loads of 16-bit logits."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_triton_kernels.py"),
                          "--check"], check=False, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    for dtype in ("bfloat16", "float16", "float32"):
        line = next(x for x in res.stdout.splitlines() if x.startswith(dtype + ":"))
        assert "<= 4 launches per call" in line or "<= 3 launches per call" in line, line


def test_select_geometry_override(tb, monkeypatch):
    """SAFEDECODE_TRITON_SELECT sets the select kernel's tile and warps (what gpu_check's
    --select-sweep times); bad values name the variable."""
    monkeypatch.setenv(tb.SELECT_ENV, "2048x16")
    monkeypatch.setattr(tb, "_interpreted", lambda: False)
    pl = tb.plan(128256)
    assert (pl.select_tile, pl.select_warps) == (2048, 16)
    assert tb.plan(100).select_tile == 128  # never wider than the row
    for bad in ("2048", "1000x8", "2048x3", "x", "32768x8"):
        monkeypatch.setenv(tb.SELECT_ENV, bad)
        with pytest.raises(ValueError, match=tb.SELECT_ENV):
            tb.plan(1000)
    monkeypatch.delenv(tb.SELECT_ENV)
    assert (tb.plan(128256).select_tile, tb.plan(128256).select_warps) == (512, 8)


@pytest.mark.parametrize("select_tile", [16, 256], ids=lambda t: f"select{t}")
def test_select_tile_wider_or_narrower_than_chunks_matches_reference(tb, monkeypatch,
                                                                     select_tile):
    """The select program's tiles need not line up with the score kernel's chunks."""
    monkeypatch.setattr(tb, "plan", lambda v: tb.Plan(128, -(-v // 128), 64, select_tile, 4, 2))
    v = 2000
    logits = make_logits(2, 3, v, seed=3, device=DEVICE)
    w = torch.tensor([[1.0, -0.5], [1.5, 0.0], [0.8, 0.6]])
    kw = dict(temperature=torch.tensor([0.7, 0.8, 1.2]), top_k=torch.tensor([50, 0, 5]),
              top_p=torch.tensor([0.9, 0.7, 1.0]), beta=0.1)
    ref, out = _both_lp(logits, w, **kw)
    assert_logprobs_close(ref, out)
    seeds = torch.tensor([5, 6, 7])
    r_tok = contrastive_sample(logits, w, seed=seeds, backend="reference", **kw)
    t_tok = contrastive_sample(logits, w, seed=seeds, backend="triton", **kw)
    assert torch.equal(r_tok, t_tok)


def test_plausibility_mask_spares_the_select_its_row_passes(many_chunks):
    """The ACD step (a plausibility mask, top-k above the plausible count, top-p): the score
    kernel hands the select its chunks' finite indices, so the select reads only those (no
    full-row pass), across 16 chunks, equal to the reference in tokens and log-probs; a mask
    that keeps more than GATHER_MAX tokens falls back to the two passes."""
    tb = many_chunks
    v = 2000
    logits = make_logits(2, 4, v, scale=3.0, seed=8, device=DEVICE)
    kw = dict(top_k=torch.tensor([50, 0, 3, 2000]), top_p=torch.tensor([0.9, 0.8, 1.0, 0.5]),
              temperature=torch.tensor([0.7, 1.0, 1.3, 0.9]), beta=0.1)
    seeds = torch.arange(4)
    r = contrastive_sample(logits, [1.0, -0.5], seed=seeds, backend="reference", **kw)
    t = contrastive_sample(logits, [1.0, -0.5], seed=seeds, backend="triton", **kw)
    assert torch.equal(r, t)
    plausible = torch.isfinite(contrastive_logprobs(logits, [1.0, -0.5], beta=0.1,
                                                    backend="reference")).sum(1)
    passes, reads = tb.last_trace[:, 0].tolist(), tb.last_trace[:, 1]
    assert passes == [0, 0, 0, 0], passes
    assert (reads <= plausible * 4 + 64).all(), (reads, plausible)  # list work + one draw tile
    ref, out = _both_lp(logits, [1.0, -0.5], **{k: x for k, x in kw.items()})
    assert_logprobs_close(ref, out)
    wide = make_logits(2, 2, 6000, scale=0.5, seed=9, device=DEVICE)  # ~all tokens plausible
    kw = dict(top_k=50, top_p=0.9, temperature=0.8, beta=1e-6)
    r = contrastive_sample(wide, [1.0, -0.5], seed=seeds[:2], backend="reference", **kw)
    t = contrastive_sample(wide, [1.0, -0.5], seed=seeds[:2], backend="triton", **kw)
    assert torch.equal(r, t) and tb.last_trace[:, 0].tolist() == [2, 2]
