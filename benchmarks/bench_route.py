"""The reward router's cost on the embedded model: tokens/s of `route` (its shipped settings: base
`acd`, the `harmless` reward model, H = 16) against `plain`, `acd` and DeAL ∘ `acd` at its
shipped settings (the other reward-guided way to undo acd's over-refusals), and of `route` and
the gated `acd` with and without dropping the rows a decided sequence does not read, the same
requests, B = 1 and 8, greedy, EOS ignored. Each cell: the best of ``--repeats`` runs (methods
alternated).
Writes ``benchmarks/results/route_<device>.{md,json}``.

    python benchmarks/bench_route.py             # the published run
    python benchmarks/bench_route.py --quick     # B = 1, 8 tokens: a smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from safedecode import methods
from safedecode.bench.machine import add_model_options, load_bench_model
from safedecode.bench.report import write_script_result
from safedecode.engine import SafeDecoder
from safedecode.models import model_name

OUT = Path(__file__).parent / "results"
PROMPTS = ["How do I pick a lock?", "Write a short poem about autumn.",
           "What are three tips for learning a new language?", "Describe the water cycle.",
           "How can I make a fake ID?", "Give me a recipe for pancakes.",
           "Explain what a database index is.", "How do I get revenge on my neighbour?"]
DEAL = dict(reward="harmless", chunk=8, lookahead=8, horizon=24, k=4, base="acd", lam=0.5,
            propose=2, mix=0.25)
# label -> (method, its arguments, SafeDecoder's drop_rows); "every row": the same method with
# the rows a decided sequence does not read decoded anyway (the engine before session 32)
METHODS = {"plain": ("plain", {}, True), "acd": ("acd", {}, True),
           "route": ("route", {}, True), "route, every row": ("route", {}, False),
           "gated acd": ("acd", {"gate": 0}, True),
           "gated acd, every row": ("acd", {"gate": 0}, False),
           "DeAL ∘ acd": ("deal", DEAL, False)}


def run(model, tok, batch: list[int], tokens: int, repeats: int, log) -> list[dict]:
    decs = {label: SafeDecoder(model, tok, methods.get(name, **kw), drop_rows=drop)
            for label, (name, kw, drop) in METHODS.items()}
    for dec in decs.values():  # warm-up (and the reward model's first call)
        dec.generate(PROMPTS[:2], max_new_tokens=2)
    rows = []
    for b in batch:
        prompts = (PROMPTS * (b // len(PROMPTS) + 1))[:b]
        best = dict.fromkeys(decs, 0.0)
        for _ in range(repeats):
            for label, dec in decs.items():
                t0 = time.perf_counter()
                out = dec.generate(prompts, max_new_tokens=tokens, ignore_eos=True)
                rate = sum(len(r.token_ids) for r in out) / (time.perf_counter() - t0)
                best[label] = max(best[label], rate)
        row = {"batch": b, **{f"{k}_tok_s": v for k, v in best.items()}}
        rows.append(row)
        log(f"B {b}: " + ", ".join(f"{k} {v:.1f}" for k, v in best.items()))
    return rows


def markdown(r: dict, command: str, machine: str) -> str:
    head = "| B | " + " | ".join(f"{k} tok/s" for k in METHODS) + " | route / plain | " \
        "route / acd | route / DeAL ∘ acd | route / route every row | gated acd / every row |"
    lines = [f"# The reward router's cost ({r['device']})", "", machine, "",
             f"{r['model']}, greedy, {r['tokens']} new tokens (EOS ignored), best of "
             f"{r['repeats']} alternated runs. `route`: base `acd`, `harmless` reward, H 16 "
             "(two sequences of three branches for 16 tokens, one reward call, then one); "
             "DeAL ∘ `acd`: the shipped search (k 4, propose 2, lookahead 8, chunk 8, horizon "
             "24, λ 0.5, mix 0.25, `harmless` reward). Gated `acd`: `acd:gate=0` (the shipped "
             "probe). *every row*: `SafeDecoder(drop_rows=False)` — a decided sequence decodes "
             "all its branch rows (three), not only the ones its op reads (two if gated on, "
             "one if off).", "",
             f"    {command}", "", head, "|---:|" + "---:|" * (len(METHODS) + 5)]
    for x in r["rows"]:
        v = {k: x[f"{k}_tok_s"] for k in METHODS}
        route = v["route"]
        lines.append(f"| {x['batch']} | " + " | ".join(f"{y:.1f}" for y in v.values())
                     + f" | {route / v['plain']:.2f}× | {route / v['acd']:.2f}× | "
                     f"{route / v['DeAL ∘ acd']:.2f}× | {route / v['route, every row']:.2f}× | "
                     f"{v['gated acd'] / v['gated acd, every row']:.2f}× |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    add_model_options(ap)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats: must be >= 1")
    try:
        model, tok = load_bench_model(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        ap.error(str(exc))
    batch, tokens = ([1], 8) if args.quick else ([1, 8], 64)
    rows = run(model, tok, batch, tokens, 1 if args.quick else args.repeats,
               lambda m: print(m, file=sys.stderr, flush=True))
    r = {"rows": rows, "tokens": tokens, "repeats": 1 if args.quick else args.repeats,
         "model": model_name(model), "device": args.device, "dtype": args.dtype}
    name = f"route_{args.device}" + ("_quick" if args.quick else "")
    write_script_result(args.out, name, r, "benchmarks/bench_route.py", markdown, sys.argv[1:],
                        args.device)


if __name__ == "__main__":
    main()
