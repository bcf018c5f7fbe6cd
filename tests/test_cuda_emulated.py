"""The CUDA kernels' logic against the reference without a GPU: csrc/cuda compiled with g++ against
the CPU emulator (csrc/cuda/emu: a fiber per CUDA thread, barriers for __syncthreads and warp
shuffles). Covers the radix selects, the shared-memory candidate list and its global-memory
fallback, the ordered scans and the draw. Rounding of expf/logf is the host's, not the GPU's.
"""

from __future__ import annotations

import pytest
import torch
from cuda_emu import EmulatedBackend, build, missing
from helpers import assert_logprobs_close

from safedecode.ops import reference
from safedecode.ops.params import prepare

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WHY = missing()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"emulated CUDA build: {WHY}")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cuda_emu"))


def _problem(k, b, v, dtype, seed, rule="linear", quantised=False, dead=0.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, b, v, generator=g) * 3.0
    if quantised:  # many exact ties
        logits = logits.round()
    if dead:
        logits = logits.masked_fill(torch.rand(k, b, v, generator=g) < dead, float("-inf"))
        logits[:, :, 0] = 1.0
    w = torch.randn(b, k, generator=g)
    w[:, 0] = w[:, 0].abs() + 0.5
    if rule == "union":
        w[:, 1] = w[:, 1].abs() * 5
    pick = lambda opts: torch.tensor(opts)[torch.randint(len(opts), (b,), generator=g)]  # noqa: E731
    kw = dict(temperature=pick([0.0, 0.5, 1.0, 1.7]), top_k=pick([0, 1, 5, 50, v]).clamp(max=v),
              top_p=pick([1.0, 0.95, 0.6, 1e-4]), min_p=pick([0.0, 0.0, 0.05]),
              beta=pick([0.0, 0.0, 0.1, 0.5]),
              seed=torch.randint(0, 2**40, (b,), generator=g),
              step=torch.randint(0, 1000, (b,), generator=g))
    return prepare(logits.to(dtype), w, rule=rule, **kw)


def _compare(be: EmulatedBackend, p, exact_greedy: bool = True):
    ref_lp, ref_st = reference.contrastive_logprobs(p)
    out_lp, out_st = be.contrastive_logprobs(p)
    assert torch.equal(ref_st, out_st)
    assert_logprobs_close(ref_lp, out_lp)
    ref_tok, _, _ = reference.contrastive_sample(p, True)
    tok, lp, st = be.contrastive_sample(p, True)
    assert torch.equal(st, ref_st)
    bad = st != 0
    assert (tok[bad] == -1).all() and torch.isnan(lp[bad]).all()
    ok = ~bad
    chosen = ref_lp[ok].gather(1, tok[ok][:, None])[:, 0]
    assert torch.isfinite(chosen).all(), "sampled a token outside the reference's support"
    assert torch.allclose(lp[ok], chosen, atol=1e-3, rtol=0)
    greedy = p.temperature == 0
    if exact_greedy:
        assert torch.equal(tok[greedy], ref_tok[greedy])
    # Same Philox uniform, same vocabulary-order walk: the draws agree too.
    assert (tok == ref_tok).float().mean() >= 0.99


SHAPES = [(1, 3, 1), (1, 3, 111), (2, 5, 1000), (3, 4, 3000)]


# Every shape with every candidate capacity (0: the global-memory path; 128: lists that overflow
# into it; 1024: the split compaction into shared memory), the dtypes cycled across them (the
# dtype only changes the score kernel's loads).
@pytest.mark.parametrize("cap", [0, 128, 1024], ids=lambda c: f"cap{c}")
@pytest.mark.parametrize("shape", range(len(SHAPES)),
                         ids=lambda i: "K{}-B{}-V{}".format(*SHAPES[i]))
def test_matches_reference(emu, shape, cap):
    k, b, v = SHAPES[shape]
    dtype = DTYPES[(shape + cap) % 3]
    be = EmulatedBackend(emu, variant=0, cap=cap, num_sms=4)
    _compare(be, _problem(k, b, v, dtype, seed=k * 100 + b + v))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_union_rule(emu, dtype):
    be = EmulatedBackend(emu, variant=0, cap=256, num_sms=4)
    _compare(be, _problem(2, 5, 1500, dtype, seed=3, rule="union"), exact_greedy=False)


@pytest.mark.parametrize("cap", [0, 1024], ids=lambda c: f"cap{c}")
def test_ties_and_dead_tokens(emu, cap):
    be = EmulatedBackend(emu, variant=0, cap=cap, num_sms=4)
    _compare(be, _problem(2, 6, 2000, torch.bfloat16, seed=5, quantised=True))
    _compare(be, _problem(3, 6, 2000, torch.float32, seed=6, dead=0.97))


