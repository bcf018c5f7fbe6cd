"""Session 30, issue 14, stage 1 (rule: rule.md): SafeInfer's gate probe and request forms.

The hidden state after layer 14 at the last prompt token, template-default rendering (as
`safedecode safeinfer-gate` reads it: `harm_probe.last_token_states`), of the anchor train part
plain and in the train forms (`safedecode.data.forms`), and of the validation part plain and in
the validation wrappers V1-V4 of `acd_gate_s30/forms.py` (never trained on). Nothing here reads
HarmBench or the benign evaluation sets.

    .venv/bin/python benchmarks/results/safeinfer_sweep_s30/forms.py FEATURES.pt > forms.md
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from safedecode.data import load_anchor
from safedecode.data.forms import TRAIN_FORMS, in_forms
from safedecode.methods.harm_probe import fit_logistic

LAYER, L2 = 14, 0.01
_spec = importlib.util.spec_from_file_location(
    "acd_forms", Path(__file__).resolve().parent.parent / "acd_gate_s30" / "forms.py")
acd_forms = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(acd_forms)


def features(path: Path) -> dict:
    if path.exists():
        return torch.load(path)
    from safedecode.methods.harm_probe import last_token_states
    from safedecode.models import load_default

    model, tok = load_default()
    train, val = load_anchor(part="train"), load_anchor(part="val")
    formed = in_forms(train, tuple(TRAIN_FORMS))
    x_train = last_token_states(model, tok, [it["prompt"] for it in formed])[:, LAYER]
    out = {"train": x_train, "y_train": torch.tensor([it["split"] == "harmful" for it in formed]),
           "n_train": len(train), "val": {},
           "y_val": torch.tensor([it["split"] == "harmful" for it in val]),
           "held_val": torch.tensor([it["category"].startswith("heldout_") for it in val])}
    for name, wrap in {"plain": lambda i, r: r, **acd_forms.VAL_WRAPPERS}.items():
        prompts = [wrap(i, it["prompt"]) for i, it in enumerate(val)]
        out["val"][name] = last_token_states(model, tok, prompts)[:, LAYER]
        print(f"val {name}", file=sys.stderr, flush=True)
    torch.save(out, path)
    return out


def main() -> None:
    d = features(Path(sys.argv[1]))
    n, yt, yv, held = d["n_train"], d["y_train"], d["y_val"], d["held_val"]
    probes = {"shipped (train plain)": fit_logistic(d["train"][:n], yt[:n].float(), l2=L2),
              "forms (train plain + T1-T4)": fit_logistic(d["train"], yt.float(), l2=L2)}
    acd_forms.print_table(probes, d["val"], yv, held)

if __name__ == "__main__":
    main()
