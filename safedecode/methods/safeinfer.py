"""SafeInfer (arXiv 2406.12274): safety amplification (SA) by a function vector, and
safety-guided decoding (sGDS) against an unsafe branch.

**SA.** Safe in-context demonstrations (harmful request → refusal, ``shots`` turns of a chat) are
run through the model; at the last prompt token the input of every attention head's slot of
``o_proj`` is averaged over the prompts. The *function vector* is the sum over selected heads of
``o_proj`` applied to that mean in its slot. Heads are chosen by their causal effect: the head's
mean activation is patched into zero-shot runs of harmful requests from the anchor **train**
part, and the gain in the log-probability of the refusal is measured (all in
:mod:`safedecode.training.safeinfer`, ``safedecode safeinfer-vector``). During decoding
``γ · vector`` is added to the hidden state after decoder layer ``l`` at the positions being
decoded, on the safe branch's rows only (a ``positions="last"``
:class:`~safedecode.engine.branches.BranchHook`).

**sGDS.** With the amplified branch's log-probs ``lp'`` and an unsafe branch's ``lp_u``:
``s = lp' − β · relu(lp_u − lp')``, ``β = λ / (1 − λ)`` — the fused op's ``union`` rule. The
unsafe branch is a LoRA adapter on its rows (the paper fine-tunes the model on harmful answers;
``safedecode train-unsafe``), OPO's adversarial soft prompt, or a text prompt.

**The gate** (a safedecode addition, conditional activation steering): with ``gate=T`` the
vector is added only to the rows whose request a harmful-request probe on the same layer's
hidden state at the last prompt token scores above ``T`` (:mod:`.harm_probe`; fitted on the
anchor train part by ``safedecode safeinfer-gate`` and stored in the vector file), at the
positions ``steer`` names (with ``"every"`` the engine keeps the decision for every step). On
a small model the function vector is an unconditional "refuse" direction; the gate makes it
conditional.

**Window and stop** (safedecode additions, for gated ``steer="every"``): ``window=W`` steers
only the positions of the first ``W`` new tokens; ``stop="sentence"`` ends a flagged request's
answer at its first sentence end after them. Steered at every token, this model's refusal
never ends (it rambles on, and often back into the harmful content); steered for its opening
and stopped, it is one sentence.

The reference code adds the vector to batch element 0 only, runs the two models one after the
other with two KV caches and ignores its length cap; here every row of the branch is steered at
every step, both branches run in one batched forward over one KV cache.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safedecode.engine.branches import Branch, BranchHook, Method, contrastive

from . import prompts as text_prompts
from .harm_probe import HarmProbe, gated_add, gated_add_rows, probe_above

FORMAT = "safedecode-safeinfer-vector/1"
ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_VECTOR = ASSETS / "safeinfer_smollm2-135m-instruct.safetensors"
DEFAULT_UNSAFE = ASSETS / "unsafe_lora"
OPPOSITE_UNSAFE = ASSETS / "unsafe_opposite_lora"
UNSAFE_FORMS = ("adapter", "opposite", "soft", "text")


# -- the model's attention layout ---------------------------------------------------------------
def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """(dotted name, module list) of the decoder layers of a Llama-style causal LM."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.endswith("layers") and len(mod) and \
                hasattr(mod[0], "self_attn") and hasattr(mod[0].self_attn, "o_proj"):
            return name, mod
    raise ValueError(f"SafeInfer: {type(model).__name__} has no Llama-style decoder layers "
                     "(layers[i].self_attn.o_proj); the function vector needs per-head outputs")


def head_shape(model) -> tuple[int, int, int]:
    """(layers, heads, head dim)."""
    from safedecode.models import text_config

    _, layers = decoder_layers(model)
    cfg = text_config(model)
    heads = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return len(layers), heads, hd


@dataclass
class SafetyVector:
    """A function vector and where it came from (computed by
    :func:`safedecode.training.safeinfer.compute_vector`)."""

    vector: torch.Tensor  # [d]
    heads: list[tuple[int, int]]  # (layer, head), by decreasing effect
    layers_path: str  # dotted name of the decoder layers ("model.layers")
    num_layers: int
    fingerprint: str
    base_model: str
    config: dict = field(default_factory=dict)
    effects: list[list[float]] = field(default_factory=list)  # [L][H] mean gain (nats)
    decoding: dict = field(default_factory=dict)  # knobs chosen on validation, by method
    selection: dict = field(default_factory=dict)  # the sweep that chose them
    gate: HarmProbe | None = None  # the harmful-request probe of conditional steering

    def knob(self, method: str, name: str, default: float) -> float:
        return float(self.decoding.get(method, {}).get(name, default))

    def check_model(self, model) -> None:
        from safedecode.models import embedding_fingerprint, model_name

        here = embedding_fingerprint(model)
        if here != self.fingerprint:
            raise ValueError(f"SafeInfer vector: computed for {self.base_model} (embedding "
                             f"fingerprint {self.fingerprint}), but the model is "
                             f"{model_name(model)} (fingerprint {here}); compute one for it "
                             "with `safedecode safeinfer-vector --model ...`")