def test_top_k_above_the_plausible_set_stays_on_the_candidate_list(emu):
    """The ACD decode step: the plausibility mask (beta) leaves fewer finite scores than top-k.
    Masked tokens are not candidates, so the split kernels hand the row kernel the few plausible
    ones (it used to take top-k's -inf bucket, i.e. the whole row, and pass over it on one SM)."""
    be = EmulatedBackend(emu, variant=0, cap=128, num_sms=4)
    g = torch.Generator().manual_seed(21)
    b, v = 3, 1000
    logits = torch.randn(2, b, v, generator=g) * 3.0
    p = prepare(logits, [1.0, -0.5], temperature=0.7, top_k=50, top_p=0.9, beta=0.1,
                seed=torch.arange(b))
    _compare(be, p)  # its last call samples: the workspace below is that call's
    plausible = torch.isfinite(reference.contrastive_logprobs(
        prepare(logits, [1.0, -0.5], beta=0.1))[0]).sum(1)
    assert (plausible < 50).all() and (plausible < be.cap).all()
    assert torch.equal(be.compacted(), plausible), (be.compacted(), plausible)


@pytest.mark.parametrize("rule", ["linear", "union"])
def test_batch_invariance_with_chunking_that_follows_b(emu, rule):
    """The score kernel's chunks per row depend on B (more at small B); the union rule's
    log-sum-exp must not: a row alone and inside a batch of 16 give identical bits."""
    be = EmulatedBackend(emu, variant=0, cap=512, num_sms=16)
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 16, 3000, generator=g) * 3.0
    w = torch.tensor([1.0, 2.0 if rule == "union" else -0.5]).expand(16, 2).contiguous()
    kw = dict(temperature=torch.full((16,), 0.8), seed=torch.arange(16))
    p_all = prepare(logits, w, rule=rule, **kw)
    out_all, _ = be.contrastive_logprobs(p_all)
    tok_all, lp_all, _ = be.contrastive_sample(p_all, True)
    for row in range(16):  # (with the stats chunked like the scores, 1 row in 16 differed)
        one = {k: (v[row:row + 1] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        p1 = prepare(logits[:, row:row + 1], w[row:row + 1], rule=rule, **one)
        out1, _ = be.contrastive_logprobs(p1)
        assert torch.equal(out1[0], out_all[row]), (rule, row)
        if row % 5 == 0:
            tok1, lp1, _ = be.contrastive_sample(p1, True)
            assert tok1[0] == tok_all[row] and torch.equal(lp1[0], lp_all[row])


def test_many_chunks_per_row(emu):
    """Small B on a 'large' GPU: each row's scores come from many split blocks."""
    be = EmulatedBackend(emu, variant=0, cap=512, num_sms=64)
    _compare(be, _problem(2, 2, 5000, torch.float16, seed=7))


@pytest.mark.slow
def test_cuda_block_sizes(emu):
    """The real launch configuration (512-thread rows, 256-thread split blocks)."""
    be = EmulatedBackend(emu, variant=1, cap=16384, num_sms=132)
    _compare(be, _problem(2, 3, 3000, torch.bfloat16, seed=8))


@pytest.mark.slow
def test_no_shared_memory_races():
    """The kernels under ThreadSanitizer in the emulator (scripts/check_cuda_races.sh)."""
    import subprocess  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    script = Path(__file__).resolve().parents[1] / "scripts" / "check_cuda_races.sh"
    res = subprocess.run(["bash", str(script)], check=False, capture_output=True, text=True,
                         timeout=1800)
    if res.returncode != 0 and "fsanitize=thread" in res.stderr and "cannot find" in res.stderr:
        pytest.skip("ThreadSanitizer runtime not installed")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


def test_a_barrier_some_threads_skip_stops_with_a_message(tmp_path):
    """A divergent __syncthreads (undefined on a GPU, often a hang) ends the emulated run with a
    message, and threads that all reach their barriers see each other's shared-memory writes."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    src = tmp_path / "k.cpp"
    src.write_text("""
#include "emu.h"
#include <cstdio>
__global__ void k(int skip, int* out) {
  __shared__ int s[64];
  s[threadIdx.x] = threadIdx.x;
  if (static_cast<int>(threadIdx.x) != skip) __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = s[63 - threadIdx.x];
}
int main(int argc, char**) {
  static int out[128];
  emu::launch(k, dim3(2), dim3(64), 0, argc > 1 ? 5 : -1, out);
  for (int i = 0; i < 128; ++i) if (out[i] != 63 - i % 64) return 1;
  std::puts("ok");
}
""")
    emu_dir = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "emu"
    exe = tmp_path / "k"
    subprocess.run([os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-DSD_EMULATE",
                    f"-I{emu_dir}", str(src), "-o", str(exe)], check=True)
    ok = subprocess.run([str(exe)], check=False, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", (ok.returncode, ok.stdout)
    bad = subprocess.run([str(exe), "skip"], check=False, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "deadlock" in bad.stderr, (bad.returncode, bad.stderr)
