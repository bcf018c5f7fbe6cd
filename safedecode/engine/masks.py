"""Attention masks for the model's layer kinds: full causal attention and sliding windows.

The engine builds its own additive masks (slots, shared prefixes and packed forwards do not fit
the masks transformers derives from a 2-D padding mask), and a 4-D mask reaches every layer as
it is: transformers applies a layer's sliding window only to masks it builds itself. So the
window is applied here, in column space (a row's column is its token's position): a query at
column ``q`` may see key column ``j`` when ``q - window < j <= q``, as transformers'
``sliding_window_overlay``. Models that mix the kinds (``config.layer_types``: Gemma 2/3,
Qwen2 with windowed layers, Cohere2, GPT-OSS ...) take ``{layer type: mask}``; models whose
every layer is windowed (``config.sliding_window`` without ``layer_types``: Mistral, Phi-3,
Starcoder2, ...) take the windowed mask alone. Other layer kinds (chunked, linear or recurrent
attention) are refused by name.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from safedecode.models import text_config

FULL, SLIDING = "full_attention", "sliding_attention"


@functools.lru_cache(maxsize=64)
def _columns(n: int, device: torch.device) -> torch.Tensor:
    """``arange(n)`` on ``device``, made once per width (widths repeat: they are bucketed)."""
    return torch.arange(n, device=device)


@dataclass(frozen=True)
class LayerMasks:
    """Which of a model's layers attend through a sliding window, and the masks they take.

    ``window``: the window in tokens (None: every layer attends to every earlier column);
    ``keyed``: the model takes ``{layer type: mask}``; ``sliding``: per layer, whether it uses
    the window."""

    window: int | None = None
    keyed: bool = False
    sliding: tuple[bool, ...] = ()

    @property
    def sliding_layers(self) -> int:
        return sum(self.sliding)

    @classmethod
    def of(cls, model) -> LayerMasks:
        """The layout of ``model``'s attention; a ``ValueError`` names a layer kind the engine
        cannot mask."""
        cfg = text_config(model)
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if types is not None:
            unknown = sorted(set(types) - {FULL, SLIDING})
            if unknown:
                raise ValueError(f"model: layer types {unknown} (config.layer_types) are not "
                                 f"supported by safedecode's engine, which runs {FULL!r} and "
                                 f"{SLIDING!r} layers only; decode this model with "
                                 "transformers' own generate")
            sliding = tuple(t == SLIDING for t in types)
            if not any(sliding):
                return cls()
            if not isinstance(window, int) or window < 1:
                raise ValueError(f"model: {sum(sliding)} layers are {SLIDING!r} but "
                                 f"config.sliding_window is {window!r}")
            return cls(window=window, keyed=True, sliding=sliding)
        if window is None:
            return cls()
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"model: config.sliding_window must be a positive int or None, got "
                             f"{window!r}")
        return cls(window=window, sliding=(True,) * cfg.num_hidden_layers)

    def slide(self, mask: torch.Tensor, q_cols: torch.Tensor) -> torch.Tensor:
        """``mask`` (additive, ``[rows, 1, q, keys]``, key j = column j) with the keys outside
        each query's window masked; ``q_cols``: ``[rows, q]`` the queries' columns (a padding
        query: 0, so that it keeps a finite row)."""
        if self.window is None or mask.shape[-1] <= self.window:
            return mask  # no query can be further than the window from any key
        old = _columns(mask.shape[-1], mask.device) <= \
            (q_cols.to(mask.device)[..., None] - self.window)
        return mask.masked_fill(old[:, None], torch.finfo(mask.dtype).min)

    def start(self, shortest: int) -> int:
        """The first column a decode step's windowed layers need to read when its shortest
        row's query sits at column ``shortest``: the oldest key any query can see, rounded
        down to a multiple of 32 (so that the widths repeat); 0 without a window."""
        if self.window is None:
            return 0
        return max(0, (shortest - self.window + 1) // 32 * 32)

    def __call__(self, mask: torch.Tensor, q_cols: torch.Tensor, start: int = 0
                 ) -> torch.Tensor | dict:
        """What the model's ``attention_mask`` takes for the full-attention ``mask``; the
        windowed layers' mask from column ``start`` on (their keys are read from there: the
        cache's binding says the same)."""
        if self.window is None:
            return mask
        slid = self.slide(mask, q_cols)[..., start:]
        return {FULL: mask, SLIDING: slid} if self.keyed else slid
