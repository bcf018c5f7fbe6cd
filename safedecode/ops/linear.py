"""Decode-time linear layers on the C++ small-M GEMM (CPU, fp32).

A decode step multiplies a few rows (requests x branches) by every weight matrix of the model, so
it is bound by reading the weights. torch's CPU GEMM slows down for a few rows (measured on this
project's CPUs: on one, 2 rows ~10 % slower than 1 and 8 rows ~2x; on another 2.1-3.3x the
small-M GEMM's time from 1 to 64 rows); ``safedecode._C.linear_small`` streams each weight
matrix once for up to :data:`MAX_ROWS` rows (see ``csrc/cpu/small_gemm.cpp`` and
``benchmarks/bench_linear.py``).

:func:`small_gemm_linears` routes the model's ``nn.Linear`` modules through it for the duration of
a ``with`` block. Calls it does not cover (more rows, other dtypes or devices, autograd, weight
replaced since) go to ``torch.nn.functional.linear`` unchanged. Results agree with
``F.linear`` to float32 rounding (a different summation order), not bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 64  # was 16; 2.3-2.4x torch at 24-64 rows (benchmarks/results/linear_cpu.md)


def available() -> bool:
    """Whether the compiled extension (and so the small-M GEMM) is importable."""
    try:
        from safedecode import _C  # noqa: F401, PLC0415 - optional compiled module
    except ImportError:
        return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           num_threads: int = 0) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on the small-M GEMM, for fp32 CPU tensors of at most
    :data:`MAX_ROWS` rows.

    ``weight`` must be contiguous ``[N, K]``; ``x`` is ``[..., K]``. Raises ``ValueError`` for
    inputs the kernel does not take (use :func:`small_gemm_linears` for automatic fallback).
    """
    from safedecode import _C  # noqa: PLC0415 - optional compiled module

    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ValueError(f"linear: {name} must be a float32 CPU tensor, got {t.dtype} on "
                             f"{t.device}")
    if weight.dim() != 2 or weight.shape[1] == 0:
        raise ValueError(f"linear: weight must be [N, K] with K >= 1, got {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear: x has {x.shape[-1]} features, weight expects {k}")
    if not weight.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        raise ValueError("linear: weight and bias must be contiguous (call .contiguous())")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"linear: bias must have shape ({n},), got {tuple(bias.shape)}")
    rows = x.numel() // k
    if not 0 < rows <= MAX_ROWS:
        raise ValueError(f"linear: x has {rows} rows; the small-M GEMM takes 1 to {MAX_ROWS} "
                         "(use F.linear for more)")
    return _launch(_C.linear_small, x.contiguous(), weight, bias, rows, n, k, num_threads)


def _launch(run, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, rows: int, n: int,
            k: int, num_threads: int) -> torch.Tensor:
    """The kernel call on checked, contiguous inputs; ``[..., N]`` out."""
    y = x.new_empty((*x.shape[:-1], n))
    run(x.data_ptr(), k, w.data_ptr(), 0 if b is None else b.data_ptr(), y.data_ptr(), n, rows,
        n, k, num_threads)
    return y


def _forward_for(module: nn.Linear, ext, num_threads: int):
    """A ``forward`` for ``module``: the small-M GEMM where it applies, else ``F.linear``.

    Kept lean (about as much Python per call as ``F.linear``'s own, see
    ``benchmarks/bench_linear.py``): a decode step makes a few hundred of these calls. The weight
    is re-checked on every call, so one replaced or reshaped since is never read wrongly.
    """
    weight, bias = module.weight, module.bias
    n, k = shape = weight.shape
    f32 = torch.float32
    run = ext.linear_small
    if not (weight.dtype == f32 and weight.is_cpu and k > 0
            and (bias is None or (bias.dtype == f32 and bias.is_cpu and bias.shape == (n,)))):
        return None

    def forward(x: torch.Tensor) -> torch.Tensor:
        w, b = module.weight, module.bias
        if (w is weight and b is bias and x.dtype is f32 and x.is_cpu and x.is_contiguous()
                and not torch.is_grad_enabled() and w.is_contiguous() and w.shape == shape
                and (b is None or b.is_contiguous())):
            rows = x.numel() // k
            if x.shape[-1] == k and 0 < rows <= MAX_ROWS:
                return _launch(run, x, w, b, rows, n, k, num_threads)
        return F.linear(x, w, b)

    return forward


