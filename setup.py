"""Builds safedecode._C (C++ CPU kernels, pybind11 + OpenMP) and, where nvcc exists,
safedecode._C_cuda (it needs nvcc and pybind11 only, no torch headers).

The CUDA extension is skipped only without nvcc, with a CPU build of torch in the build
environment, or with SAFEDECODE_NO_CUDA=1 (the explicit opt-out). Where it is wanted, a failed CUDA
build fails the install: ``backend="auto"`` would otherwise fall back to Triton without a word."""

from __future__ import annotations

import os
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

# The vector kernels are compiled once per ISA level into their own tables (block_dispatch.cpp
# picks one at run time), so one build uses AVX-512 where the CPU has it and still runs anywhere.
# Per file: extra flags (the GEMM wants FMA contraction; the sampling kernels must not have it).
ISA_SOURCES = {"csrc/cpu/block_kernels.cpp": [], "csrc/cpu/small_gemm.cpp": ["-ffp-contract=fast"]}
ISA_LEVELS = [("avx512", ["-march=x86-64-v4"]), ("avx2", ["-march=x86-64-v3"])]

ext_modules = [
    Pybind11Extension(
        "safedecode._C",
        sources=["csrc/cpu/contrastive_sample.cpp", "csrc/cpu/block_dispatch.cpp",
                 "csrc/cpu/bindings.cpp"],
        include_dirs=["csrc"],
        depends=["csrc/cpu/block_kernels.h", "csrc/cpu/small_gemm.h", "csrc/cpu/isa_prelude.h",
                 "csrc/cpu/contrastive_sample.h", "csrc/philox.h", *ISA_SOURCES],
        extra_compile_args=CPU_FLAGS,
        extra_link_args=[f for f in CPU_FLAGS if f.startswith(("-fopenmp", "-fsanitize"))],
    )
]


def _is_x86() -> bool:
    import platform  # noqa: PLC0415

    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


class BuildExt(build_ext):
    """build_ext that adds the per-ISA block kernels and the optional CUDA extension."""

    def build_extension(self, ext) -> None:  # noqa: ANN001 - setuptools Extension
        if ext.name == "safedecode._C":
            self._add_block_kernels(ext)
        super().build_extension(ext)

    def _add_block_kernels(self, ext) -> None:  # noqa: ANN001
        """Compile ISA_SOURCES per ISA level; a level the compiler rejects is left out."""
        base = [f for f in ext.extra_compile_args if not f.startswith("-march")]
        levels = [("baseline", [])] + (ISA_LEVELS if _is_x86() else [])
        for isa, flags in levels:
            objs = []
            try:
                for src, extra in ISA_SOURCES.items():
                    # distinct folders per level; the later -ffp-contract wins over the base flag
                    objs += self.compiler.compile(
                        [src], output_dir=os.path.join(self.build_temp, "isa_" + isa),
                        macros=[("SD_ISA", isa)], include_dirs=ext.include_dirs,
                        extra_postargs=base + flags + extra, depends=ext.depends)
            except Exception as exc:  # noqa: BLE001 - an old compiler: run without that level
                if isa == "baseline":
                    raise
                print(f"safedecode: building without the {isa} kernels: {exc}", file=sys.stderr)
                continue
            ext.extra_objects.extend(objs)
            if isa != "baseline":
                ext.define_macros.append((f"SD_HAVE_{isa.upper()}", "1"))

    def _register(self, ext) -> None:  # noqa: ANN001
        """Add ``ext`` after ``finalize_options`` ran: set what setuptools sets there for a
        plain (non-Library) extension, or its build step fails on the missing attributes."""
        ext._full_name = self.get_ext_fullname(ext.name)
        self.ext_map[ext._full_name] = ext
        ext._links_to_dynamic = ext._needs_stub = False
        ext._file_name = self.get_ext_filename(ext._full_name)
        self.extensions.append(ext)

    def run(self) -> None:
        from csrc.cuda.build import cuda_extension, skip_reason  # noqa: PLC0415

        reason = skip_reason()
        if reason is None:
            try:
                self._register(cuda_extension())
            except Exception as exc:
                raise RuntimeError(
                    f"safedecode: building the CUDA extension failed ({exc}); fix the toolkit, or "
                    "set SAFEDECODE_NO_CUDA=1 to install without it (backend 'cuda' then "
                    "unavailable)") from exc
        else:
            print(f"safedecode: skipping the CUDA extension: {reason}", file=sys.stderr)
        super().run()


setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
    package_dir={"safedecode.triton_kernels": "triton_kernels"},
    package_data={"safedecode.data": ["*.jsonl", "*.md"],
                  "safedecode.methods": ["assets/*", "assets/harmless_rm/*",
                                        "assets/unsafe_lora/*",
                                        "assets/unsafe_opposite_lora/*",
                                        "assets/ta_sft_lora/*"]},
    packages=find_packages(include=["safedecode", "safedecode.*"]) + ["safedecode.triton_kernels"],
)
