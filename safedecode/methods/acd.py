"""ACD — Adversarial Contrastive Decoding: ``s = lp_SP - alpha * lp_AP``, anchored on SP.

SP is a safeguarding prompt and AP its adversarial opposite, either as text (the untrained variant,
``acd-text``) or as soft prompts trained by *Opposite Prompt Optimization*
(:func:`safedecode.training.opo.optimize_prompts`, ``safedecode optimize``; the model stays
frozen). Optimised prompts are saved to safetensors with the identity of the model they were
trained for (:func:`save_prompts` / :func:`load_prompts`); the package ships a pair for the
embedded default model, which ``acd`` (and ``safedecode generate --method acd``) uses unless
given another file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safedecode.engine.branches import Branch, BranchHook, Method, contrastive

from . import prompts as text_prompts

FORMAT = "safedecode-acd-prompts/1"
ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_PROMPTS = ASSETS / "acd_smollm2-135m-instruct.safetensors"
# Self-CD over an optimised SP: its own validated pair (see scripts/acd_sweep.sh).
SELF_CD_SP_PROMPTS = ASSETS / "self-cd-sp_smollm2-135m-instruct.safetensors"

PromptLike = str | torch.Tensor


@dataclass
class ACDPrompts:
    """An optimised SP/AP pair and where it came from."""

    safeguard: torch.Tensor  # [n_sp, d]
    adversarial: torch.Tensor  # [n_ap, d]
    fingerprint: str  # safedecode.models.embedding_fingerprint of the base model
    base_model: str
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    # Knobs chosen on the anchor validation split, by method name ({"acd": {"alpha": .., "beta":
    # ..}}), and the sweep that chose them (command, table, criterion): see `safedecode tune`.
    decoding: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    # The harmful-request probe of a gated ACD (`safedecode acd-gate`): ``h · weight + bias`` on
    # the output of ``gate_info["module"]`` at the SP branch's last prompt token.
    gate_weight: torch.Tensor | None = None  # [d]
    gate_bias: float = 0.0
    gate_info: dict = field(default_factory=dict)

    def knob(self, method: str, name: str, default: float) -> float:
        """The validated value of ``name`` for ``method``, else ``default``."""
        return float(self.decoding.get(method, {}).get(name, default))

    def check_model(self, model) -> None:
        """Raise ValueError unless ``model`` is the one these prompts were optimised for."""
        from safedecode.models import embedding_fingerprint, model_name

        width = model.get_input_embeddings().weight.shape[1]
        here = embedding_fingerprint(model)
        if here != self.fingerprint or width != self.safeguard.shape[1]:
            raise ValueError(
                f"ACD prompts: optimised for {self.base_model} (embedding fingerprint "
                f"{self.fingerprint}, width {self.safeguard.shape[1]}), but the model is "
                f"{model_name(model)} (fingerprint {here}, width {width}); run "
                "`safedecode optimize --model ...` to optimise prompts for it")


def save_prompts(path: str | Path, acd_prompts: ACDPrompts) -> Path:
    """Write the pair to a safetensors file with its metadata (base model, fingerprint, config)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "base_model": acd_prompts.base_model,
            "embedding_fingerprint": acd_prompts.fingerprint,
            "training_config": json.dumps(acd_prompts.config, sort_keys=True),
            "history": json.dumps(acd_prompts.history),
            "decoding": json.dumps(acd_prompts.decoding, sort_keys=True),
            "selection": json.dumps(acd_prompts.selection, sort_keys=True),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tensors = {"safeguard": acd_prompts.safeguard.detach().to("cpu", torch.float32).contiguous(),
               "adversarial": acd_prompts.adversarial.detach().to("cpu", torch.float32)
               .contiguous()}
    if acd_prompts.gate_weight is not None:
        tensors["gate_weight"] = acd_prompts.gate_weight.detach().to("cpu", torch.float32) \
            .contiguous()
        tensors["gate_bias"] = torch.tensor([float(acd_prompts.gate_bias)])
        meta["gate"] = json.dumps(acd_prompts.gate_info, sort_keys=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_prompts(path: str | Path | None = None, model=None) -> ACDPrompts:
    """Read a pair saved by :func:`save_prompts` (default: the shipped pair for the embedded
    model); with ``model``, fail clearly if it is not the model they were optimised for."""
    from safetensors import SafetensorError, safe_open

    path = Path(path) if path is not None else DEFAULT_PROMPTS
    if not path.is_file():
        raise FileNotFoundError(f"ACD prompts: {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"ACD prompts: {path} is not a safedecode ACD prompt file "
                                 f"(format {meta.get('format')!r}, expected {FORMAT!r})")
            sp, ap = f.get_tensor("safeguard"), f.get_tensor("adversarial")
            gw = f.get_tensor("gate_weight") if "gate_weight" in f.keys() else None
            gb = float(f.get_tensor("gate_bias")[0]) if gw is not None else 0.0
    except SafetensorError as exc:
        raise ValueError(f"ACD prompts: cannot read {path}: {exc}") from exc
    out = ACDPrompts(sp, ap, meta["embedding_fingerprint"], meta.get("base_model", "?"),
                     json.loads(meta.get("training_config", "{}")),
                     json.loads(meta.get("history", "[]")),
                     json.loads(meta.get("decoding", "{}")),
                     json.loads(meta.get("selection", "{}")),
                     gw, gb, json.loads(meta.get("gate", "{}")))
    if model is not None:
        out.check_model(model)
    return out


def _branch(p: PromptLike, name: str, acd_prompts: ACDPrompts | None) -> Branch:
    if isinstance(p, str):
        return Branch(system=p, name=name)
    if isinstance(p, torch.Tensor):
        fp = acd_prompts.fingerprint if acd_prompts is not None else None
        who = acd_prompts.base_model if acd_prompts is not None else ""
        return Branch(soft_prompt=p, name=name, fingerprint=fp, trained_for=who)
    raise ValueError(f"ACD {name}: expected text or a [n, d] soft-prompt tensor, got "
                     f"{type(p).__name__}")


def ACD(safeguard: PromptLike | ACDPrompts = text_prompts.SAFEGUARD,  # noqa: N802
        adversarial: PromptLike | None = text_prompts.ADVERSARIAL, alpha: float = 0.5,
        beta: float = 0.0, *, name: str = "acd") -> Method:
    """ACD over two branches SP and AP: ``s = lp_SP - alpha lp_AP``, anchor SP.

    SP/AP are text or ``[n, d]`` soft prompts; or pass an :class:`ACDPrompts` as ``safeguard``
    (its pair is used, and the engine checks it runs on the model it was optimised for).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"alpha: must be a number >= 0, got {alpha!r}")
    src = safeguard if isinstance(safeguard, ACDPrompts) else None
    sp, ap = (src.safeguard, src.adversarial) if src is not None else (safeguard, adversarial)
    return contrastive((_branch(sp, "SP", src), _branch(ap, "AP", src)),
                       (1.0, -float(alpha)), beta=beta, name=name)


def acd(alpha: float | None = None, beta: float | None = None,
        prompts: str | Path | None = None, gate: float | str | None = None) -> Method:
    """ACD with optimised soft prompts (``prompts``: a file from ``safedecode optimize``; default:
    the pair shipped for the embedded SmolLM2-135M-Instruct). ``alpha`` / ``beta`` default to the
    values chosen on the anchor validation split and recorded in the file (else 0.5 / 0).
    ``gate``: ``"off"`` or a threshold: the contrast only for requests the file's harmful-request
    probe (``safedecode acd-gate``) scores above it at the SP branch's last prompt token; the
    others decode from the plain model alone (a third, weight-0 branch: SP alone over-refuses
    as much as ACD; ``Method.contrast_gate``)."""
    from .harm_probe import probe_above
    from .safeinfer import gate_threshold

    p = load_prompts(prompts)
    a = p.knob("acd", "alpha", 0.5) if alpha is None else alpha
    b = p.knob("acd", "beta", 0.0) if beta is None else beta
    method = ACD(p, None, a, b, name="acd")
    t = gate_threshold(p.decoding.get("acd", {}).get("gate", "off") if gate is None else gate)
    if t is None:
        return method
    if p.gate_weight is None:
        raise ValueError("gate: this ACD prompts file has no harmful-request probe; add one "
                         "with `safedecode acd-gate --prompts FILE --out FILE`")
    judge = functools.partial(probe_above, weight=p.gate_weight, bias=p.gate_bias, threshold=t)
    sp, ap = method.branches
    hook = BranchHook(p.gate_info["module"], _unchanged, positions="first", gate=judge)
    return dataclasses.replace(method, branches=(dataclasses.replace(sp, hooks=(hook,)), ap,
                                                 Branch(name="plain")),
                               weights=(*method.weights, 0.0), contrast_gate=0, fallback=2)


def _unchanged(h: torch.Tensor) -> torch.Tensor:
    """The identity: the function of a hook that only gates (the gated ACD's, and
    ``harm_probe.branch_last_states``'s). Its module and name are part of the gated ACD's cache
    key (``eval.runner.method_fingerprint``), so it stays here."""
    return h


def fit_gate(model, tok, prompts: str | Path | None = None, *, layer: int | None = None,
             l2: float = 0.01, forms: str | Sequence[str] | None = None) -> ACDPrompts:
    """The prompts file with a harmful-request probe for a gated ACD: logistic regression on
    the SP branch's hidden state after decoder layer ``layer`` (default L/2) at the last prompt
    token, fitted on the anchor **train** part — plus, with ``forms`` (``"all"`` or names from
    :data:`safedecode.data.forms.TRAIN_FORMS`), every train request again in each of those
    content-neutral forms, label kept; validation rates at threshold 0 recorded."""
    from safedecode.data import load_anchor
    from safedecode.data.forms import in_forms, parse_forms

    from .harm_probe import branch_last_states, fit_logistic
    from .safeinfer import decoder_layers

    forms = parse_forms(forms)
    p = load_prompts(prompts, model=model)
    path, layers = decoder_layers(model)
    layer = len(layers) // 2 if layer is None else layer
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise ValueError(f"--layer: must be an integer in [0, {len(layers)}), got {layer!r}")
    module = f"{path}.{layer}"
    base = ACD(p, None, p.knob("acd", "alpha", 0.5), 0.0, name="acd")
    train, val = load_anchor(part="train"), load_anchor(part="val")
    n_train = len(train)
    train = in_forms(train, forms)

    def xy(items):
        x = branch_last_states(model, tok, base, 0, module, [it["prompt"] for it in items])
        return x, torch.tensor([it["split"] == "harmful" for it in items])

    (xt, yt), (xv, yv) = xy(train), xy(val)
    w, b = fit_logistic(xt, yt.float(), l2=l2)
    on = xv @ w + b > 0
    p.gate_weight, p.gate_bias = w, float(b)
    p.gate_info = {"module": module, "layer": layer, "branch": "SP", "l2": l2,
                   "data": "anchor train part (harmful vs safe)", "train": n_train,
                   "forms": list(forms),
                   "val": len(val), "val_tpr_at_0": round(float(on[yv].float().mean()), 4),
                   "val_fpr_at_0": round(float(on[~yv].float().mean()), 4)}
    return p


def acd_text(alpha: float = 0.5, beta: float = 0.0, safeguard: str = text_prompts.SAFEGUARD,
             adversarial: str = text_prompts.ADVERSARIAL) -> Method:
    """ACD with the text prompts (no optimisation)."""
    return ACD(safeguard, adversarial, alpha, beta, name="acd-text")


def sp_branch(prompts: str | Path | None = None) -> tuple[Branch, ACDPrompts]:
    """The optimised safeguarding prompt as a branch (checked against the model by the engine)."""
    p = load_prompts(prompts)
    return _branch(p.safeguard, "SP", p), p


def acd_sp(prompts: str | Path | None = None) -> Method:
    """The optimised safeguarding prompt alone (one branch, no contrast): an ablation."""
    return Method("acd-sp", (sp_branch(prompts)[0],), (1.0,))
