"""vLLM-style sampler edge cases, seeds and batch invariance, on every fast backend."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from helpers import assert_logprobs_close, both, both_logprobs, make_logits

from safedecode.ops import contrastive_logprobs, contrastive_sample

NEG = float("-inf")


def test_top_k_one_is_greedy(backend):
    logits = make_logits(2, 7, 500, seed=1, device=DEVICE)
    w = [1.0, -0.5]
    greedy = contrastive_sample(logits, w, temperature=0.0, backend=backend)
    for seed in range(5):
        tok = contrastive_sample(logits, w, temperature=1.0, top_k=1, seed=seed, backend=backend)
        assert torch.equal(tok, greedy)


def test_top_k_v_and_p_one_keep_everything(backend):
    v = 300
    logits = make_logits(2, 5, v, seed=2, device=DEVICE)
    w = [1.0, -0.5]
    lp = contrastive_logprobs(logits, w, top_k=v, top_p=1.0, backend=backend)
    assert torch.isfinite(lp).all()
    full = torch.log_softmax(logits[0].float() - 0.5 * logits[1].float(), dim=-1)
    assert torch.allclose(lp, full, atol=1e-4)


def test_tiny_top_p_keeps_only_the_mode(backend):
    logits = make_logits(1, 6, 1000, seed=3, device=DEVICE)
    lp = contrastive_logprobs(logits, [1.0], top_p=1e-6, backend=backend)
    assert (torch.isfinite(lp).sum(dim=1) == 1).all()
    assert torch.equal(lp.argmax(dim=1), logits[0].float().argmax(dim=1))
    assert torch.allclose(lp.amax(dim=1), torch.zeros(6, device=DEVICE))


def test_rows_mostly_neg_inf(backend):
    b, v = 6, 2000
    logits = make_logits(2, b, v, seed=4, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    dead = (torch.rand(2, b, v, generator=g) < 0.99).to(DEVICE)
    dead[0, :, 17] = False  # the anchor keeps at least one token, shared with branch 1
    dead[1, :, 17] = False
    logits = logits.masked_fill(dead, NEG)
    w = [1.0, -0.5]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9), dict(top_k=3)):
        (ref, _), (out, _) = both(logits, w, backend, seed=5, **kw)
        ref_lp, out_lp = both_logprobs(logits, w, backend,
                                       **{k: x for k, x in kw.items() if k != "seed"})
        assert_logprobs_close(ref_lp.cpu(), out_lp.cpu())
        # Excluded tokens (-inf in either weighted branch) are never produced.
        assert not dead[0].gather(1, out[:, None]).any()
        assert not dead[1].gather(1, out[:, None]).any()


def test_single_finite_token(backend):
    v = 1000
    logits = torch.full((2, 3, v), NEG, device=DEVICE)
    logits[:, 0, 5] = 1.0
    logits[:, 1, 999] = -3.0
    logits[:, 2, 0] = 0.0
    for temp in (0.0, 1.0, 0.1):
        tok, lp = contrastive_sample(logits, [1.0, -0.5], temperature=temp, seed=0,
                                     top_p=0.5, return_logprobs=True, backend=backend)
        assert tok.tolist() == [5, 999, 0]
        assert torch.allclose(lp, torch.zeros(3, device=DEVICE))


def test_ties_break_to_lowest_index(backend):
    v = 64
    logits = torch.zeros(1, 4, v, device=DEVICE)
    logits[0, 0, [3, 9, 40]] = 2.0
    logits[0, 1, [63, 62]] = 1.0
    logits[0, 3, :] = 7.0
    tok = contrastive_sample(logits, [1.0], temperature=0.0, backend=backend)
    assert tok.tolist() == [3, 62, 0, 0]
    # top-k keeps every token tied at the k-th value.
    lp = contrastive_logprobs(logits, [1.0], top_k=1, backend=backend)
    assert torch.isfinite(lp[0]).sum() == 3 and torch.isfinite(lp[3]).sum() == v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_contiguous_views(backend, dtype):
    base = make_logits(3, 10, 777, dtype, seed=6, device=DEVICE)
    views = {
        "batch-major": make_logits(9, 3, 777, dtype, seed=6, device=DEVICE).transpose(0, 1)[:, ::3],
        "strided-B": base[:, ::2],
        "K-strided": base[::2],
        "expand-B": base[:, :1].expand(3, 5, 777),
    }
    for name, logits in views.items():
        assert not logits.is_contiguous()
        k = logits.shape[0]
        w = [1.0] + [-0.3] * (k - 1)
        (ref, _), (out, _) = both(logits, w, backend, temperature=0.0)
        assert torch.equal(ref, out), name
        (ref_s, _), (out_s, _) = both(logits, w, backend, seed=1, top_k=10)
        ref_c, out_c = both(logits.contiguous(), w, backend, seed=1, top_k=10)
        assert torch.equal(out_s, out_c[0]), f"{name}: view and contiguous copy differ"


def test_seed_reproducibility_and_batch_invariance(backend):
    b, v = 8, 5000
    logits = make_logits(2, b, v, seed=7, device=DEVICE)
    w = [1.0, -0.5]
    seeds = torch.arange(100, 100 + b, device=DEVICE)
    kw = dict(temperature=1.0, top_p=0.95, seed=seeds, step=3)
    a = contrastive_sample(logits, w, backend=backend, **kw)
    assert torch.equal(a, contrastive_sample(logits, w, backend=backend, **kw))
    # Each row alone gives the same token as inside the batch.
    for row in range(b):
        alone = contrastive_sample(logits[:, row : row + 1], w, backend=backend, temperature=1.0,
                                   top_p=0.95, seed=int(seeds[row]), step=3)
        assert int(alone) == int(a[row])
    # Reordering the batch permutes the tokens.
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    shuffled = contrastive_sample(logits[:, perm], w, backend=backend, temperature=1.0,
                                  top_p=0.95, seed=seeds[perm], step=3)
    assert torch.equal(shuffled, a[perm])
    # Different steps give different draws (the stream moves on).
    draws = torch.stack([contrastive_sample(logits, w, backend=backend, temperature=1.0,
                                            seed=seeds, step=s) for s in range(20)])
    assert (draws != draws[0]).any()


def test_row_offsets_beyond_int32(backend):
    """A row 2^31 elements away from the first: offsets must be 64-bit (B*V > 2^31)."""
    v = 4096
    far = 2**31
    flat = torch.empty(far + v, dtype=torch.float16, device=DEVICE)  # pages touched: two rows
    g = torch.Generator().manual_seed(0)
    flat[:v] = torch.randn(v, generator=g).half().to(DEVICE)
    flat[far:] = torch.randn(v, generator=g).half().to(DEVICE)
    view = flat.as_strided((1, 2, v), (0, far, 1))
    (ref, _), (out, _) = both(view, [1.0], backend, temperature=0.0)
    assert torch.equal(ref, out)
    assert int(out[1]) == int(flat[far:].float().argmax())
