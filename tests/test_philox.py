"""The Philox stream: known answers, and Python == C++ bit for bit."""

from __future__ import annotations

import torch

from safedecode import _C
from safedecode.ops import philox


def _words(c, k):
    t = lambda x: torch.tensor([x], dtype=torch.int64)  # noqa: E731
    return [int(w) for w in philox.philox4x32([t(x) for x in c], [t(x) for x in k])]


def test_known_answers():
    # Random123's published known-answer vectors for philox4x32-10.
    assert _words([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    m = 0xFFFFFFFF
    assert _words([m] * 4, [m, m]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]
    assert _words(pi, [0xA4093822, 0x299F31D0]) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420,
                                                    0x24126EA1]


def test_python_and_cpp_streams_agree():
    g = torch.Generator().manual_seed(0)
    seeds = torch.cat([torch.randint(0, 2**62, (200,), generator=g),
                       torch.tensor([0, 1, 2**32 - 1, 2**32, 2**63 - 1])])
    steps = torch.cat([torch.randint(0, 2**40, (200,), generator=g),
                       torch.tensor([0, 0, 7, 2**32 + 5, 2**62])])
    u = philox.uniform(seeds, steps)
    for s, t, x in zip(seeds.tolist(), steps.tolist(), u.tolist(), strict=True):
        assert _C.philox_uniform(s, t) == x
    assert ((u >= 0) & (u < 1)).all()


def test_uniforms_look_uniform():
    u = philox.uniform(torch.zeros(100_000, dtype=torch.int64), torch.arange(100_000))
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    assert (hist - 10_000).abs().max() < 500
