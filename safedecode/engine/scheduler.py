"""Admission of waiting requests into free slots, first come first served.

A request added while others run waits here until a slot is free; at the next step boundary the
engine prefills every request admitted in the same packed forward as the running sequences'
decode (:mod:`.packed`; measured in ``benchmarks/results/engine_cpu.md`` and
``serve_cpu.md``). The queue is bounded: adding
past ``max_queue`` waiting requests is a ``ValueError`` naming ``max_queue``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFull(ValueError):
    """The waiting queue is full (a server answers 429 and asks the client to retry)."""


class Scheduler(Generic[T]):
    """A bounded FIFO of requests waiting for a slot."""

    def __init__(self, max_queue: int) -> None:
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise QueueFull(f"max_queue: must be an integer >= 0, got {max_queue!r}")
        self.max_queue = max_queue
        self._waiting: deque[T] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, item: T) -> None:
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(f"max_queue: {len(self._waiting)} requests already wait for a slot "
                             f"(max_queue={self.max_queue}); retry after some finish")
        self._waiting.append(item)

    def add_front(self, item: T) -> None:
        """Put ``item`` at the head of the queue (it keeps its place; no size check)."""
        self._waiting.appendleft(item)

    def waiting(self) -> list[T]:
        return list(self._waiting)

    def remove(self, pred) -> T | None:
        """Drop and return the first waiting item for which ``pred`` holds (abort)."""
        for item in self._waiting:
            if pred(item):
                self._waiting.remove(item)
                return item
        return None

    def admit(self, free: int, size: Callable[[T], int] = lambda _: 1,
              cost: Callable[[T], int] = lambda _: 0, budget: int | None = None) -> list[T]:
        """Waiting items, oldest first, while their ``size`` (slots each needs) fits ``free``
        and their summed ``cost`` (prefill tokens) stays within ``budget`` (None: no limit; the
        first item is always admitted when it fits, so a long prompt still runs). An item that
        does not fit yet stops admission (no overtaking)."""
        out: list[T] = []
        spent = 0
        while self._waiting and size(self._waiting[0]) <= free:
            c = cost(self._waiting[0])
            if budget is not None and out and spent + c > budget:
                break
            spent += c
            free -= size(self._waiting[0])
            out.append(self._waiting.popleft())
        return out
