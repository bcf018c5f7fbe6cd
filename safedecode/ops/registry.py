"""Backend discovery and selection.

A backend is a module with ``contrastive_sample(prepared, return_logprobs)`` and
``contrastive_logprobs(prepared)``, plus ``load() -> None`` that raises ImportError/RuntimeError
with the reason it cannot run here. Import of safedecode never fails because a backend is missing:
backends are loaded lazily and their failure reasons are kept for ``safedecode info``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("reference", "cpp", "triton", "cuda")
# Preference order of ``backend="auto"`` per device type (fastest first).
AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}
# Device types each backend runs on.
DEVICES = {
    "reference": None,  # any
    "cpp": ("cpu",),
    "triton": ("cuda",),  # plus CPU tensors under TRITON_INTERPRET=1
    "cuda": ("cuda",),
}
ENV_VAR = "SAFEDECODE_BACKEND"

_loaded: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}


def load(name: str) -> ModuleType:
    """Import backend ``name`` or raise RuntimeError saying why it is unavailable."""
    if name not in BACKENDS:
        raise ValueError(f"backend: must be one of {('auto',) + BACKENDS}, got {name!r}")
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        raise RuntimeError(f"backend {name!r} is unavailable: {_errors[name]}")
    try:
        mod = importlib.import_module(f"safedecode.ops.{name}")
        if hasattr(mod, "load"):
            mod.load()
    except Exception as exc:  # noqa: BLE001 - any failure means "not available", with its reason
        _errors[name] = f"{type(exc).__name__}: {exc}"
        raise RuntimeError(f"backend {name!r} is unavailable: {_errors[name]}") from exc
    _loaded[name] = mod
    return mod


def status() -> dict[str, str]:
    """Map each backend to "ok" or the reason it did not load."""
    out = {}
    for name in BACKENDS:
        try:
            load(name)
            out[name] = "ok"
        except RuntimeError:
            out[name] = _errors[name]
    return out


def _runs_on(name: str, device: torch.device) -> bool:
    devs = DEVICES[name]
    if devs is None or device.type in devs:
        return True
    return name == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and device.type == "cpu"


def select(backend: str, device: torch.device) -> ModuleType:
    """Resolve ``backend`` (a name, or "auto": ``SAFEDECODE_BACKEND``, else the fastest here)."""
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            try:
                return load(name)
            except RuntimeError:
                continue
        return load("reference")
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if not _runs_on(backend, device):
        raise ValueError(f"backend: {backend!r} does not run on {device.type} tensors "
                         f"(runs on {', '.join(DEVICES[backend] or ('any',))})")
    try:
        return load(backend)
    except RuntimeError as exc:
        raise ValueError(f"backend: {exc}; see `safedecode info`") from exc
