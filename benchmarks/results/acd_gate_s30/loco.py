"""Session 30, issue 13 (rule: rule.md): which harmful-request probe carries to unseen requests?

Leave-one-category-out (LOCO) on the anchor **train** part: every (split, category) group is
scored by a probe fitted on the other groups. Features: the shipped `acd`'s SP branch after
decoder layer L at the last prompt token (`harm_probe.branch_last_states`, as `safedecode
acd-gate` reads them). Nothing here reads HarmBench or the benign evaluation sets.

    .venv/bin/python benchmarks/results/acd_gate_s30/loco.py FEATURES.pt > loco.md
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from safedecode.data import load_anchor
from safedecode.methods.harm_probe import fit_logistic

LAYERS = (6, 10, 14, 18, 22, 26)
PROBES = ("logistic:0.01", "logistic:0.1", "logistic:1", "logistic:10", "mass-mean")


def features(path: Path) -> dict:
    """SP-branch states of every anchor request at every layer in LAYERS (cached in ``path``)."""
    if path.exists():
        return torch.load(path)
    from safedecode import methods
    from safedecode.methods.harm_probe import branch_last_states
    from safedecode.models import load_default

    model, tok = load_default()
    acd = methods.get("acd")
    out = {}
    for part in ("train", "val"):
        items = load_anchor(part=part)
        prompts = [it["prompt"] for it in items]
        out[part] = {"items": [(it["split"], it["category"]) for it in items],
                     "x": {li: branch_last_states(model, tok, acd, 0, f"model.layers.{li}",
                                                  prompts) for li in LAYERS}}
        print(f"{part}: {len(items)} requests", file=sys.stderr, flush=True)
    torch.save(out, path)
    return out


def fit(kind: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """A probe as ``(w, b)``: logit = x · w + b (calibrated by a 1-D logistic on its train part)."""
    if kind.startswith("logistic:"):
        return fit_logistic(x, y, l2=float(kind.split(":")[1]))
    d = x[y == 1].mean(0) - x[y == 0].mean(0)
    a, c = fit_logistic((x @ d).unsqueeze(1), y, l2=0.0)
    return d * a[0], c


def auroc(score: torch.Tensor, pos: torch.Tensor) -> float:
    """Probability a positive outscores a negative (ties count half)."""
    p, n = score[pos], score[~pos]
    gt = (p[:, None] > n[None, :]).float().mean()
    eq = (p[:, None] == n[None, :]).float().mean()
    return float(gt + 0.5 * eq)


def main() -> None:
    data = features(Path(sys.argv[1]))
    tr, va = data["train"], data["val"]
    yt = torch.tensor([s == "harmful" for s, _ in tr["items"]])
    yv = torch.tensor([s == "harmful" for s, _ in va["items"]])
    held = torch.tensor([c.startswith("heldout_") for _, c in va["items"]])
    groups = sorted(set(tr["items"]))
    gid = torch.tensor([groups.index(g) for g in tr["items"]])
    print("| layer | probe | LOCO AUROC | LOCO harmful flagged at 0 | LOCO safe flagged at 0 "
          "| val harmful at 0 (held-out) | val safe at 0 (held-out look-alikes) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for li in LAYERS:
        xt, xv = tr["x"][li], va["x"][li]
        for kind in PROBES:
            z = torch.empty(len(yt))
            for g in range(len(groups)):
                out = gid == g
                w, b = fit(kind, xt[~out], yt[~out].float())
                z[out] = xt[out] @ w + b
            w, b = fit(kind, xt, yt.float())
            on = xv @ w + b > 0
            print(f"| {li} | {kind} | {auroc(z, yt):.3f} | {(z[yt] > 0).float().mean():.1%} | "
                  f"{(z[~yt] > 0).float().mean():.1%} | {on[yv].float().mean():.1%} "
                  f"({on[yv & held].float().mean():.1%}) | {on[~yv].float().mean():.1%} "
                  f"({on[~yv & held].float().mean():.1%}) |", flush=True)


if __name__ == "__main__":
    main()
