"""`python -m safedecode.info`: which backends loaded here, and why the others did not."""

from __future__ import annotations

import os
import platform

import torch

from safedecode.ops import registry


def collect() -> dict:
    """Environment and backend status as a plain dict."""
    status = registry.status()
    auto = {}
    for dev in ("cpu", "cuda"):
        if dev == "cuda" and not torch.cuda.is_available():
            auto[dev] = "no CUDA device"
            continue
        auto[dev] = registry.select("auto", torch.device(dev)).__name__.rsplit(".", 1)[-1]
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        from safedecode import _C

        cpu_isa, cpu_isas = _C.cpu_isa(), _C.cpu_isas()
    except ImportError:
        cpu_isa, cpu_isas = None, []
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": triton_version,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "SAFEDECODE_BACKEND": os.environ.get(registry.ENV_VAR),
        "backends": status,
        "auto": auto,
        "cpu_isa": cpu_isa,
        "cpu_isas": cpu_isas,
        "SAFEDECODE_CPU_ISA": os.environ.get("SAFEDECODE_CPU_ISA"),
    }


def render() -> str:
    """Human-readable report."""
    info = collect()
    lines = [f"safedecode on Python {info['python']} ({info['machine']}), torch {info['torch']}"
             f" (CUDA {info['torch_cuda'] or 'none'}), triton {info['triton'] or 'not installed'}",
             f"GPU: {info['gpu'] or 'none'}; CPU threads: {info['cpu_threads']}", "backends:"]
    for name, st in info["backends"].items():
        line = f"  {name:<10} {'loaded' if st == 'ok' else 'unavailable: ' + st}"
        if name == "cpp" and info["cpu_isa"]:
            line += f" (vector ISA {info['cpu_isa']}; runnable: {', '.join(info['cpu_isas'])})"
        lines.append(line)
    lines.append("auto picks: " + ", ".join(f"{d} -> {b}" for d, b in info["auto"].items()))
    if info["SAFEDECODE_BACKEND"]:
        lines.append(f"SAFEDECODE_BACKEND={info['SAFEDECODE_BACKEND']} overrides auto")
    if info["SAFEDECODE_CPU_ISA"]:
        lines.append(f"SAFEDECODE_CPU_ISA={info['SAFEDECODE_CPU_ISA']} asks for that vector ISA")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
