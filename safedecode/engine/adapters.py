"""LoRA adapters applied to one branch's rows inside the shared forward.

A :class:`LoraAdapter` holds, per target ``nn.Linear`` (a dotted module name in the model), the
low-rank pair ``A [r, in]``, ``B [out, r]`` and the scale ``alpha / r``. The engine adds
``scale · (x[rows] A^T) B^T`` to that module's output for the branch's rows only, in every
forward (prefix, prefill, decode): the branch runs the adapted model while the other branches of
the same batch run the base model, with one forward and one KV cache. It equals the model with the
adapter merged, row for row (to float rounding).

:func:`load_lora` reads a peft adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, as ``save_pretrained`` writes it): plain LoRA only (no DoRA, no
bias, no ``modules_to_save``: those change more than a low-rank delta and are refused by name).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """Low-rank deltas by module name: ``{name: (A [r, in], B [out, r])}`` times ``scale``."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float
    name: str = "adapter"
    fingerprint: str | None = None  # embedding fingerprint of the model it was trained on
    base_model: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError(f"adapter {self.name!r}: no LoRA layers")
        for mod, (a, b) in self.layers.items():
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"adapter {self.name!r}: {mod}: expected A [r, in] and "
                                 f"B [out, r], got {tuple(a.shape)} and {tuple(b.shape)}")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"adapter {self.name!r}: {mod} contains NaN or inf")

    @functools.cached_property
    def _key(self) -> str:
        h = hashlib.sha256(repr(self.scale).encode())
        for mod in sorted(self.layers):
            h.update(mod.encode())
            for t in self.layers[mod]:
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def key(self) -> str:
        """Content hash (module names, weights, scale): part of a branch's identity."""
        return self._key

    def check_model(self, model) -> None:
        """Raise ValueError unless every target module is an ``nn.Linear`` of ``model`` with the
        adapter's shapes (and, when recorded, the model is the one it was trained on)."""
        from safedecode.models import embedding_fingerprint, model_name

        if self.fingerprint is not None and embedding_fingerprint(model) != self.fingerprint:
            raise ValueError(
                f"adapter {self.name!r}: trained on {self.base_model or 'another model'} "
                f"(embedding fingerprint {self.fingerprint}), but the model is "
                f"{model_name(model)} (fingerprint {embedding_fingerprint(model)})")
        for mod, (a, b) in self.layers.items():
            try:
                lin = model.get_submodule(mod)
            except AttributeError:
                raise ValueError(f"adapter {self.name!r}: the model has no module {mod!r}") \
                    from None
            if not isinstance(lin, torch.nn.Linear) or \
                    (lin.in_features, lin.out_features) != (a.shape[1], b.shape[0]):
                raise ValueError(f"adapter {self.name!r}: {mod} is not a Linear "
                                 f"{a.shape[1]} -> {b.shape[0]}")

    def to(self, device: torch.device, dtype: torch.dtype) -> LoraAdapter:
        """The same adapter with its weights on ``device`` in ``dtype`` (self if already)."""
        a0 = next(iter(self.layers.values()))[0]
        if a0.device == device and a0.dtype == dtype:
            return self
        layers = {m: (a.to(device, dtype), b.to(device, dtype))
                  for m, (a, b) in self.layers.items()}
        out = LoraAdapter(layers, self.scale, self.name, self.fingerprint, self.base_model,
                          self.meta)
        out.__dict__["_key"] = self.key()
        return out

    def merged(self, model):
        """A copy of ``model`` with the adapter merged into its weights (the unsafe model of
        SafeInfer's reference code: a second model)."""
        import copy

        self.check_model(model)
        return self.merge_into(copy.deepcopy(model))

    def merge_into(self, model):
        """Merge the adapter into ``model``'s weights in place (and return it); the model's
        :func:`safedecode.eval.runner.model_fingerprint` then includes the adapter."""
        self.check_model(model)
        with torch.no_grad():
            for mod, (a, b) in self.layers.items():
                w = model.get_submodule(mod).weight
                w += (self.scale * (b.to(w.device).float() @ a.to(w.device).float())).to(w.dtype)
        model.safedecode_adapters = [*getattr(model, "safedecode_adapters", []), self.key()]
        return model

    def delta(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """``scale · x A^T B^T`` for module ``module``."""
        a, b = self.layers[module]
        return (x @ a.t()) @ b.t() * self.scale


def load_lora(path: str | Path, *, name: str | None = None) -> LoraAdapter:
    """Read a peft LoRA adapter folder (see the module docstring for what is supported)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    cfg_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise ValueError(f"adapter: {folder} is not a peft adapter folder (needs "
                         "adapter_config.json and adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        tensors = load_file(str(weights))
    except (json.JSONDecodeError, SafetensorError, UnicodeDecodeError) as exc:
        raise ValueError(f"adapter: cannot read {folder}: {exc}") from exc
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter: {folder} is a {cfg.get('peft_type')} adapter; only LoRA is "
                         "supported")
    for key, what in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save")):
        if cfg.get(key):
            raise ValueError(f"adapter: {folder} uses {what}, which is more than a low-rank "
                             "delta; only plain LoRA adapters can run on a branch's rows")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"adapter: {folder} trains biases (bias={cfg['bias']!r}); only plain "
                         "LoRA adapters can run on a branch's rows")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"adapter: {folder} has per-module ranks (rank_pattern/alpha_pattern), "
                         "which are not supported")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}.weight"
            if key.endswith(tag):
                mod = key[:-len(tag)].removeprefix(_PEFT_PREFIX)
                pairs.setdefault(mod, {})[part] = t.float()
    layers = {}
    for mod, p in pairs.items():
        if set(p) != {"lora_A", "lora_B"}:
            raise ValueError(f"adapter: {folder}: {mod} has only {sorted(p)}")
        layers[mod] = (p["lora_A"], p["lora_B"])
    meta_file = folder / "safedecode.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    return LoraAdapter(layers, scale, name or folder.name, meta.get("embedding_fingerprint"),
                       meta.get("base_model", ""), meta)
