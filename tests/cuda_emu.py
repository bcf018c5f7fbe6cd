"""Build the CUDA kernels against the CPU emulator (csrc/cuda/emu) and wrap them like a backend.

Used by tests/test_cuda_emulated.py: it checks the kernels' logic (radix selects, compaction,
scans, draw) on machines without a GPU. Each CUDA thread is a fiber (csrc/cuda/emu/emu.h), every
barrier a round of switches: keep the cases small.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

from safedecode.ops.cuda import check_prepared, problem_args
from safedecode.ops.params import Prepared

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "csrc" / "cuda" / "emu" / "emu_module.cpp"
NAME = "_sd_cuda_emu"


def missing() -> str | None:
    """Why the emulated build cannot run here, or None."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++)"
    try:
        import pybind11  # noqa: F401, PLC0415
    except ImportError:
        return "pybind11 is not installed"
    return None


def build(out_dir: Path):
    """Compile the emulator module into out_dir and import it."""
    import pybind11  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = out_dir / f"{NAME}{suffix}"
    cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-O2", "-ffp-contract=off", "-DSD_EMULATE",
           f"-DSD_EMU_MODULE={NAME}", "-shared", "-fPIC", "-pthread",
           f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}", str(SRC),
           "-o", str(target)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    spec = importlib.util.spec_from_file_location(NAME, target)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = mod
    spec.loader.exec_module(mod)
    return mod


class EmulatedBackend:
    """The CUDA backend's contract on CPU tensors, run by the emulator.

    variant 0 uses 64-thread row blocks (fast); 1 the real 512 / 256 configuration. ``cap`` is the
    shared-memory candidate capacity (small values force the global-memory fallback) and
    ``num_sms`` steers how many chunks each row is split into.
    """

    def __init__(self, mod, variant: int = 0, cap: int = 1024, num_sms: int = 4):
        self.mod, self.variant, self.cap, self.num_sms = mod, variant, cap, num_sms

    def _ws(self, b: int, v: int) -> torch.Tensor:
        self.last_ws = torch.empty(self.mod.workspace_bytes(b, v, self.num_sms, self.cap,
                                                            self.variant), dtype=torch.uint8)
        self.last_bv = (b, v)
        return self.last_ws

    def compacted(self) -> torch.Tensor:
        """Per row of the last call: the candidates the split kernels compacted for the row
        kernel (0: none, the row kernel read the whole row itself)."""
        b, v = self.last_bv
        off = self.mod.candidates_offset(b, v, self.num_sms, self.cap, self.variant)
        return self.last_ws[off:off + 8 * b].view(torch.int64).clone()

    def contrastive_sample(self, p: Prepared, return_logprobs: bool):
        check_prepared(p)
        _, b, v = p.logits.shape
        tokens = torch.empty(b, dtype=torch.int64)
        status = torch.empty(b, dtype=torch.int32)
        lps = torch.empty(b, dtype=torch.float32) if return_logprobs else None
        ws = self._ws(b, v)
        self.mod.contrastive_sample(*problem_args(p), ws.data_ptr(), ws.numel(),
                                    tokens.data_ptr(), lps.data_ptr() if lps is not None else 0,
                                    status.data_ptr(), self.num_sms, self.cap, self.variant)
        return tokens, lps, status

    def contrastive_logprobs(self, p: Prepared):
        check_prepared(p)
        _, b, v = p.logits.shape
        out = torch.empty(b, v, dtype=torch.float32)
        status = torch.empty(b, dtype=torch.int32)
        ws = self._ws(b, v)
        self.mod.contrastive_logprobs(*problem_args(p, with_seed=False), ws.data_ptr(),
                                      ws.numel(), out.data_ptr(), status.data_ptr(),
                                      self.num_sms, self.cap, self.variant)
        return out, status
