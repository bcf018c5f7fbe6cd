"""Build helper for the optional CUDA extension ``safedecode._C_cuda`` (used by setup.py).

``cuda_extension()`` compiles ``contrastive_sample.cu`` with nvcc into an object file right away
and returns a pybind11 ``Extension`` that links it with the host-compiled ``bindings.cpp`` and the
static CUDA runtime, so the ordinary setuptools ``build_ext`` finishes the job (it never sees a
``.cu`` file). It raises on any problem, and setup.py lets that fail the install: where the
extension is wanted (``skip_reason()`` is None) a skipped build would be a silent Triton fallback.

Self-contained on purpose (no package imports): setup.py may load it by file path.

Environment:
    SAFEDECODE_CUDA_ARCHS  compute capabilities, e.g. "80;90" (default). SASS for each, plus PTX
                           of the highest so newer GPUs can JIT it.
    NVCC / CUDA_HOME       the compiler (default: nvcc on PATH).
    SAFEDECODE_NO_CUDA     set (non-empty) to install without the CUDA extension.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_ARCHS = "80;90"


def nvcc_path() -> str:
    nvcc = os.environ.get("NVCC")
    if not nvcc and os.environ.get("CUDA_HOME"):
        cand = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        nvcc = str(cand) if cand.exists() else None
    nvcc = nvcc or shutil.which("nvcc")
    if not nvcc:
        raise RuntimeError("nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)")
    return nvcc


def cuda_home(nvcc: str) -> Path:
    """The toolkit root holding libcudart_static.a (nvcc may be a wrapper script elsewhere)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             str(Path(nvcc).resolve().parent.parent), "/usr/local/cuda"]
    for c in filter(None, cands):
        if _cudart_dirs(Path(c)):
            return Path(c)
    raise RuntimeError(f"libcudart_static.a not found (tried {cands}); set CUDA_HOME")


def _cudart_dirs(home: Path) -> list[str]:
    dirs = [home / "lib64", home / "lib", *sorted((home / "targets").glob("*/lib"))]
    return [str(d) for d in dirs if (d / "libcudart_static.a").exists()]


def nvcc_version(nvcc: str) -> tuple[int, int]:
    out = subprocess.run([nvcc, "--version"], check=True, capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot parse `nvcc --version`: {out!r}")
    return int(m.group(1)), int(m.group(2))


def gencode_flags(archs: str | None = None) -> list[str]:
    """-gencode flags: SASS per listed arch, PTX for the highest."""
    archs = archs or os.environ.get("SAFEDECODE_CUDA_ARCHS", DEFAULT_ARCHS)
    caps = sorted({int(a) for a in re.split(r"[;, ]+", archs.strip()) if a})
    if not caps:
        raise RuntimeError("SAFEDECODE_CUDA_ARCHS is empty")
    flags = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in caps]
    flags.append(f"-gencode=arch=compute_{caps[-1]},code=compute_{caps[-1]}")
    return flags


NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-lineinfo"]


def compile_cu(out_dir: Path | None = None, archs: str | None = None) -> Path:
    """nvcc -c contrastive_sample.cu -> object file; returns its path."""
    nvcc = nvcc_path()
    out_dir = Path(out_dir or ROOT / "build" / "cuda")
    out_dir.mkdir(parents=True, exist_ok=True)
    obj = out_dir / "contrastive_sample.o"
    src = HERE / "contrastive_sample.cu"
    cmd = [nvcc, "-c", str(src), "-o", str(obj), *NVCC_FLAGS, *gencode_flags(archs)]
    print("safedecode:", " ".join(cmd))
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return obj


def skip_reason() -> str | None:
    """Why the CUDA extension is not built here, or None to build it (a failure is then an
    error). The extension needs nvcc and pybind11 only; a CPU torch in the build environment
    means there is no GPU to use it, but no torch at all (build isolation) says nothing."""
    if os.environ.get("SAFEDECODE_NO_CUDA"):
        return "SAFEDECODE_NO_CUDA is set"
    if shutil.which(os.environ.get("NVCC", "nvcc")) is None:
        return "nvcc not found"
    try:
        import torch  # noqa: PLC0415 - only present with --no-build-isolation
    except ImportError:
        return None
    if torch.version.cuda is None:
        return "torch is a CPU build (no GPU to run it on)"
    return None


def _torch_cuda_major() -> int | None:
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None
    v = torch.version.cuda
    return int(v.split(".")[0]) if v else None


def cuda_extension():
    """The safedecode._C_cuda Extension (compiles the .cu file now; raises on failure)."""
    from pybind11.setup_helpers import Pybind11Extension  # noqa: PLC0415

    nvcc = nvcc_path()
    major, minor = nvcc_version(nvcc)
    tmajor = _torch_cuda_major()
    if tmajor is not None and tmajor != major:
        print(f"safedecode: warning: nvcc is CUDA {major}.{minor} but torch was built with CUDA "
              f"{tmajor}; the extension needs a driver that supports CUDA {major}")
    obj = compile_cu()
    libdirs = _cudart_dirs(cuda_home(nvcc))
    return Pybind11Extension(
        "safedecode._C_cuda",
        sources=[os.path.relpath(HERE / "bindings.cpp", Path.cwd())],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args=["-O2", "-std=c++17"],
        extra_objects=[str(obj)],
        library_dirs=libdirs,
        # Static runtime: no libcudart.so.N needed at import time (the driver still must support
        # the toolkit's CUDA version).
        libraries=["cudart_static", "rt", "pthread", "dl"],
    )
