"""Counter-based Philox4x32-10 in PyTorch: the random stream every backend reproduces.

One uniform per (seed, step): ``key = (seed_lo, seed_hi)``, ``counter = (step_lo, step_hi,
SALT, 0)``; the first two output words give a 53-bit double in [0, 1). The C++, CUDA and Triton
backends implement the same function (``csrc/philox.h``, ``triton_kernels``), so a row's draw
depends only on its own seed and step, never on the batch it sits in.
"""

from __future__ import annotations

import torch

M0 = 0xD2511F53
M1 = 0xCD9E8D57
W0 = 0x9E3779B9
W1 = 0xBB67AE85
SALT = 0x5AFEDEC0  # counter word 2: separates safedecode's stream from other Philox users
MASK32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a < 2^32 and m < 2^32, so a*m < 2^64: the int64 product wraps but keeps the exact bits.
    prod = a * m
    return (prod >> 32) & MASK32, prod & MASK32


def philox4x32(counter: list[torch.Tensor], key: list[torch.Tensor], rounds: int = 10):
    """Philox4x32 on int64 tensors holding 32-bit words; returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0 = (k0 + W0) & MASK32
            k1 = (k1 + W1) & MASK32
        hi0, lo0 = _mulhilo(c0, M0)
        hi1, lo1 = _mulhilo(c2, M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uniform(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row, keyed by int64 ``seed`` and ``step`` ([B] each)."""
    seed = seed.to(torch.int64)
    step = step.to(torch.int64)
    key = [seed & MASK32, (seed >> 32) & MASK32]
    zero = torch.zeros_like(step)
    counter = [step & MASK32, (step >> 32) & MASK32, zero + SALT, zero]
    x0, x1, _, _ = philox4x32(counter, key)
    hi = (x0 >> 5).to(torch.float64)  # 27 bits
    lo = (x1 >> 6).to(torch.float64)  # 26 bits
    return (hi * 67108864.0 + lo) * (1.0 / 9007199254740992.0)