def _prompt_ids(tok, conversation: list[dict]) -> list[int]:
    from safedecode.engine.prompts import PromptBuilder

    b = PromptBuilder(tok)
    return b.encode(b.render(None, conversation), first=True)


def _pad_left(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(map(len, seqs))
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, t - len(s):] = torch.tensor(list(s))
        mask[j, t - len(s):] = 1
    return ids, mask


def save_vector(path: str | Path, sv: SafetyVector) -> Path:
    """Write the vector (safetensors) with its heads, model identity, config and knobs."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "base_model": sv.base_model, "embedding_fingerprint":
            sv.fingerprint, "heads": json.dumps(sv.heads), "layers_path": sv.layers_path,
            "num_layers": str(sv.num_layers), "config": json.dumps(sv.config, sort_keys=True),
            "effects": json.dumps([[round(x, 5) for x in row] for row in sv.effects]),
            "decoding": json.dumps(sv.decoding, sort_keys=True),
            "selection": json.dumps(sv.selection, sort_keys=True),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tensors = {"vector": sv.vector.detach().to("cpu", torch.float32).contiguous()}
    if sv.gate is not None:
        if sv.gate.num_layers != sv.num_layers:
            raise ValueError(f"SafeInfer vector: the gate has {sv.gate.num_layers} layers, the "
                             f"model {sv.num_layers}")
        tensors |= {"gate_weight": sv.gate.weight.detach().cpu().float().contiguous(),
                    "gate_bias": sv.gate.bias.detach().cpu().float().contiguous()}
        meta["gate"] = json.dumps(sv.gate.info, sort_keys=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_vector(path: str | Path | None = None, model=None) -> SafetyVector:
    """Read a vector saved by :func:`save_vector` (default: the one shipped for the embedded
    model); with ``model``, fail clearly if it was computed for another model."""
    from safetensors import SafetensorError, safe_open

    path = Path(path) if path is not None else DEFAULT_VECTOR
    if not path.is_file():
        raise FileNotFoundError(f"SafeInfer vector: {path} not found (compute one with "
                                "`safedecode safeinfer-vector --out FILE`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"SafeInfer vector: {path} is not a safedecode SafeInfer vector "
                                 f"(format {meta.get('format')!r}, expected {FORMAT!r})")
            vec = f.get_tensor("vector")
            gate = None
            if "gate_weight" in f.keys():
                gate = HarmProbe(f.get_tensor("gate_weight"), f.get_tensor("gate_bias"),
                                 json.loads(meta.get("gate", "{}")))
    except SafetensorError as exc:
        raise ValueError(f"SafeInfer vector: cannot read {path}: {exc}") from exc
    sv = SafetyVector(vec, [tuple(x) for x in json.loads(meta["heads"])], meta["layers_path"],
                      int(meta["num_layers"]), meta["embedding_fingerprint"],
                      meta.get("base_model", "?"), json.loads(meta.get("config", "{}")),
                      json.loads(meta.get("effects", "[]")),
                      json.loads(meta.get("decoding", "{}")),
                      json.loads(meta.get("selection", "{}")), gate)
    if model is not None:
        sv.check_model(model)
    return sv


# -- branches and methods ----------------------------------------------------------------------
def add_vector(h: torch.Tensor, vector: torch.Tensor, scale: float) -> torch.Tensor:
    """``h + scale · vector`` (the steering hook's function)."""
    return h + scale * vector.to(h.dtype).to(h.device)


STEER = {"every": "last", "first": "first", "prompt": "prompt"}  # steer= -> hook positions


def gate_threshold(gate) -> float | None:
    """``gate`` knob -> the probe-logit threshold, or None (no gate): ``"off"``/None or a
    finite number."""
    if gate is None or gate == "off":
        return None
    if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not math.isfinite(gate):
        raise ValueError(f"gate: expected 'off' or a finite threshold on the probe's logit, "
                         f"got {gate!r}")
    return float(gate)


def window_knob(window) -> int | None:
    """``window`` knob -> the number of new tokens steered, or None (every one): ``"off"``/None
    or an integer >= 1."""
    if window is None or window == "off":
        return None
    if isinstance(window, float) and window.is_integer():
        window = int(window)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected 'off' or a number of new tokens >= 1, got {window!r}")
    return window


def amplified_branch(sv: SafetyVector, gamma: float, layer: int, name: str = "safe",
                     steer: str = "every", gate: float | str | None = None,
                     window: int | str | None = None, stop: str | None = None) -> Branch:
    """A branch (no system prompt) whose decoded positions get ``gamma · vector`` after decoder
    layer ``layer``: every decoded position (``steer="every"``, the paper) or only the one that
    decodes the first new token (``"first"``: it sets the answer's course, later tokens follow
    their own context) or every position of the request's own prompt at prefill (``"prompt"``:
    the user turn from its first token to the last, whose steered states stay in the KV cache
    for every later token; nothing is added while decoding). ``gate`` (a threshold): steer
    only the rows whose request the vector file's harmful-request probe at ``layer`` scores
    above it at the last prompt token (:mod:`.harm_probe`, conditional steering). With
    ``"first"`` and ``"prompt"`` the decision is made and used in the prefill forward (inside
    the hook's function); with ``"every"`` the engine keeps it for every decode step
    (``BranchHook.gate``). ``window`` (``"every"`` only): steer the positions of the first
    ``window`` new tokens only. ``stop="sentence"`` (``"every"`` with a gate): a flagged
    request's answer ends at the first sentence end after its ``window`` tokens
    (``BranchHook.stop``)."""
    if steer not in STEER:
        raise ValueError(f"steer: expected one of {sorted(STEER)}, got {steer!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise ValueError(f"gamma: must be a finite number, got {gamma!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < sv.num_layers:
        raise ValueError(f"layer: must be an integer in [0, {sv.num_layers}), got {layer!r}")
    threshold, steps = gate_threshold(gate), window_knob(window)
    stop = None if stop in (None, "off") else stop
    if (steps is not None or stop is not None) and steer != "every":
        raise ValueError(f"window/stop: they act on decoded positions, so steer must be "
                         f"'every'; got steer={steer!r}")
    if stop is not None and threshold is None:
        raise ValueError(f"stop={stop!r}: ends the answers of the requests the gate flags, so "
                         "it needs a gate (a threshold)")
    fn = functools.partial(add_vector, vector=sv.vector, scale=float(gamma))
    row_gate = None
    if threshold is not None:
        if sv.gate is None:
            raise ValueError("gate: this vector file has no harmful-request probe; add one with "
                             "`safedecode safeinfer-gate --vector FILE --out FILE`")
        probe = {"weight": sv.gate.weight[layer], "bias": float(sv.gate.bias[layer]),
                 "threshold": threshold}
        if steer == "every":
            row_gate = functools.partial(probe_above, **probe)
        else:
            fn = functools.partial(gated_add if steer == "first" else gated_add_rows,
                                   vector=sv.vector, scale=float(gamma), **probe)
    hook = BranchHook(f"{sv.layers_path}.{layer}", fn, positions=STEER[steer], gate=row_gate,
                      window=steps, stop=stop)
    return Branch(name=name, hooks=(hook,), fingerprint=sv.fingerprint,
                  trained_for=sv.base_model)


def unsafe_branch(unsafe: str | Path = "adapter") -> Branch:
    """The unsafe branch: ``"adapter"`` (the shipped LoRA adapter trained on harmful answers),
    ``"opposite"`` (the shipped one trained on harmful answers and on refusals of safe
    requests), ``"soft"`` (OPO's adversarial soft prompt, shipped with ``acd``), ``"text"`` (the
    adversarial system prompt), or a path: a peft adapter folder, or an ACD prompts file (its
    adversarial prompt)."""
    from safedecode.engine.adapters import load_lora

    from .acd import load_prompts

    if unsafe == "text":
        return Branch(system=text_prompts.ADVERSARIAL, name="unsafe")
    if unsafe == "soft":
        p = load_prompts()
        return Branch(soft_prompt=p.adversarial, name="unsafe", fingerprint=p.fingerprint,
                      trained_for=p.base_model)
    shipped = {"adapter": DEFAULT_UNSAFE, "opposite": OPPOSITE_UNSAFE}
    path = shipped.get(str(unsafe), Path(unsafe))
    if unsafe in shipped and not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"SafeInfer: the shipped unsafe adapter is missing from {path}; "
                                "train one with `safedecode train-unsafe --out DIR` and pass "
                                "unsafe=DIR")
    if path.is_dir():
        return Branch(name="unsafe", adapter=load_lora(path, name="unsafe"))
    if path.suffix == ".safetensors" and path.is_file():
        p = load_prompts(path)
        return Branch(soft_prompt=p.adversarial, name="unsafe", fingerprint=p.fingerprint,
                      trained_for=p.base_model)
    raise ValueError(f"unsafe: expected one of {UNSAFE_FORMS}, a peft adapter folder or an ACD "
                     f"prompts file, got {str(unsafe)!r}")


def _lam_beta(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam < 1.0:
        raise ValueError(f"lam: must be in [0, 1) (β = λ / (1 − λ)), got {lam!r}")
    return lam / (1.0 - lam)


DEFAULTS = {"gamma": 0.5, "layer": None, "lam": 0.99, "steer": "every", "gate": "off",
            "window": "off", "stop": "off"}  # layer: L / 3
STEERING = ("gamma", "layer", "steer", "gate", "window", "stop")  # amplified_branch's knobs


def _knobs(sv: SafetyVector, method: str, **given) -> dict:
    """Every knob: the one given, else the one recorded for ``method``, else the default."""
    chosen = sv.decoding.get(method, {})
    out = {k: chosen.get(k, d) if given.get(k) is None else given[k]
           for k, d in DEFAULTS.items()}
    for k in ("gamma", "lam"):
        if given.get(k) is None:
            out[k] = float(out[k])
    if given.get("layer") is None:
        out["layer"] = int(sv.num_layers // 3 if out["layer"] is None else out["layer"])
    out["steer"] = str(out["steer"])
    # a recorded window / stop belongs to its recorded setting (steer "every", gated): dropped,
    # not an error, when the knobs given leave that setting
    if given.get("window") is None and out["steer"] != "every":
        out["window"] = DEFAULTS["window"]
    if given.get("stop") is None and (out["steer"] != "every"
                                      or gate_threshold(out["gate"]) is None):
        out["stop"] = DEFAULTS["stop"]
    return out


def safeinfer(gamma: float | None = None, layer: int | None = None, lam: float | None = None,
              beta: float = 0.0, vector: str | Path | None = None,
              unsafe: str | Path | None = None, steer: str | None = None,
              gate: float | str | None = None, window: int | str | None = None,
              stop: str | None = None) -> Method:
    """SafeInfer: SA (the amplified branch) + sGDS against the unsafe branch, union rule.
    Knobs default to those chosen on the anchor validation split, recorded in the vector file
    (else γ = 0.5, layer = L/3, λ = 0.99, no gate); ``beta`` is the plausibility threshold;
    ``gate``: ``"off"`` or the probe threshold of conditional steering; ``window`` /
    ``stop``: how a flagged answer is steered and ended (see :func:`amplified_branch`)."""
    sv = load_vector(vector)
    kn = _knobs(sv, "safeinfer", gamma=gamma, layer=layer, lam=lam, steer=steer, gate=gate,
                window=window, stop=stop)
    if unsafe is None:
        unsafe = sv.decoding.get("safeinfer", {}).get("unsafe", "adapter")
    safe = amplified_branch(sv, **{k: kn[k] for k in STEERING})
    return contrastive((safe, unsafe_branch(unsafe)), (1.0, _lam_beta(kn["lam"])),
                       rule="union", beta=beta, name="safeinfer")


def safeinfer_sa(gamma: float | None = None, layer: int | None = None,
                 vector: str | Path | None = None, steer: str | None = None,
                 gate: float | str | None = None, window: int | str | None = None,
                 stop: str | None = None) -> Method:
    """SafeInfer's safety amplification alone (one steered branch): an ablation."""
    sv = load_vector(vector)
    kn = _knobs(sv, "safeinfer-sa", gamma=gamma, layer=layer, steer=steer, gate=gate,
                window=window, stop=stop)
    return Method("safeinfer-sa", (amplified_branch(sv, **{k: kn[k] for k in STEERING}),),
                  (1.0,))


def safeinfer_sgds(lam: float | None = None, beta: float = 0.0,
                   unsafe: str | Path | None = None, vector: str | Path | None = None
                   ) -> Method:
    """SafeInfer's safety-guided decoding alone (the plain model against the unsafe branch):
    an ablation. Knobs not given come from the vector file's validated choice."""
    chosen = {}
    if vector is not None or DEFAULT_VECTOR.is_file():
        chosen = load_vector(vector).decoding.get("safeinfer-sgds", {})
    lm = float(chosen.get("lam", DEFAULTS["lam"])) if lam is None else lam
    if unsafe is None:
        unsafe = chosen.get("unsafe", "adapter")
    return contrastive((Branch(name="plain"), unsafe_branch(unsafe)), (1.0, _lam_beta(lm)),
                       rule="union", beta=beta, name="safeinfer-sgds")