@contextlib.contextmanager
def small_gemm_linears(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Route ``model``'s ``nn.Linear`` layers through the small-M GEMM inside the block.

    Yields how many layers were routed (0 when disabled, when the extension is not built or no
    layer is an fp32 CPU ``nn.Linear``). Only modules whose type is exactly ``nn.Linear`` are
    touched (subclasses may have their own forward); their instance ``forward`` is restored on
    exit, even on error. Not for models shared with another thread during the block.
    """
    if not enabled:
        yield 0
        return
    forwards = eager_forwards(model)
    with routed(forwards) as n:
        yield n


def eager_forwards(model: nn.Module) -> dict[nn.Module, Callable]:
    """Per fp32 CPU ``nn.Linear`` of ``model`` (type exactly ``nn.Linear``): its small-M GEMM
    ``forward`` (empty without the extension). Build once, install per call with :func:`routed`."""
    if not available():
        return {}
    from safedecode import _C  # noqa: PLC0415 - optional compiled module

    threads = torch.get_num_threads()
    out = {}
    for module in model.modules():
        if type(module) is nn.Linear:
            forward = _forward_for(module, _C, threads)
            if forward is not None:
                out[module] = forward
    return out


_LIB = None


def _register_op() -> None:
    """Register ``torch.ops.safedecode.linear_small`` (once): the small-M GEMM as an operator
    that ``torch.compile`` keeps opaque (no graph break), with a shape-only fake for tracing."""
    global _LIB
    if _LIB is not None:
        return
    from safedecode import _C  # noqa: PLC0415 - optional compiled module

    lib = torch.library.Library("safedecode", "DEF")
    lib.define("linear_small(Tensor x, Tensor weight, Tensor? bias, int num_threads) -> Tensor")

    def impl(x, weight, bias, num_threads):
        n, k = weight.shape
        x = x.contiguous()
        return _launch(_C.linear_small, x, weight, bias, x.numel() // k, n, k, num_threads)

    def fake(x, weight, bias, num_threads):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    lib.impl("linear_small", impl, "CPU")
    torch.library.register_fake("safedecode::linear_small", fake, lib=lib)
    _LIB = lib


def op_forwards(model: nn.Module) -> dict[nn.Module, Callable]:
    """Per fp32 CPU ``nn.Linear`` of ``model``: a ``forward`` that calls the small-M GEMM as
    the ``safedecode::linear_small`` operator for <= MAX_ROWS rows (else ``F.linear``). For compiled
    decode steps: install them with :func:`routed` (the same objects every call, so compiled
    graphs stay valid)."""
    if not available():
        return {}
    _register_op()
    threads = torch.get_num_threads()
    op = torch.ops.safedecode.linear_small
    out = {}
    for module in model.modules():
        w = getattr(module, "weight", None)
        if type(module) is not nn.Linear or w is None or w.dtype != torch.float32 \
                or not w.is_cpu:
            continue

        def forward(x, module=module):
            k = module.weight.shape[1]
            if x.dtype == torch.float32 and x.shape[-1] == k \
                    and 0 < x.numel() // k <= MAX_ROWS and not torch.is_grad_enabled():
                return op(x, module.weight, module.bias, threads)
            return F.linear(x, module.weight, module.bias)

        out[module] = forward
    return out


@contextlib.contextmanager
def routed(forwards: dict[nn.Module, Callable]) -> Iterator[int]:
    """Install ``forwards`` (:func:`eager_forwards` / :func:`op_forwards`) as the modules'
    ``forward`` inside the block; a module that already has its own instance ``forward`` is left
    alone. Yields how many were installed; restores them on exit, even on error."""
    patched = []
    for module, fwd in forwards.items():
        if "forward" not in module.__dict__:
            module.forward = fwd
            patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
