"""C++ CPU backend: thin wrapper around ``safedecode._C`` (pybind11 + OpenMP, see csrc/cpu/)."""

from __future__ import annotations

import os
import warnings

import torch

from .params import Prepared

_C = None
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def load() -> None:
    """Import the compiled extension (raises ImportError with the reason if it is not built)."""
    global _C
    if _C is None:
        from safedecode import _C as ext  # noqa: PLC0415 - optional compiled module

        _C = ext
        want = os.environ.get("SAFEDECODE_CPU_ISA")
        if want and want != ext.cpu_isa():
            warnings.warn(f"SAFEDECODE_CPU_ISA={want!r} is not built or not supported on this CPU; "
                          f"using {ext.cpu_isa()!r} (choose one of: {', '.join(ext.cpu_isas())})",
                          stacklevel=2)


def _threads() -> int:
    env = os.environ.get("SAFEDECODE_NUM_THREADS")
    return int(env) if env else torch.get_num_threads()


def _check(p: Prepared) -> None:
    if p.logits.device.type != "cpu":
        raise ValueError(f"logits: the cpp backend needs CPU tensors, got {p.logits.device}")


def _common(p: Prepared) -> tuple:
    z = p.logits
    k, b, v = z.shape
    return (z.data_ptr(), _DTYPE_CODES[z.dtype], k, b, v, z.stride(0), z.stride(1),
            p.weights.data_ptr(), p.temperature.data_ptr(), p.top_k.data_ptr(),
            p.top_p.data_ptr(), p.log_min_p.data_ptr(), p.log_beta.data_ptr())


def contrastive_sample(p: Prepared, return_logprobs: bool):
    """Tokens [B] int64, log-probs [B] fp32 or None, status [B] int32."""
    load()
    _check(p)
    b = p.logits.shape[1]
    tokens = torch.empty(b, dtype=torch.int64)
    status = torch.empty(b, dtype=torch.int32)
    lps = torch.empty(b, dtype=torch.float32) if return_logprobs else None
    _C.contrastive_sample(*_common(p), p.seed.data_ptr(), p.step.data_ptr(), p.rule, p.anchor,
                          tokens.data_ptr(), lps.data_ptr() if lps is not None else 0,
                          status.data_ptr(), _threads())
    return tokens, lps, status


def contrastive_logprobs(p: Prepared):
    """Final log-distribution [B, V] fp32 and status [B] int32."""
    load()
    _check(p)
    _, b, v = p.logits.shape
    out = torch.empty(b, v, dtype=torch.float32)
    status = torch.empty(b, dtype=torch.int32)
    _C.contrastive_logprobs(*_common(p), p.rule, p.anchor, out.data_ptr(), status.data_ptr(),
                            _threads())
    return out, status
