"""CUDA backend: thin wrapper around ``safedecode._C_cuda`` (pybind11 + CUDA, see csrc/cuda/).

The extension takes raw device pointers, shapes and strides, and the current stream as an
integer, so it needs no torch C++ headers. Outputs and the scratch workspace are allocated here
with torch (caching allocator) on the logits' device; everything runs asynchronously on
``torch.cuda.current_stream()``.
"""

from __future__ import annotations

import torch

from .params import Prepared

_C = None
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def load() -> None:
    """Import the compiled extension and check for a GPU (raises with the reason otherwise)."""
    global _C
    if _C is None:
        try:
            from safedecode import _C_cuda as ext  # noqa: PLC0415 - optional compiled module
        except ImportError as exc:
            raise ImportError(f"safedecode._C_cuda is not built ({exc}); it is built by "
                              "setup.py when nvcc and a CUDA build of torch are present") from exc
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False (no GPU or no CUDA torch)")
        # Probe the runtime on the current device: an old driver or a GPU the extension has no
        # code for fails here, with CUDA's reason, instead of at the first call.
        ext.workspace_bytes(1, 1)
        _C = ext


def problem_args(p: Prepared, with_seed: bool = True) -> tuple:
    """The kernels' problem description: pointers, shapes, strides (shared with the tests'
    emulated build)."""
    z = p.logits
    k, b, v = z.shape
    args = (z.data_ptr(), DTYPE_CODES[z.dtype], k, b, v, z.stride(0), z.stride(1),
            p.weights.data_ptr(), p.temperature.data_ptr(), p.top_k.data_ptr(),
            p.top_p.data_ptr(), p.log_min_p.data_ptr(), p.log_beta.data_ptr())
    if with_seed:
        args += (p.seed.data_ptr(), p.step.data_ptr())
    return args + (p.rule, p.anchor)


def check_prepared(p: Prepared) -> None:
    """Device, dtype and layout checks the kernels rely on (prepare() already ensures them)."""
    dev = p.logits.device
    expected = {
        "weights": (p.weights, torch.float32), "temperature": (p.temperature, torch.float32),
        "top_k": (p.top_k, torch.int64), "top_p": (p.top_p, torch.float32),
        "log_min_p": (p.log_min_p, torch.float32), "log_beta": (p.log_beta, torch.float32),
        "seed": (p.seed, torch.int64), "step": (p.step, torch.int64),
    }
    for name, (t, dtype) in expected.items():
        if t.device != dev or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {dtype} tensor on {dev}")
    k, b, v = p.logits.shape
    if b and v > 1 and p.logits.stride(2) != 1:
        raise ValueError("logits: the vocabulary dim must be contiguous")


def _device(p: Prepared) -> torch.device:
    dev = p.logits.device
    if dev.type != "cuda":
        raise ValueError(f"logits: the cuda backend needs CUDA tensors, got {dev}")
    check_prepared(p)
    return dev


def _workspace(b: int, v: int, dev: torch.device) -> torch.Tensor:
    return torch.empty(_C.workspace_bytes(b, v), dtype=torch.uint8, device=dev)


def contrastive_sample(p: Prepared, return_logprobs: bool):
    """Tokens [B] int64, log-probs [B] fp32 or None, status [B] int32."""
    load()
    dev = _device(p)
    _, b, v = p.logits.shape
    with torch.cuda.device(dev):
        tokens = torch.empty(b, dtype=torch.int64, device=dev)
        status = torch.empty(b, dtype=torch.int32, device=dev)
        lps = torch.empty(b, dtype=torch.float32, device=dev) if return_logprobs else None
        if b == 0:
            return tokens, lps, status
        ws = _workspace(b, v, dev)
        stream = torch.cuda.current_stream(dev).cuda_stream
        _C.contrastive_sample(*problem_args(p), ws.data_ptr(), ws.numel(), tokens.data_ptr(),
                              lps.data_ptr() if lps is not None else 0, status.data_ptr(),
                              stream)
    return tokens, lps, status


def contrastive_logprobs(p: Prepared):
    """Final log-distribution [B, V] fp32 and status [B] int32."""
    load()
    dev = _device(p)
    _, b, v = p.logits.shape
    with torch.cuda.device(dev):
        out = torch.empty(b, v, dtype=torch.float32, device=dev)
        status = torch.empty(b, dtype=torch.int32, device=dev)
        if b == 0:
            return out, status
        ws = _workspace(b, v, dev)
        stream = torch.cuda.current_stream(dev).cuda_stream
        _C.contrastive_logprobs(*problem_args(p, with_seed=False), ws.data_ptr(), ws.numel(),
                                out.data_ptr(), status.data_ptr(), stream)
    return out, status


def philox_uniform(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The device's Philox uniforms for int64 ``seed`` / ``step`` [N] on a GPU (a test hook)."""
    load()
    seed = seed.to(torch.int64).contiguous()
    step = step.to(device=seed.device, dtype=torch.int64).contiguous()
    if seed.device.type != "cuda":
        raise ValueError(f"seed: the cuda backend needs CUDA tensors, got {seed.device}")
    out = torch.empty(seed.shape, dtype=torch.float64, device=seed.device)
    if seed.numel():
        with torch.cuda.device(seed.device):
            _C.philox_uniform_device(seed.data_ptr(), step.data_ptr(), out.data_ptr(), out.numel(),
                                     torch.cuda.current_stream(seed.device).cuda_stream)
    return out
