"""Validation and normalisation of the op's inputs (shared by every backend).

Every public op goes through :func:`prepare` before any kernel runs. It turns the user's mix of
scalars and tensors into one :class:`Prepared` bundle of contiguous per-row tensors on the logits'
device, and raises :class:`ValueError` naming the parameter and its allowed range on bad input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

Scalar = int | float
RowParam = Scalar | torch.Tensor

RULES = {"linear": 0, "union": 1}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Row status codes written by every backend (0 = ok).
STATUS_OK = 0
STATUS_NAN = 1
STATUS_POS_INF = 2
STATUS_ANCHOR_EMPTY = 3
STATUS_NO_CANDIDATE = 4
STATUS_MESSAGES = {
    STATUS_NAN: "logits contain NaN",
    STATUS_POS_INF: "logits contain +inf",
    STATUS_ANCHOR_EMPTY: "the anchor branch's logits are all -inf",
    STATUS_NO_CANDIDATE: "no token has a finite score (every anchor-supported token is -inf in "
    "another weighted branch)",
}


@dataclass
class Prepared:
    """Per-row parameters in kernel-ready form (all tensors contiguous, on the logits' device).

    ``log_beta`` and ``log_min_p`` are fp32 logs (``-inf`` when disabled) computed once here so that
    every backend compares against bit-identical thresholds. ``top_k`` is 0 when disabled.
    """

    logits: torch.Tensor  # [K, B, V], V contiguous
    weights: torch.Tensor  # [B, K] fp32
    temperature: torch.Tensor  # [B] fp32, 0 = greedy
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] fp32 in (0, 1]
    log_min_p: torch.Tensor  # [B] fp32, -inf = off
    log_beta: torch.Tensor  # [B] fp32, -inf = off
    seed: torch.Tensor  # [B] int64
    step: torch.Tensor  # [B] int64
    rule: int  # 0 linear, 1 union
    anchor: int
    beta_off: bool | None = None  # host knowledge: True when beta is the scalar 0, None if unknown

    @property
    def shape(self) -> tuple[int, int, int]:
        k, b, v = self.logits.shape
        return k, b, v


def _err(name: str, msg: str) -> ValueError:
    return ValueError(f"{name}: {msg}")


def _row_tensor(
    name: str, value: RowParam, batch: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Broadcast a scalar or a [B] tensor to a contiguous [B] tensor of ``dtype``."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        elif value.dim() != 1 or value.shape[0] != batch:
            raise _err(name, f"expected a scalar or a [B] tensor with B={batch}, got shape "
                       f"{tuple(value.shape)}")
        if value.is_floating_point() and dtype == torch.int64:
            raise _err(name, f"expected an integer tensor, got {value.dtype}")
        if value.is_complex() or value.dtype == torch.bool:
            raise _err(name, f"unsupported dtype {value.dtype}")
        return value.to(device=device, dtype=dtype).contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(name, f"expected a number or a tensor, got {type(value).__name__}")
    if dtype == torch.int64 and not isinstance(value, int):
        if not float(value).is_integer():
            raise _err(name, f"expected an integer, got {value!r}")
        value = int(value)
    return torch.full((batch,), value, dtype=dtype, device=device)


def _check_range(name: str, t: torch.Tensor, lo: float, hi: float, lo_open: bool,
                 hi_open: bool, allowed: str) -> None:
    if t.numel() == 0:
        return
    bad = ~torch.isfinite(t) if t.is_floating_point() else torch.zeros_like(t, dtype=torch.bool)
    bad |= (t <= lo) if lo_open else (t < lo)
    bad |= (t >= hi) if hi_open else (t > hi)
    if bool(bad.any()):
        first = t[bad][0].item()
        raise _err(name, f"must be in {allowed}, got {first!r}")


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise _err("logits", f"expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 3:
        raise _err("logits", f"expected shape [K, B, V], got {tuple(logits.shape)}")
    if logits.dtype not in DTYPES:
        raise _err("logits", f"dtype must be one of float32, bfloat16, float16; got {logits.dtype}")
    k, b, v = logits.shape
    if k < 1:
        raise _err("logits", "K (number of branches, dim 0) must be >= 1")
    if v < 1:
        raise _err("logits", "V (vocabulary, dim 2) must be >= 1")
    if b >= 1 and v > 1 and logits.stride(2) != 1:
        raise _err("logits", f"the vocabulary dim must be contiguous (stride 1), got stride "
                   f"{logits.stride(2)}; call .contiguous() first")


def _filled_rows(values, b: int, device: torch.device) -> torch.Tensor:
    """A [len(values), b] float32 tensor, row i = values[i], written by fill kernels: no
    host-to-device copy, so it can also be made inside a CUDA graph capture."""
    out = torch.empty(len(values), b, dtype=torch.float32, device=device)
    for i, x in enumerate(values):
        out[i].fill_(x)
    return out


def _normalise_weights(weights, k: int, b: int, device: torch.device,
                       check: bool) -> torch.Tensor:
    if isinstance(weights, torch.Tensor):
        w = weights
    elif isinstance(weights, (list, tuple)):
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in weights):
            raise _err("weights", "expected a sequence of numbers")
        if not all(math.isfinite(x) for x in weights):
            raise _err("weights", "must be finite")
        if len(weights) != k:
            raise _err("weights", f"length {len(weights)} != K={k} (number of branches)")
        key = ("weights", tuple(float(x) for x in weights), b, device)
        hit = _CACHE.get(key)
        if hit is None:
            hit = _remember(key, _filled_rows(key[1], b, device).t().contiguous())
        return hit
    elif isinstance(weights, (int, float)) and not isinstance(weights, bool) and k == 1:
        if not math.isfinite(weights):  # on the host, as for a sequence: no device sync
            raise _err("weights", "must be finite")
        return _filled_rows((float(weights),), b, device).t().contiguous()
    else:
        raise _err("weights", f"expected a [K] or [B, K] tensor or a sequence, got "
                   f"{type(weights).__name__}")
    if w.is_complex() or w.dtype == torch.bool:
        raise _err("weights", f"unsupported dtype {w.dtype}")
    if w.dim() == 1:
        if w.shape[0] != k:
            raise _err("weights", f"length {w.shape[0]} != K={k} (number of branches)")
        w = w.reshape(1, k).expand(b, k)
    elif w.dim() == 2:
        if tuple(w.shape) != (b, k):
            raise _err("weights", f"shape {tuple(w.shape)} != [B, K]=[{b}, {k}]")
    else:
        raise _err("weights", f"expected [K] or [B, K], got shape {tuple(w.shape)}")
    w = w.to(device=device, dtype=torch.float32).contiguous()
    if check and w.numel() and not bool(torch.isfinite(w).all()):
        raise _err("weights", "must be finite")
    return w


def prepare(
    logits: torch.Tensor,
    weights,
    *,
    rule: str = "linear",
    anchor: int = 0,
    beta: RowParam = 0.0,
    temperature: RowParam = 1.0,
    top_k: RowParam = 0,
    top_p: RowParam = 1.0,
    min_p: RowParam = 0.0,
    seed: RowParam | None = None,
    step: RowParam = 0,
    check_inputs: bool = True,
) -> Prepared:
    """Validate and normalise the op's arguments; see :func:`safedecode.ops.contrastive_sample`."""
    _check_logits(logits)
    k, b, v = logits.shape
    dev = logits.device
    if rule not in RULES:
        raise _err("rule", f"must be one of {sorted(RULES)}, got {rule!r}")
    if isinstance(anchor, bool) or not isinstance(anchor, int) or not 0 <= anchor < k:
        raise _err("anchor", f"must be an integer branch index in [0, {k - 1}], got {anchor!r}")
    if rule == "union" and k != 2:
        raise _err("rule", f"'union' (SafeInfer) needs exactly K=2 branches, got K={k}")
    w = _normalise_weights(weights, k, b, dev, check_inputs)
    if rule == "union":
        if isinstance(weights, (list, tuple)):  # checked on the host: no device sync
            negative = float(weights[1]) < 0
        else:
            negative = check_inputs and w.numel() and bool((w[:, 1] < 0).any())
        if negative:
            raise _err("weights", "for rule='union', weights[1] is gamma and must be >= 0")

    fl = _float_rows(temperature, top_p, min_p, beta, b, dev, check_inputs)
    if seed is None:  # drawn on the device: no host-to-device copy per call
        seed = torch.randint(0, 2**62, (b,), dtype=torch.int64, device=dev)
    top_k, seed, step = _int_rows(top_k, seed, step, v, b, dev, check_inputs)
    return Prepared(
        logits=logits,
        weights=w,
        temperature=fl[0],
        top_k=top_k,
        top_p=fl[1],
        log_min_p=fl[2],
        log_beta=fl[3],
        seed=seed,
        step=step,
        rule=RULES[rule],
        anchor=anchor,
        beta_off=None if isinstance(beta, torch.Tensor) else beta == 0,
    )


# name, lo, hi, lo_open, hi_open, allowed range as shown to the user
_FLOAT_SPECS = (
    ("temperature", 0.0, math.inf, False, True, "[0, inf) (0 = greedy)"),
    ("top_p", 0.0, 1.0, True, False, "(0, 1]"),
    ("min_p", 0.0, 1.0, False, False, "[0, 1] (0 = off)"),
    ("beta", 0.0, 1.0, False, False, "[0, 1] (0 = off)"),
)
_INT_SPECS = (
    ("top_k", 0, math.inf, False, True, "[0, V] (0 = off)"),
    ("seed", -math.inf, math.inf, False, False, "int64"),
    ("step", 0, math.inf, False, True, "[0, 2^63)"),
)


def _check_scalar(spec, x, integer: bool) -> None:
    name, lo, hi, lo_open, hi_open, allowed = spec
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise _err(name, f"expected a number or a [B] tensor, got {type(x).__name__}")
    if integer and not (isinstance(x, int) or float(x).is_integer()):
        raise _err(name, f"expected an integer, got {x!r}")
    bad = not math.isfinite(x) if isinstance(x, float) else False
    bad = bad or (x <= lo if lo_open else x < lo) or (x >= hi if hi_open else x > hi)
    if bad:
        raise _err(name, f"must be in {allowed}, got {x!r}")


def _log32(x: float) -> float:
    """fp32 log of an fp32 value, as the tensor path computes it (log(0) = -inf = off)."""
    x = float(np.float32(x))
    return float(np.float32(math.log(x))) if x > 0 else -math.inf


# Decode loops call the op with the same scalars every step: their [B] tensors are built once and
# reused. Read-only by contract (kernels never write parameters; prepare never mutates them).
_CACHE: dict[tuple, object] = {}


def _capturing() -> bool:
    """Whether a CUDA graph is being captured: tensors made now live in the graph's private pool
    and must not outlive it in the cache."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _remember(key: tuple, value):
    if _capturing():
        return value
    if len(_CACHE) > 512:
        _CACHE.clear()
    _CACHE[key] = value
    return value


def _float_rows(temperature, top_p, min_p, beta, b, dev, check_inputs) -> list[torch.Tensor]:
    """[temperature, top_p, log_min_p, log_beta] as contiguous fp32 [B] tensors."""
    values = (temperature, top_p, min_p, beta)
    if not any(isinstance(x, torch.Tensor) for x in values):  # fast path: one small tensor
        key = ("float", tuple(type(x) for x in values), values, b, dev)
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        for spec, x in zip(_FLOAT_SPECS, values, strict=True):
            _check_scalar(spec, x, integer=False)
        row = [float(temperature), float(top_p), _log32(min_p), _log32(beta)]
        return _remember(key, list(_filled_rows(row, b, dev)))
    out = []
    for spec, x in zip(_FLOAT_SPECS, values, strict=True):
        tensor_in = isinstance(x, torch.Tensor)
        if not tensor_in:
            _check_scalar(spec, x, integer=False)
        t = _row_tensor(spec[0], x, b, dev, torch.float32)
        if tensor_in and check_inputs:
            _check_range(t=t, name=spec[0], lo=spec[1], hi=spec[2], lo_open=spec[3],
                         hi_open=spec[4], allowed=spec[5])
        out.append(t)
    for i in (2, 3):  # min_p, beta -> fp32 logs computed in fp64, as _log32
        out[i] = torch.log(out[i].double()).float().contiguous()
    return out


def _int_rows(top_k, seed, step, v, b, dev, check_inputs) -> list[torch.Tensor]:
    """[top_k (clamped to V), seed, step] as contiguous int64 [B] tensors."""
    out = []
    for spec, x in zip(_INT_SPECS, (top_k, seed, step), strict=True):
        name = spec[0]
        if not isinstance(x, torch.Tensor):
            key = ("int", name, type(x), x, v, b, dev)
            hit = _CACHE.get(key)
            if hit is None:
                _check_scalar(spec, x, integer=True)
                value = min(int(x), v) if name == "top_k" else int(x)  # k >= V keeps everything
                hit = _remember(key, torch.full((b,), value, dtype=torch.int64, device=dev))
            out.append(hit)
            continue
        t = _row_tensor(name, x, b, dev, torch.int64)
        if check_inputs and name != "seed":
            _check_range(t=t, name=name, lo=spec[1], hi=spec[2], lo_open=spec[3],
                         hi_open=spec[4], allowed=spec[5])
        if name == "top_k":
            t = t.clamp(max=v)  # out of place: t may be the caller's tensor
        out.append(t)
    return out


def raise_on_status(status: torch.Tensor) -> None:
    """Raise a ValueError for the first row whose kernel status is not OK."""
    if status.numel() == 0 or not bool(status.any()):
        return
    bad = torch.nonzero(status != STATUS_OK)
    row = int(bad[0, 0])
    code = int(status[row])
    msg = STATUS_MESSAGES.get(code, f"status code {code}")
    more = f" (and {bad.shape[0] - 1} more rows)" if bad.shape[0] > 1 else ""
    raise ValueError(f"logits: row {row}: {msg}{more}")
