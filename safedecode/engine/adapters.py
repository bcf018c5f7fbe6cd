"""LoRA adapters applied to one branch's rows inside the shared forward.

A :class:`LoraAdapter` holds, per target ``nn.Linear`` (a dotted module name in the model), the
low-rank pair ``A [r, in]``, ``B [out, r]`` and the scale ``alpha / r``. The engine adds
``scale · (x[rows] A^T) B^T`` to that module's output for the branch's rows only, in every
forward (prefix, prefill, decode): the branch runs the adapted model while the other branches of
the same batch run the base model, with one forward and one KV cache. It equals the model with the
adapter merged, row for row (to float rounding).

:func:`load_lora` reads a peft adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, as ``save_pretrained`` writes it): plain LoRA only (no DoRA, no
bias, no ``modules_to_save``: those change more than a low-rank delta and are refused by name);
:func:`save_lora` writes one back. :func:`average_loras` is checkpoint averaging (a "soup",
Wortsman et al., arXiv 2203.05482) done exactly: the ranks are concatenated, so the result's delta
is the weighted mean of the inputs' deltas, not of their A and B factors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
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
    meta = {**meta, "source": str(folder)}
    return LoraAdapter(layers, scale, name or folder.name, meta.get("embedding_fingerprint"),
                       meta.get("base_model", ""), meta)


def average_loras(adapters: list[LoraAdapter], weights: list[float] | None = None, *,
                  name: str = "average") -> LoraAdapter:
    """The adapter whose delta is ``Σ_i w_i · s_i B_i A_i`` (weights normalised to sum 1; equal by
    default), exact: ``A = cat_i(w_i s_i A_i)``, ``B = cat_i(B_i)``, scale 1, rank ``Σ r_i``.
    The adapters must target the same modules with the same shapes, and were trained on one model
    (the same embedding fingerprint, where recorded). Its metadata keeps what all of them agree on
    (e.g. a run's config, not its step count) and names its sources."""
    if not adapters:
        raise ValueError("average: no adapters given")
    w = [1.0] * len(adapters) if weights is None else [float(x) for x in weights]
    if len(w) != len(adapters):
        raise ValueError(f"average: {len(w)} weights for {len(adapters)} adapters")
    if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"average: weights must be finite, >= 0 and not all 0, got {w}")
    first = adapters[0]
    prints = {a.fingerprint for a in adapters} - {None}
    if len(prints) > 1:
        raise ValueError("average: the adapters were trained on different models (embedding "
                         f"fingerprints {sorted(prints)})")
    for a in adapters[1:]:
        if set(a.layers) != set(first.layers):
            diff = sorted(set(a.layers) ^ set(first.layers))
            raise ValueError(f"average: {a.name!r} and {first.name!r} target different modules "
                             f"(e.g. {diff[0]!r})")
        for mod, (a_, b_) in a.layers.items():
            if (a_.shape[1], b_.shape[0]) != (first.layers[mod][0].shape[1],
                                              first.layers[mod][1].shape[0]):
                raise ValueError(f"average: {mod} has other shapes in {a.name!r} than in "
                                 f"{first.name!r}")
    total = sum(w)
    layers = {
        mod: (torch.cat([a.layers[mod][0].float() * (wi / total * a.scale)
                         for a, wi in zip(adapters, w, strict=True)]),
              torch.cat([a.layers[mod][1].float() for a in adapters], dim=1))
        for mod in first.layers}
    metas = [{k: v for k, v in a.meta.items() if k != "source"} for a in adapters]
    varies: dict[str, list] = {}
    meta = {**_agreed(metas, varies),
            "averaged_from": [a.meta.get("source", a.name) for a in adapters],
            "average_weights": [wi / total for wi in w]}
    if varies:
        meta["averaged_varies"] = varies
    return LoraAdapter(layers, 1.0, name, first.fingerprint, first.base_model, meta)


def _agreed(metas: list[dict], varies: dict[str, list], prefix: str = "") -> dict:
    """What every metadata dict agrees on, recursing into nested dicts (a run's ``config`` keeps
    its shared knobs); scalars that differ (e.g. ``config.seed``) go to ``varies`` by dotted key."""
    out = {}
    for k, v in metas[0].items():
        vals = [m.get(k, _MISSING) for m in metas]
        if all(x == v for x in vals):
            out[k] = v
        elif all(isinstance(x, dict) for x in vals):
            out[k] = _agreed(vals, varies, f"{prefix}{k}.")
        elif all(x is None or isinstance(x, (str, int, float, bool)) for x in vals):
            varies[f"{prefix}{k}"] = vals
    return out


_MISSING = object()


def save_lora(adapter: LoraAdapter, path: str | Path) -> Path:
    """Write ``adapter`` as a peft LoRA folder (fp16 weights, ``safedecode.json`` with its
    metadata) that :func:`load_lora` and peft's ``PeftModel.from_pretrained`` both read."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    ranks = {a.shape[0] for a, _ in adapter.layers.values()}
    if len(ranks) != 1:
        raise ValueError(f"save: adapter {adapter.name!r} has per-module ranks {sorted(ranks)}")
    r = ranks.pop()
    tensors = {}
    for mod, (a, b) in adapter.layers.items():
        tensors[f"{_PEFT_PREFIX}{mod}.lora_A.weight"] = a.detach().cpu().half().contiguous()
        tensors[f"{_PEFT_PREFIX}{mod}.lora_B.weight"] = b.detach().cpu().half().contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r,
              "lora_alpha": adapter.scale * r, "lora_dropout": 0.0, "bias": "none",
              "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
              "inference_mode": True, "modules_to_save": None,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in adapter.layers})}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                                encoding="utf-8")
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    meta = {**{k: v for k, v in adapter.meta.items() if k != "source"},
            "embedding_fingerprint": adapter.fingerprint, "base_model": adapter.base_model}
    (folder / "safedecode.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return folder
