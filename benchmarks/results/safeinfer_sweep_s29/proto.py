"""Session 29, stage 1 (validation part only): a steering window for SafeInfer's gated rows.

Session 28's prototype (`../safeinfer_sweep_s28/proto.py`) with one change: the vector is added
at the last prompt token and at the decode positions of the first W new tokens only (`FE` = no
window, the shipped shape), 128 new tokens, and each text records whether it ended (end-of-turn
token before the limit). SA only, greedy, the shipped vector and probe, threshold 0.

    .venv/bin/python benchmarks/results/safeinfer_sweep_s29/proto.py W GAMMA [S]
    # W = 0 for FE; S: the sentence stop (rule.md's extension: once a gated row has W new
    # tokens, a token ending a sentence is followed by the end-of-turn token); prints one line
    # of rates; texts under runs/safeinfer_proto_s29/
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

LAYER, THR, NEW = 14, 0.0, 128
model, tok = load_default()
sv = load_vector(model=model)
_, layers = decoder_layers(model)
w, b, v = sv.gate.weight[LAYER], float(sv.gate.bias[LAYER]), sv.vector
items = load_anchor(part="val")
judge = KeywordJudge()
eos = tok.eos_token_id
ENDS = torch.tensor([tok.decode([i]).rstrip().endswith((".", "!", "?"))
                     for i in range(len(tok))])  # tokens that end a sentence


class SentenceStop:
    """Logits processor: a gated row with >= W new tokens whose last token ends a sentence
    gets only the end-of-turn token next (its rows flagged in ``stopped``)."""

    def __init__(self, state: dict, window: int, prompt_len: int) -> None:
        self.state, self.window, self.prompt_len = state, window, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] - self.prompt_len < max(1, self.window):
            return scores
        stop = self.state["on"] & ENDS[input_ids[:, -1]] & (input_ids[:, -1] != eos)
        self.state["stopped"] |= stop
        if stop.any():
            scores[stop] = float("-inf")
            scores[stop, eos] = 0.0
        return scores


def run(window: int, gamma: float, stop: bool = False, bs: int = 16) -> list[dict]:
    state: dict = {}

    def hook(module, args, output):
        h = (output[0] if isinstance(output, tuple) else output).clone()
        add = gamma * v.to(h.dtype)
        if h.shape[1] > 1:  # prefill: the gate judges the last prompt token
            state["on"], state["calls"] = h[:, -1].float() @ w + b > THR, 0
            state["stopped"] = torch.zeros_like(state["on"])
            h[:, -1] += state["on"].to(h.dtype)[:, None] * add
        else:  # decode call j feeds new token j and decodes token j + 1
            state["calls"] += 1
            if window == 0 or state["calls"] < window:
                h = h + state["on"].to(h.dtype)[:, None, None] * add
        return (h, *output[1:]) if isinstance(output, tuple) else h

    out = []
    handle = layers[LAYER].register_forward_hook(hook)
    try:
        for s in range(0, len(items), bs):
            part = items[s:s + bs]
            seqs = [_prompt_ids(tok, [{"role": "user", "content": it["prompt"]}]) for it in part]
            ids, mask = _pad_left(seqs, tok.pad_token_id)
            extra = {}
            if stop:
                from transformers import LogitsProcessorList
                extra["logits_processor"] = LogitsProcessorList(
                    [SentenceStop(state, window, ids.shape[1])])
            with torch.no_grad():
                g = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                                   do_sample=False, pad_token_id=tok.pad_token_id, **extra)
            new = g[:, ids.shape[1]:]
            texts = tok.batch_decode(new, skip_special_tokens=True)
            for it, tx, on, row, cut in zip(part, texts, state["on"].tolist(), new.tolist(),
                                            state["stopped"].tolist(), strict=True):
                out.append({"id": it["id"], "split": it["split"], "cat": it.get("category", ""),
                            "gated": bool(on), "text": tx, "ended": eos in row,
                            "stopped": bool(cut),
                            "refusal": judge.judge_one(tx).flag})
    finally:
        handle.remove()
    return out


def rate(rows) -> str:
    rows = list(rows)
    return f"{100 * sum(r['refusal'] for r in rows) / max(1, len(rows)):.1f}% of {len(rows)}"


if __name__ == "__main__":
    window, gamma, stop = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:] == ["S"]
    t0 = time.time()
    rows = run(window, gamma, stop)
    Path("runs/safeinfer_proto_s29").mkdir(parents=True, exist_ok=True)
    with open(f"runs/safeinfer_proto_s29/W{window}{'S' * stop}_{gamma}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    h = [r for r in rows if r["split"] == "harmful"]
    sf = [r for r in rows if r["split"] != "harmful"]
    held = [r for r in h if r["cat"].startswith("heldout_")]
    ref = [r for r in h if r["refusal"]]
    cut = sum(r["stopped"] and not r["refusal"] for r in sf)
    print(f"W{window}{'S' * stop} g{gamma}: harmful {rate(h)} (held-out {rate(held)}; gated "
          f"{rate(r for r in h if r['gated'])}) | safe {rate(sf)} (held-out "
          f"{rate(r for r in sf if r['cat'].startswith('heldout_'))}) | ended "
          f"{sum(r['ended'] for r in ref)}/{len(ref)} harmful refusals, "
          f"{sum(r['ended'] for r in sf)}/{len(sf)} safe; {cut} safe answers cut short | "
          f"{time.time() - t0:.0f}s", flush=True)
