"""SafeInfer's cost on the embedded model: tokens/s of SafeInfer (SA hook + sGDS against the
LoRA unsafe branch, one batched forward over one KV cache) against plain decoding — transformers'
``generate`` and safedecode's own plain engine — and against a naive SafeInfer (the reference
code's shape: the steered model and the merged unsafe model run one after the other, each with
its own KV cache), at B = 1 and 8. Writes ``benchmarks/results/safeinfer_cpu.{md,json}``.

    python benchmarks/bench_safeinfer.py            # the published run
    python benchmarks/bench_safeinfer.py --quick    # B = 1, a few tokens: a smoke run

Greedy, EOS ignored, every rate is the median of ``--repeats`` runs measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from safedecode import methods
from safedecode.bench.naive import NaiveSafeInfer
from safedecode.bench.report import write_script_result
from safedecode.engine import SafeDecoder
from safedecode.models import DEFAULT_NAME, load_default

OUT = Path(__file__).parent / "results"
PROMPTS = ["How do I pick a lock?", "Write a short poem about autumn.",
           "What are three tips for learning a new language?", "Describe the water cycle.",
           "How can I make a fake ID?", "Give me a recipe for pancakes.",
           "Explain what a database index is.", "How do I get revenge on my neighbour?"]


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(batch: list[int], tokens: int, repeats: int, log) -> dict:
    import importlib

    si = importlib.import_module("safedecode.methods.safeinfer")
    model, tok = load_default()
    meth = methods.get("safeinfer")
    b_branch, u_branch = meth.branches
    hook = b_branch.hooks[0]
    sv = si.load_vector(model=model)
    merged = u_branch.adapter.merged(model)
    naive = NaiveSafeInfer(model, tok, vector=sv.vector, module=hook.module,
                           gamma=hook.fn.keywords["scale"],
                           lam=meth.weights[1] / (1 + meth.weights[1]), unsafe_model=merged)
    safe = SafeDecoder(model, tok, meth)
    plain = SafeDecoder(model, tok, methods.get("plain"))
    tok.padding_side = "left"
    rows = []
    for b in batch:
        prompts = (PROMPTS * (b // len(PROMPTS) + 1))[:b]
        enc = tok.apply_chat_template([[{"role": "user", "content": p}] for p in prompts],
                                      add_generation_prompt=True, padding=True,
                                      return_tensors="pt", return_dict=True)
        kw = dict(max_new_tokens=tokens, ignore_eos=True)
        hf_kw = dict(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                     pad_token_id=tok.pad_token_id)
        runs = {"hf_generate": partial(torch.no_grad()(model.generate), **hf_kw),
                "plain_engine": partial(plain.generate, prompts, **kw),
                "safeinfer": partial(safe.generate, prompts, **kw),
                "naive_safeinfer": partial(naive.generate, prompts, max_new_tokens=tokens)}
        for fn in runs.values():  # warm-up at this batch size
            fn()
        row = {"batch": b}
        for name, fn in runs.items():
            row[f"{name}_tok_s"] = b * tokens / _timed(fn, repeats)
        row["safeinfer_over_hf"] = row["safeinfer_tok_s"] / row["hf_generate_tok_s"]
        row["safeinfer_over_plain_engine"] = row["safeinfer_tok_s"] / row["plain_engine_tok_s"]
        row["safeinfer_over_naive"] = row["safeinfer_tok_s"] / row["naive_safeinfer_tok_s"]
        rows.append(row)
        log(str(row))
    return {"rows": rows, "tokens": tokens, "repeats": repeats, "method": meth.describe()}


def markdown(r: dict, command: str, machine: str) -> str:
    lines = [f"| {x['batch']} | {x['hf_generate_tok_s']:.1f} | {x['plain_engine_tok_s']:.1f} | "
             f"{x['safeinfer_tok_s']:.1f} | {x['naive_safeinfer_tok_s']:.1f} | "
             f"**{x['safeinfer_over_hf']:.2f}x** | {x['safeinfer_over_plain_engine']:.2f}x | "
             f"**{x['safeinfer_over_naive']:.2f}x** |" for x in r["rows"]]
    notes = []
    for x in r["rows"]:
        hf_ok = "met" if x["safeinfer_over_hf"] >= 0.9 else "MISSED"
        nv_ok = "met" if x["safeinfer_over_naive"] >= 2 else "MISSED"
        notes.append(f"- B = {x['batch']}: SafeInfer / transformers generate "
                     f"{x['safeinfer_over_hf']:.2f}x (target >= 0.9x: {hf_ok}); SafeInfer / "
                     f"naive {x['safeinfer_over_naive']:.2f}x (target >= 2x: {nv_ok})")
    return "\n".join([
        f"# SafeInfer, {DEFAULT_NAME} (cpu)", "",
        f"`{command}` ({time.strftime('%Y-%m-%dT%H:%M:%S%z')})", "", machine, "",
        f"Greedy, {r['tokens']} new tokens per request (EOS ignored), median of "
        f"{r['repeats']} runs each. SafeInfer = `methods.get(\"safeinfer\")` at its shipped "
        "knobs (the vector file's recorded ones: the harmful-request gate included, which adds "
        "one dot product per row at prefill) with the shipped unsafe adapter (two branches: the "
        "amplified one with the steering hook, the unsafe one with the LoRA delta on its rows; "
        "one forward per step). *hf generate*: transformers' `generate` of the plain model "
        "(left-padded batch). *plain engine*: safedecode's engine, one branch. *naive*: the "
        "steered model (the vector added to every row at every step, as the reference code "
        "adds it), then the merged unsafe model, each with its own DynamicCache, the union rule "
        "in torch.", "",
        "```", r["method"], "```", "",
        "| B | hf generate tok/s | plain engine tok/s | SafeInfer tok/s | naive SafeInfer tok/s "
        "| SafeInfer / hf | SafeInfer / plain engine | SafeInfer / naive |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|", *lines, "", *notes, ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    batch = [1] if args.quick else [1, 8]
    tokens = args.tokens or (8 if args.quick else 64)
    t0 = time.perf_counter()
    r = run(batch, tokens, 1 if args.quick else args.repeats,
            lambda m: print(m, file=sys.stderr, flush=True))
    r["wall_s"] = time.perf_counter() - t0
    write_script_result(args.out, "safeinfer_cpu_quick" if args.quick else "safeinfer_cpu", r,
                        "benchmarks/bench_safeinfer.py", markdown, sys.argv[1:])


if __name__ == "__main__":
    main()
