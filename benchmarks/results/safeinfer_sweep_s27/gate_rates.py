"""How often the shipped SafeInfer gate fires on each data set (diagnosis for the report, run
after the evaluation; it chooses nothing): the share of requests whose probe logit at the
chosen layer is above each method's threshold.

    .venv/bin/python benchmarks/results/safeinfer_sweep_s27/gate_rates.py
"""
from __future__ import annotations

from safedecode.eval.datasets import load_dataset
from safedecode.methods.harm_probe import last_token_states
from safedecode.methods.safeinfer import load_vector
from safedecode.models import load_default

SETS = ("harmbench", "anchor-harmful-val", "benign", "benign-lookalike", "benign-ordinary",
        "anchor-safe-val")

model, tok = load_default()
sv = load_vector(model=model)
knobs = {m: (sv.decoding[m]["layer"], sv.decoding[m]["gate"]) for m in ("safeinfer",
                                                                        "safeinfer-sa")}
print("| data set | n | " + " | ".join(f"gated, {m} (layer {lay}, logit > {t})" for m, (lay, t)
                                         in knobs.items()) + " |")
print("|---|---:|" + "---:|" * len(knobs))
for name in SETS:
    prompts = [it.prompt for it in load_dataset(name).items]
    states = last_token_states(model, tok, prompts)
    cells = [f"{100 * float((sv.gate.logit(states[:, lay], lay) > t).float().mean()):.1f}%"
             for lay, t in knobs.values()]
    print(f"| {name} | {len(prompts)} | " + " | ".join(cells) + " |")
