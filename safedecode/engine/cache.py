"""The slot KV cache (a transformers ``Cache``) and the store of shared branch prefixes.

Every layer keeps one ``[rows, heads, columns + 1, dim]`` key and value buffer, allocated once.
A *row* is one branch of one sequence; its tokens live left-aligned in columns ``0 .. n-1`` (the
column of a token is its position). Before each forward the engine *binds* the cache
(:meth:`SlotCache.bind`): which rows the forward runs on (a contiguous ``slice`` — attention then
reads a view, no copy — or an index tensor, which gathers those rows' first ``attend`` columns),
the column each input token is written to (``cols [R, q]``; the last column is a sink that padding
tokens write to and nothing reads) and how many columns attention sees (``attend``, rounded up to
a bucket so shapes repeat). A *packed* binding (:mod:`.packed`) gives a row and a column per
token of a ``[1, N]`` forward instead. Writes are one ``index_put`` per layer; nothing is
concatenated, and no other row's KV is touched when a sequence joins, leaves or forks.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections import OrderedDict
from dataclasses import dataclass

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


@dataclass
class Binding:
    """What the next forward reads and writes (see the module docstring)."""

    rows: slice | torch.Tensor  # the forward's rows, in input order
    index: torch.Tensor  # [R] absolute row ids (the same rows as a tensor)
    cols: torch.Tensor  # [R, q] column each input token's KV is written to
    attend: int  # columns attention reads: 0 .. attend-1
    packed: bool = False  # a packed forward: ``index``/``cols`` are per token ``[N]``
    start: int = 0  # sliding-window layers read columns start .. attend-1


class SlotLayer(DynamicLayer):
    """One layer's keys and values in fixed buffers, written at the bound columns."""

    def __init__(self, owner: SlotCache, sliding: bool = False) -> None:
        super().__init__()
        self.sliding = sliding  # a sliding-window layer: reads from the binding's start
        # a weak reference: the owner holds its layers, so a strong one would make a reference
        # cycle that keeps every layer's KV buffers alive until a full garbage collection (a
        # long DeAL evaluation grew ~1.3 GB per batch that way)
        self._owner = weakref.ref(owner)

    @property
    def owner(self) -> SlotCache:
        return self._owner()

    def allocate(self, heads: int, k_dim: int, v_dim: int, dtype, device) -> None:
        rows, cols = self.owner.rows, self.owner.columns + 1
        self.keys = torch.zeros(rows, heads, cols, k_dim, dtype=dtype, device=device)
        self.values = torch.zeros(rows, heads, cols, v_dim, dtype=dtype, device=device)
        self.dtype, self.device = dtype, device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor,
                            *args) -> None:
        self.allocate(key_states.shape[1], key_states.shape[-1], value_states.shape[-1],
                      key_states.dtype, key_states.device)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b = self.owner.binding
        if b.packed:  # [1, H, N, D] tokens of many rows: token i goes to (index[i], cols[i])
            self.keys[b.index, :, b.cols] = key_states[0].transpose(0, 1).to(self.dtype)
            self.values[b.index, :, b.cols] = value_states[0].transpose(0, 1).to(self.dtype)
            return self.keys, self.values  # packed_attention picks each group's rows
        idx = b.index[:, None]
        self.keys[idx, :, b.cols] = key_states.transpose(1, 2).to(self.dtype)
        self.values[idx, :, b.cols] = value_states.transpose(1, 2).to(self.dtype)
        # a slice of rows is a view; an index tensor gathers those rows' first ``attend`` columns
        lo = b.start if self.sliding else 0
        return self.keys[b.rows, :, lo:b.attend], self.values[b.rows, :, lo:b.attend]

    def get_seq_length(self) -> int:
        b = self.owner.binding
        return 0 if b is None or b.packed else b.attend - b.cols.shape[1]

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        return self.owner.binding.attend, 0

    def get_max_length(self) -> int:
        return self.owner.columns

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor, n: int) -> None:
        if self.is_initialized:
            self.keys[dst, :, :n] = self.keys[src, :, :n]
            self.values[dst, :, :n] = self.values[src, :, :n]

    def write(self, rows: torch.Tensor, start: int, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        if not self.is_initialized:
            self.allocate(keys.shape[1], keys.shape[-1], values.shape[-1], keys.dtype,
                          keys.device)
        n = keys.shape[2]
        self.keys[rows, :, start:start + n] = keys
        self.values[rows, :, start:start + n] = values


class SlotCache(Cache):
    """``rows`` x ``columns`` slots of KV per layer; see the module docstring. ``sliding[i]``:
    layer i attends through a sliding window (it reads from the binding's ``start``)."""

    def __init__(self, num_layers: int, rows: int, columns: int,
                 sliding: tuple[bool, ...] = ()) -> None:
        self.rows, self.columns = rows, columns
        self.binding: Binding | None = None
        flags = sliding or (False,) * num_layers
        super().__init__(layers=[SlotLayer(self, s) for s in flags])

    @property
    def sink(self) -> int:
        """The column padding tokens write to (never attended)."""
        return self.columns

    def bind(self, rows: slice | torch.Tensor, index: torch.Tensor, cols: torch.Tensor,
             attend: int, packed: bool = False, start: int = 0) -> None:
        self.binding = Binding(rows, index, cols, attend, packed, start)

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor, n: int) -> None:
        """Copy the first ``n`` columns of rows ``src`` into rows ``dst`` (fork)."""
        for layer in self.layers:
            layer.copy_rows(src, dst, n)

    def read(self, row: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of row ``row``'s first ``n`` columns per layer, ``[1, H, n, D]``."""
        return [(layer.keys[row:row + 1, :, :n].clone(), layer.values[row:row + 1, :, :n].clone())
                for layer in self.layers]

    def write_prefix(self, rows: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]
                     ) -> None:
        """Write a shared prefix's per-layer KV ``[1, H, P, D]`` into columns ``0 .. P-1``."""
        for layer, (k, v) in zip(self.layers, kv, strict=True):
            layer.write(rows, 0, k, v)

    def nbytes_per_column(self) -> int:
        """Bytes of KV one row's column takes over all layers (0 before the first write)."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                total += (layer.keys[0, :, 0].numel() * layer.keys.element_size()
                          + layer.values[0, :, 0].numel() * layer.values.element_size())
        return total


PREFIX_STORE_BYTES = 512 * 2**20  # the default bound of a decoder's prefix store
TURN_STORE_BYTES = 512 * 2**20  # ... and of its finished chat turns' KV (KeptTurns.keep)


class PrefixStore:
    """Per-branch prefix KV, computed once and reused by every request and every later call.

    At most ``max_bytes`` of KV (default 512 MiB; the newest prefix is always kept): the least
    recently used prefix is dropped first, and recomputed when next needed. Requests may bring
    any number of distinct system messages, each with its own prefixes: unbounded, the store
    would grow with them."""

    def __init__(self, max_bytes: int = PREFIX_STORE_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes: a number of bytes >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._kv: OrderedDict[str, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._bytes: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        self.evicted = 0
        self.computed_tokens = 0  # columns computed by the model (an extended prefix: its new)
        self.forwards = 0  # the model forwards that computed them (several prefixes in one)
        # prefixes computed in chunks (ModelStep.advance_prefix): key -> columns so far,
        # stored under "key#columns" until extended
        self.partial: LRU = LRU(1024)

    def __contains__(self, key: str) -> bool:
        return key in self._kv

    def __len__(self) -> int:
        return len(self._kv)

    @property
    def nbytes(self) -> int:
        return sum(self._bytes.values())

    def get(self, key: str):
        self.hits += 1
        self._kv.move_to_end(key)
        return self._kv[key]

    def put(self, key: str, kv: list[tuple[torch.Tensor, torch.Tensor]],
            computed: int | None = None) -> None:
        """Store ``key``'s KV, of which ``computed`` columns (default: all) were computed."""
        self.misses += 1
        self.computed_tokens += kv[0][0].shape[2] if computed is None else computed
        self._kv[key] = kv
        self._kv.move_to_end(key)
        self._bytes[key] = sum(k.nbytes + v.nbytes for k, v in kv)
        while len(self._kv) > 1 and self.nbytes > self.max_bytes:
            old, _ = self._kv.popitem(last=False)
            del self._bytes[old]
            self.evicted += 1

    def drop(self, key: str) -> None:
        """Forget ``key``'s KV (if stored)."""
        if self._kv.pop(key, None) is not None:
            del self._bytes[key]

    def demote(self, key: str) -> None:
        """Make ``key`` the first to be dropped (what a chat's next turn extended: its kept
        turn or its history, rarely wanted again)."""
        if key in self._kv:
            self._kv.move_to_end(key, last=False)

    def clear(self) -> None:
        self._kv.clear()
        self._bytes.clear()


class LRU(OrderedDict):
    """A dict of at most ``size`` entries; reading or writing an entry makes it the most
    recent, and the least recently used is dropped first."""

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size: a number of entries >= 1, got {size!r}")
        super().__init__()
        self.size = size
        self.evicted = 0

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
            self.evicted += 1
