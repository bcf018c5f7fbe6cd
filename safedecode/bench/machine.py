"""Where a result was measured: machine description, git commit, copy bandwidth."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from safedecode.bench.timing import measure


class BenchError(ValueError):
    """A benchmark cannot run as asked (bad option, missing device or backend)."""


def require_device(device: str) -> torch.device:
    """``torch.device(device)`` for ``cpu`` or ``cuda``; a clear error when CUDA is missing."""
    if device not in ("cpu", "cuda"):
        raise BenchError(f"--device: must be 'cpu' or 'cuda', got {device!r}")
    from safedecode.models import cuda_unavailable  # noqa: PLC0415

    why = cuda_unavailable() if device == "cuda" else None
    if why is not None:
        raise BenchError(f"--device cuda: CUDA is not available ({why}); run with --device "
                         "cpu, or on a machine with a GPU and a CUDA torch")
    return torch.device(device)


def add_model_options(ap) -> None:  # noqa: ANN001 - an argparse.ArgumentParser
    """The benchmark scripts' ``--device``, ``--dtype`` and ``--model`` options."""
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    ap.add_argument("--model", default="default", help="a local model folder or .gguf file "
                    "(default: the embedded SmolLM2-135M-Instruct)")


def load_bench_model(args):  # noqa: ANN001, ANN201 - argparse namespace -> (model, tokenizer)
    """``(model, tokenizer)`` for a script's ``--model/--dtype/--device`` (clear errors)."""
    require_device(args.device)
    from safedecode.models import load_model  # noqa: PLC0415 - heavy

    return load_model(args.model, dtype=args.dtype, device=args.device)


def _cpu_info() -> tuple[str, int | None]:
    """(CPU model name, physical cores) from /proc/cpuinfo where it exists."""
    name, cores = platform.processor() or platform.machine(), set()
    try:
        phys = "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            if key == "model name":
                name = val
            elif key == "physical id":
                phys = val
            elif key == "core id":
                cores.add((phys, val))
    except OSError:
        pass
    return name, len(cores) or None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def describe(device: str = "cpu") -> dict:
    """CPU, cores, threads, library versions and GPU (if any) as a plain dict."""
    cpu, physical = _cpu_info()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    gpu = None
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_GB": round(props.total_memory / 1e9, 1),
               "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
    try:
        from safedecode import _C  # noqa: PLC0415 - optional compiled module

        cpu_isa = _C.cpu_isa()
    except ImportError:
        cpu_isa = None
    return {
        "cpu": cpu,
        "cpu_isa": cpu_isa,
        "physical_cores": physical,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "flashinfer": _version("flashinfer-python") or _version("flashinfer"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": gpu,
    }


def machine_line(m: dict) -> str:
    """One line for markdown: CPU, cores, threads, versions, GPU."""
    gpu = m.get("gpu")
    if isinstance(gpu, dict):
        gpu = f"{gpu['name']} ({gpu['memory_GB']} GB)"
    cores = f"{m['logical_cores']} logical cores"
    if m.get("physical_cores"):
        cores = f"{m['physical_cores']} physical / " + cores
    trit = f", triton {m['triton']}" if m.get("triton") else ""
    isa = f", C++ kernels: {m['cpu_isa']}" if m.get("cpu_isa") else ""
    return (f"{m['cpu']}, {cores}, torch {m['torch']} ({m['torch_threads']} threads){trit}{isa}, "
            f"GPU: {gpu or 'none'}")


def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` when it has uncommitted changes), or None."""
    for where in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                                 text=True, timeout=10, check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=where, capture_output=True, text=True, timeout=10,
                                   check=False).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        return sha + ("+dirty" if dirty.strip() else "")
    return None


def copy_bandwidth(device: str, nbytes: int = 256 << 20, max_reps: int = 20) -> float:
    """GB/s of a large tensor copy, bytes read + written (the STREAM convention); best of runs."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device=device, min_time=0.5, min_reps=3,
                max_reps=max_reps).min_s
    return 2 * nbytes / t / 1e9
