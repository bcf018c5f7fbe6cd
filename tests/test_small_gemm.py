"""The small-M GEMM for decode-time linear layers (csrc/cpu/small_gemm.cpp) and the engine's
routing of ``nn.Linear`` through it (safedecode/ops/linear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from safedecode import _C
from safedecode.ops import linear as sg

ISAS = _C.cpu_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    before = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(before)


def _raw(x, w, bias=None, *, m=None, ldx=None, ldy=None, threads=0):
    """Call the kernel on (possibly strided) row-major buffers; returns y [M, N]."""
    m = x.shape[0] if m is None else m
    n, k = w.shape
    ldx = x.stride(0) if ldx is None else ldx
    ldy = n if ldy is None else ldy
    out = torch.full((max(m, 1), ldy), float("nan"))
    _C.linear_small(x.data_ptr(), ldx, w.data_ptr(), bias.data_ptr() if bias is not None else 0,
                    out.data_ptr(), ldy, m, n, k, threads)
    return out[:m, :n], out[:m, n:]


def _close(y, x, w, bias=None):
    ref = x.double() @ w.double().T + (bias.double() if bias is not None else 0)
    scale = x.double().abs() @ w.double().abs().T + 1
    err = ((y.double() - ref).abs() / scale).max().item()
    assert err < 2e-6, err


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 13, 16, 20])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 15), (4, 16), (5, 17), (64, 64), (197, 100),
                                 (130, 576), (8, 1536)])
def test_matches_float64_on_every_isa(isa, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n * 7 + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g) if (m + n) % 2 else None
    y, pad = _raw(x, w, bias)
    _close(y, x, w, bias)
    assert pad.numel() == 0


def test_thread_count_does_not_change_bits_on_any_level():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(6, 333, generator=g), torch.randn(501, 333, generator=g), \
        torch.randn(501, generator=g)
    before = _C.cpu_isa()
    try:
        for isa in ISAS:
            _C.set_cpu_isa(isa)
            one, _ = _raw(x, w, b, threads=1)
            two, _ = _raw(x, w, b, threads=2)
            assert torch.equal(one, two), isa
            _close(one, x, w, b)
    finally:
        _C.set_cpu_isa(before)


def test_strided_rows_and_untouched_padding(isa):
    g = torch.Generator().manual_seed(2)
    buf = torch.randn(5, 80, generator=g)
    x = buf[:, 3:67]                         # 5 rows of 64, row stride 80
    w = torch.randn(37, 64, generator=g)
    y, pad = _raw(x, w, ldy=45)
    _close(y, x, w)
    assert torch.isnan(pad).all()            # columns N..ldy are not written


def test_zero_rows_and_zero_depth():
    w = torch.randn(9, 4)
    y, _ = _raw(torch.zeros(0, 4), w)
    assert y.shape == (0, 9)
    b = torch.randn(3)
    y, _ = _raw(torch.zeros(2, 0), torch.zeros(3, 0), b)
    assert torch.equal(y, b.expand(2, 3))


@pytest.mark.parametrize("args,match", [
    (dict(m=-1), "negative size"),
    (dict(ldx=3), "ldx >= K"),
    (dict(ldy=2), "ldy >= N"),
])
def test_kernel_argument_errors(args, match):
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=match):
        _raw(x, w, **args)


def test_kernel_null_pointers_are_refused():
    x, w, y = torch.randn(2, 8), torch.randn(4, 8), torch.empty(2, 4)
    for xp, wp, yp in ((0, w.data_ptr(), y.data_ptr()), (x.data_ptr(), 0, y.data_ptr()),
                       (x.data_ptr(), w.data_ptr(), 0)):
        with pytest.raises(ValueError, match="null pointer"):
            _C.linear_small(xp, 8, wp, 0, yp, 4, 2, 4, 8, 0)


# -- the Python wrapper and the nn.Linear routing ---------------------------------------------

def test_linear_function_and_its_errors():
    x, w, b = torch.randn(3, 1, 40), torch.randn(24, 40), torch.randn(24)
    y = sg.linear(x, w, b)
    assert y.shape == (3, 1, 24)
    _close(y.reshape(3, 24), x.reshape(3, 40), w, b)
    with pytest.raises(ValueError, match="x must be a float32 CPU tensor"):
        sg.linear(x.double(), w)
    with pytest.raises(ValueError, match=f"x has {sg.MAX_ROWS + 1} rows"):
        sg.linear(torch.randn(sg.MAX_ROWS + 1, 40), w)
    with pytest.raises(ValueError, match="x has 41 features"):
        sg.linear(torch.randn(2, 41), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        sg.linear(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="contiguous"):
        sg.linear(x, w.T.contiguous().T)
    with pytest.raises(ValueError, match="K >= 1"):
        sg.linear(torch.randn(2, 0), torch.randn(3, 0))
    strided = torch.randn(2, 80)[:, ::2]  # a non-contiguous x is copied, not refused
    _close(sg.linear(strided, w), strided, w)


class _Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 20, bias=False),
                         _Scaled(20, 8))


@torch.no_grad()
def test_routing_matches_torch_and_is_undone_on_exit():
    net = _net()
    x = torch.randn(4, 1, 32)
    ref = net(x)
    with sg.small_gemm_linears(net) as n:
        assert n == 2                               # the nn.Linear subclass is left alone
        assert "forward" in net[0].__dict__ and "forward" not in net[3].__dict__
        y = net(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert not any("forward" in mod.__dict__ for mod in net)
    with pytest.raises(RuntimeError, match="boom"), sg.small_gemm_linears(net):
        raise RuntimeError("boom")
    assert not any("forward" in mod.__dict__ for mod in net)
    with sg.small_gemm_linears(net, enabled=False) as n:
        assert n == 0
    with sg.small_gemm_linears(_net().to(torch.bfloat16)) as n:
        assert n == 0                               # fp32 only


def _counting(monkeypatch):
    calls = []
    real = _C.linear_small

    def count(*args):
        calls.append(args[6])  # M
        return real(*args)

    monkeypatch.setattr(_C, "linear_small", count)
    return calls


def test_calls_it_does_not_cover_go_to_torch(monkeypatch):
    calls = _counting(monkeypatch)
    net = _net()
    lin = net[0]
    with sg.small_gemm_linears(net):
        with torch.no_grad():
            x = torch.randn(sg.MAX_ROWS, 32)
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
            assert calls == [sg.MAX_ROWS]
            for other in (torch.randn(sg.MAX_ROWS + 1, 32),     # too many rows
                          torch.randn(2, 64)[:, ::2],           # not contiguous
                          torch.randn(0, 32)):
                assert torch.equal(lin(other), F.linear(other, lin.weight, lin.bias))
            assert calls == [sg.MAX_ROWS]
        x = torch.randn(2, 32, requires_grad=True)              # autograd: torch's path
        lin(x).sum().backward()
        assert x.grad is not None and calls == [sg.MAX_ROWS]
        with torch.no_grad():                                   # weight replaced: new weight used
            lin.weight = nn.Parameter(torch.randn(48, 32))
            x = torch.randn(2, 32)
            assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
            assert calls == [sg.MAX_ROWS]


def test_decoder_greedy_tokens_same_with_and_without_small_gemm(monkeypatch):
    from engine_fixtures import MIXED_PROMPTS, tiny_llama

    from safedecode import methods
    from safedecode.engine import SafeDecoder

    model, tok = tiny_llama()
    m = methods.get("acd-text", alpha=0.5)
    calls = _counting(monkeypatch)
    off = SafeDecoder(model, tok, m, small_gemm=False).generate(MIXED_PROMPTS, max_new_tokens=12)
    assert calls == []
    on = SafeDecoder(model, tok, m).generate(MIXED_PROMPTS, max_new_tokens=12)
    assert calls and max(calls) <= sg.MAX_ROWS
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    assert not any("forward" in mod.__dict__ for mod in model.modules())
