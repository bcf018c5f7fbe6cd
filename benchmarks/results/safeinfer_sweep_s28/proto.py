"""Session 28, stage 1 (validation part only): where to add SafeInfer's vector for gated rows.

A prototype outside the engine: transformers `generate` with a forward hook on layer 14, SA only
(no unsafe branch), greedy, 64 new tokens, the shipped vector and probe, threshold T; keyword
judge. Variants: F = the last prompt token (the shipped shape), P = every position from the
user turn's tag on at prefill, E = also every decoded position of the gated rows.

    .venv/bin/python benchmarks/results/safeinfer_sweep_s28/proto.py VARIANT GAMMA T
    # e.g. P 0.5 0: prints one line of rates (stage1.md); texts under runs/safeinfer_proto/
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from safedecode.data import load_anchor
from safedecode.judges import KeywordJudge
from safedecode.methods.safeinfer import _pad_left, _prompt_ids, decoder_layers, load_vector
from safedecode.models import load_default

LAYER = 14
model, tok = load_default()
sv = load_vector(model=model)
_, layers = decoder_layers(model)
w, b, v = sv.gate.weight[LAYER], float(sv.gate.bias[LAYER]), sv.vector
items = load_anchor(part="val")
judge = KeywordJudge()
user_tag = tok.encode("<|im_start|>user", add_special_tokens=False)


def user_start(ids: list[int]) -> int:
    for i in range(len(ids) - len(user_tag), -1, -1):
        if ids[i:i + len(user_tag)] == user_tag:
            return i
    raise ValueError("no user turn")


def run(variant: str, gamma: float, thr: float, bs: int = 16) -> list[dict]:
    state: dict = {}

    def hook(module, args, output):
        h = (output[0] if isinstance(output, tuple) else output).clone()
        add = gamma * v.to(h.dtype)
        if h.shape[1] > 1:  # prefill: the gate judges the last prompt token
            state["on"] = h[:, -1].float() @ w + b > thr
            for r in torch.nonzero(state["on"]).flatten().tolist():
                if "P" in variant:
                    h[r, state["starts"][r]:] += add
                else:
                    h[r, -1] += add
        elif "E" in variant:
            h = h + state["on"].to(h.dtype)[:, None, None] * add
        return (h, *output[1:]) if isinstance(output, tuple) else h

    out = []
    handle = layers[LAYER].register_forward_hook(hook)
    try:
        for s in range(0, len(items), bs):
            part = items[s:s + bs]
            seqs = [_prompt_ids(tok, [{"role": "user", "content": it["prompt"]}]) for it in part]
            t = max(len(x) for x in seqs)
            state["starts"] = [t - len(x) + user_start(x) for x in seqs]
            ids, mask = _pad_left(seqs, tok.pad_token_id)
            with torch.no_grad():
                g = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64,
                                   do_sample=False, pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(g[:, ids.shape[1]:], skip_special_tokens=True)
            for it, tx, on in zip(part, texts, state["on"].tolist(), strict=True):
                out.append({"id": it["id"], "split": it["split"], "cat": it.get("category", ""),
                            "gated": bool(on), "text": tx, "refusal": judge.judge_one(tx).flag})
    finally:
        handle.remove()
    return out


def rate(rows) -> str:
    rows = list(rows)
    return f"{100 * sum(r['refusal'] for r in rows) / max(1, len(rows)):.1f}% of {len(rows)}"


if __name__ == "__main__":
    variant, gamma, thr = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    t0 = time.time()
    rows = run(variant, gamma, thr)
    Path("runs/safeinfer_proto").mkdir(parents=True, exist_ok=True)
    with open(f"runs/safeinfer_proto/{variant}_{gamma}_{thr}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    h = [r for r in rows if r["split"] == "harmful"]
    sf = [r for r in rows if r["split"] != "harmful"]
    held = [r for r in h if r["cat"].startswith("heldout_")]
    print(f"{variant} g{gamma} T{thr}: harmful {rate(h)} (held-out {rate(held)}; gated "
          f"{rate(r for r in h if r['gated'])}) | safe {rate(sf)} (held-out "
          f"{rate(r for r in sf if r['cat'].startswith('heldout_'))}) | "
          f"{time.time() - t0:.0f}s", flush=True)
