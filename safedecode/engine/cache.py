"""A preallocated KV cache for transformers models, and the store of shared branch prefixes.

``PreallocatedLayer`` keeps one ``[rows, heads, capacity, dim]`` buffer per layer and writes each
step's keys/values in place (transformers' ``DynamicCache`` concatenates, copying the whole cache
every step); attention sees a view of the filled part only. Rows can be dropped (finished
requests) with ``select_rows``.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer


@functools.cache
def _cache_argument(forward_cls: type) -> str:
    try:
        params = inspect.signature(forward_cls.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache: Cache) -> dict:
    """``{"cache": cache}`` where the model's forward takes ``cache=`` (transformers >= 5.x, where
    ``past_key_values=`` is deprecated), else ``{"past_key_values": cache}``."""
    return {_cache_argument(type(model)): cache, "use_cache": True}


class PreallocatedLayer(DynamicLayer):
    """One layer's KV in preallocated buffers; ``length`` slots are filled."""

    def __init__(self, rows: int, capacity: int) -> None:
        super().__init__()
        self.rows, self.capacity, self.length = rows, capacity, 0

    def allocate(self, heads: int, k_dim: int, v_dim: int, dtype, device) -> None:
        self.keys = torch.zeros(self.rows, heads, self.capacity, k_dim, dtype=dtype, device=device)
        self.values = torch.zeros(self.rows, heads, self.capacity, v_dim, dtype=dtype,
                                  device=device)
        self.dtype, self.device = dtype, device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.allocate(key_states.shape[1], key_states.shape[-1], value_states.shape[-1],
                      key_states.dtype, key_states.device)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.length + n
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > capacity {self.capacity}")
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return self.capacity

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys = self.keys.index_select(0, rows)
            self.values = self.values.index_select(0, rows)
        self.rows = int(rows.numel())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)


class PreallocatedCache(Cache):
    """A transformers ``Cache`` of :class:`PreallocatedLayer` s."""

    def __init__(self, num_layers: int, rows: int, capacity: int) -> None:
        super().__init__(layers=[PreallocatedLayer(rows, capacity) for _ in range(num_layers)])

    def select_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select_rows(rows)

    def set_length(self, length: int) -> None:
        for layer in self.layers:
            layer.length = length

    @property
    def length(self) -> int:
        return self.layers[0].length


class PrefixStore:
    """Per-branch prefix KV, computed once and reused by every request and every later call."""

    def __init__(self) -> None:
        self._kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: str) -> bool:
        return key in self._kv

    def get(self, key: str):
        self.hits += 1
        return self._kv[key]

    def put(self, key: str, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.misses += 1
        self._kv[key] = kv

    def clear(self) -> None:
        self._kv.clear()
