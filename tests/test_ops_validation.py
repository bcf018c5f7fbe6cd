"""Bad input raises a ValueError naming the parameter before any kernel runs."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from safedecode.ops import contrastive_logprobs, contrastive_sample, registry

BACKENDS = ["reference", "cpp", "triton"] if DEVICE == "cpu" else ["reference", "triton", "cuda"]


def _logits(k=2, b=3, v=50, dtype=torch.float32):
    return torch.randn(k, b, v, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.1), "min_p"),
        (dict(beta=2.0), "beta"),
        (dict(beta=-1e-3), "beta"),
        (dict(step=-1), "step"),
        (dict(rule="sum"), "rule"),
        (dict(anchor=2), "anchor"),
        (dict(anchor=-1), "anchor"),
        (dict(temperature=torch.tensor([1.0, -1.0, 1.0])), "temperature"),
        (dict(top_p=torch.tensor([1.0, 0.5])), "top_p"),
        (dict(top_k=torch.tensor([1.0, 2.0, 3.0])), "top_k"),
        (dict(backend="magic"), "backend"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        contrastive_sample(_logits(), [1.0, -0.5], **kwargs)


@pytest.mark.parametrize(
    "logits,weights,match",
    [
        (torch.randn(3, 50), [1.0], "logits"),
        (torch.randn(2, 3, 0), [1.0, 1.0], "V"),
        (torch.randn(2, 3, 50).to(torch.float64), [1.0, 1.0], "dtype"),
        (torch.randn(2, 3, 50).int(), [1.0, 1.0], "dtype"),
        (torch.randn(2, 50, 3).transpose(1, 2), [1.0, 1.0], "contiguous"),
        (torch.randn(2, 3, 50), [1.0, 1.0, 1.0], "weights"),
        (torch.randn(2, 3, 50), torch.ones(4, 2), "weights"),
        (torch.randn(2, 3, 50), [1.0, float("nan")], "weights"),
        (torch.randn(1, 3, 50), float("inf"), "weights"),  # a scalar weight (K = 1)
        (torch.randn(2, 3, 50), "abc", "weights"),
        ([[[1.0]]], [1.0], "logits"),
    ],
)
def test_bad_shapes_and_dtypes(logits, weights, match):
    with pytest.raises(ValueError, match=match):
        contrastive_sample(logits, weights)


def test_union_needs_two_branches_and_nonnegative_gamma():
    with pytest.raises(ValueError, match="rule"):
        contrastive_sample(_logits(k=3), [1.0, 1.0, 1.0], rule="union")
    with pytest.raises(ValueError, match="gamma"):
        contrastive_sample(_logits(k=2), [1.0, -1.0], rule="union")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "poison,match",
    [("nan", "NaN"), ("posinf", r"\+inf"), ("anchor_dead", "anchor"), ("no_candidate", "finite")],
)
def test_bad_rows_are_reported_never_sampled(backend, poison, match):
    logits = _logits(k=2, b=4, v=64)
    if poison == "nan":
        logits[1, 2, 7] = float("nan")
    elif poison == "posinf":
        logits[0, 2, 7] = float("inf")
    elif poison == "anchor_dead":
        logits[0, 2] = float("-inf")
    else:  # anchor alive only where branch 1 is -inf
        logits[0, 2, 1:] = float("-inf")
        logits[1, 2, 0] = float("-inf")
    for fn in (contrastive_sample, contrastive_logprobs):
        with pytest.raises(ValueError, match=rf"row 2: .*{match}"):
            fn(logits, [1.0, -0.5], backend=backend)
    # With the check off, the bad row gets token -1 and the others are unaffected.
    tok = contrastive_sample(logits, [1.0, -0.5], temperature=0.0, backend=backend,
                             check_inputs=False)
    assert int(tok[2]) == -1
    assert (tok[[0, 1, 3]] >= 0).all()


def test_empty_batch_returns_empty():
    out = contrastive_sample(torch.randn(2, 0, 10), [1.0, -1.0])
    assert out.shape == (0,) and out.dtype == torch.int64
    assert contrastive_logprobs(torch.randn(2, 0, 10), [1.0, -1.0]).shape == (0, 10)


def test_unknown_backend_on_device():
    with pytest.raises(ValueError, match="backend"):
        contrastive_sample(_logits(), [1.0, -0.5], backend="cuda" if DEVICE == "cpu" else "cpp")


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_status_call_never_syncs_the_device(backend):
    """contrastive_sample_with_status with tensor parameters: no host sync anywhere (prepare's
    range checks, the union rule's gamma check, seed=None, the launches)."""
    if registry.status()[backend] != "ok":
        pytest.skip(f"{backend}: {registry.status()[backend]}")
    from safedecode.ops import contrastive_sample_with_status  # noqa: PLC0415

    logits = torch.randn(2, 4, 5000, device="cuda").to(torch.bfloat16)
    rows = dict(temperature=torch.full((4,), 0.7, device="cuda"),
                top_k=torch.full((4,), 50, device="cuda"),
                top_p=torch.full((4,), 0.9, device="cuda"),
                beta=torch.full((4,), 0.1, device="cuda"))
    w = torch.tensor([[1.0, 0.5]] * 4, device="cuda")
    contrastive_sample_with_status(logits, w, rule="union", backend=backend, **rows)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for rule in ("linear", "union"):
            contrastive_sample_with_status(logits, w, rule=rule, backend=backend, seed=None, **rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_gpu
def test_parameter_cache_keeps_nothing_made_during_graph_capture():
    from safedecode.ops import params  # noqa: PLC0415

    logits = torch.randn(1, 3, 100, device="cuda")
    params._CACHE.clear()
    s = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph):
        params.prepare(logits, [1.0], temperature=0.3, top_k=7, check_inputs=False)
    assert params._CACHE == {}
    params.prepare(logits, [1.0], temperature=0.3, top_k=7, check_inputs=False)
    assert params._CACHE


def test_seed_none_is_drawn_on_the_logits_device():
    from safedecode.ops import params  # noqa: PLC0415

    logits = torch.randn(1, 3, 100, device=DEVICE)
    p = params.prepare(logits, [1.0], seed=None)
    assert p.seed.device == logits.device and p.seed.dtype == torch.int64
    assert p.seed.unique().numel() == 3
