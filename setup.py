"""Builds safedecode._C (C++ CPU kernels, pybind11 + OpenMP) and, where nvcc and a CUDA torch exist,
safedecode._C_cuda. The CUDA build never fails the install: without a toolkit it is skipped."""

from __future__ import annotations

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # csrc/cuda/build.py under PEP 517

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

CPU_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-std=c++17"]
if os.environ.get("SAFEDECODE_MARCH"):
    CPU_FLAGS.append(f"-march={os.environ['SAFEDECODE_MARCH']}")
if os.environ.get("SAFEDECODE_SANITIZE"):
    CPU_FLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-ffp-contract=off", "-fopenmp",
                 "-std=c++17", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]

ext_modules = [
    Pybind11Extension(
        "safedecode._C",
        sources=["csrc/cpu/contrastive_sample.cpp", "csrc/cpu/bindings.cpp"],
        include_dirs=["csrc"],
        extra_compile_args=CPU_FLAGS,
        extra_link_args=[f for f in CPU_FLAGS if f.startswith(("-fopenmp", "-fsanitize"))],
    )
]


def _cuda_wanted() -> str | None:
    """Return the reason to skip the CUDA extension, or None to build it."""
    if os.environ.get("SAFEDECODE_NO_CUDA"):
        return "SAFEDECODE_NO_CUDA is set"
    if shutil.which("nvcc") is None:
        return "nvcc not found"
    try:
        import torch  # noqa: PLC0415 - only present with --no-build-isolation
    except ImportError:
        return "torch not importable in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None:
        return "torch is a CPU build"
    return None


class BuildExt(build_ext):
    """build_ext that adds the optional CUDA extension when it can be built."""

    def run(self) -> None:
        reason = _cuda_wanted()
        if reason is None:
            try:
                from csrc.cuda.build import cuda_extension  # noqa: PLC0415

                self.extensions.append(cuda_extension())
            except Exception as exc:  # noqa: BLE001 - optional
                print(f"safedecode: skipping the CUDA extension: {exc}", file=sys.stderr)
        else:
            print(f"safedecode: skipping the CUDA extension: {reason}", file=sys.stderr)
        super().run()


setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
    package_dir={"safedecode.triton_kernels": "triton_kernels"},
    package_data={"safedecode.data": ["*.jsonl", "*.md"], "safedecode.methods": ["assets/*"]},
    packages=find_packages(include=["safedecode", "safedecode.*"]) + ["safedecode.triton_kernels"],
)
