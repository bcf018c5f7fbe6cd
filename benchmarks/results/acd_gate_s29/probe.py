"""Session 29 diagnostic for issue 13 (anchor validation part; nothing chosen or shipped): can a
harmful-request probe gate ACD, as it gates SafeInfer?

Hidden states after layer 14 at the last prompt token of each branch of the shipped `acd`
(soft safeguard / adversarial prompts), grabbed through the engine by a gated identity hook.
`transfer`: SafeInfer's shipped probe (fitted on the template-default rendering) read on
them; `fit`: a probe fitted on ACD's own rendering (anchor train part, L2 0.01), read on the
validation part.

    .venv/bin/python benchmarks/results/acd_gate_s29/probe.py transfer|fit
"""
from __future__ import annotations

import dataclasses
import functools
import sys

import torch

from safedecode import methods
from safedecode.data import load_anchor
from safedecode.engine import BranchHook, SafeDecoder
from safedecode.methods.harm_probe import fit_logistic
from safedecode.methods.safeinfer import load_vector
from safedecode.models import load_default

LAYER = 14
model, tok = load_default()
acd = methods.get("acd")
store: dict[int, list[torch.Tensor]] = {}


def grab(h: torch.Tensor, k: int) -> torch.Tensor:
    store.setdefault(k, []).append(h.float().clone())
    return torch.zeros(h.shape[0], dtype=torch.bool)  # steer nothing


branches = tuple(dataclasses.replace(br, hooks=(*br.hooks, BranchHook(
    f"model.layers.{LAYER}", lambda h: h, positions="first", gate=functools.partial(grab, k=k))))
    for k, br in enumerate(acd.branches))
dec = SafeDecoder(model, tok, dataclasses.replace(acd, branches=branches))


def states(items) -> dict[int, torch.Tensor]:
    store.clear()
    prompts = [it["prompt"] for it in items]
    for s in range(0, len(prompts), 16):
        dec.generate(prompts[s:s + 16], max_new_tokens=1)
    return {k: torch.cat(v) for k, v in store.items()}


val = load_anchor(part="val")
harm = torch.tensor([it["split"] == "harmful" for it in val])
held = torch.tensor([it.get("category", "").startswith("heldout_") for it in val])
xs = states(val)
if sys.argv[1:] == ["transfer"]:
    probe = load_vector(model=model).gate
    probes = {k: (probe.weight[LAYER], float(probe.bias[LAYER])) for k in xs}
else:
    train = load_anchor(part="train")
    y = torch.tensor([it["split"] == "harmful" for it in train]).float()
    xt = states(train)
    probes = {k: fit_logistic(xt[k], y, l2=0.01) for k in xt}
for k, (w, b) in probes.items():
    z = xs[k] @ w + b
    for t in (-1, 0, 1, 2):
        on = z > t
        print(f"branch {k} ({acd.branches[k].name}) T{t:+d}: harmful {on[harm].float().mean():.3f}"
              f" (held-out {on[harm & held].float().mean():.3f}) | safe "
              f"{on[~harm].float().mean():.3f} (held-out look-alikes "
              f"{on[~harm & held].float().mean():.3f})", flush=True)
