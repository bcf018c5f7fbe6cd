"""Timing: warm-up, repeated runs, median / min / max; round-robin for fair ratios."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def sync(device: str) -> None:
    """Wait for queued GPU work (a no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Seconds of each timed run (warm-up excluded), plus the peak memory seen, if measured."""

    times: list[float]
    peak_bytes: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def min_s(self) -> float:
        return min(self.times)

    @property
    def max_s(self) -> float:
        return max(self.times)

    @property
    def reps(self) -> int:
        return len(self.times)


def measure(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 2,
            min_reps: int = 5, max_reps: int = 200, min_time: float = 0.5) -> Timing:
    """Time ``fn()`` after ``warmup`` calls: at least ``min_reps`` runs and ``min_time`` seconds,
    at most ``max_reps`` runs."""
    if min_reps < 1 or max_reps < min_reps:
        raise ValueError(f"need 1 <= min_reps <= max_reps, got {min_reps}, {max_reps}")
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps
                                     or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return Timing(times)


def measure_round_robin(fns: dict[str, Callable[[], object]], *, device: str = "cpu",
                        warmup: int = 1, repeats: int = 3,
                        monitor: Callable[[], contextlib.AbstractContextManager] | None = None,
                        on_run: Callable[[str, float], None] | None = None) -> dict[str, Timing]:
    """Time each of ``fns`` ``repeats`` times, interleaved (one run of each per round), so slow
    drift of a shared machine hits every contender alike. ``monitor()`` is a context manager
    entered around each timed run whose ``peak`` (bytes) is kept as the Timing's peak."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    out = {name: Timing([]) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            with monitor() if monitor else contextlib.nullcontext() as mon:
                t0 = time.perf_counter()
                fn()
                sync(device)
                dt = time.perf_counter() - t0
            out[name].times.append(dt)
            if mon is not None:
                out[name].peak_bytes = max(out[name].peak_bytes, mon.peak)
            if on_run:
                on_run(name, dt)
    return out
