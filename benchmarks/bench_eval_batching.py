"""What continuous batching inside one ``generate`` call buys an evaluation run: the same
prompts (the anchor set's **train** part, safe and harmful, shortest first as ``safedecode eval``
orders them) generated in static batches of ``--batch`` (one ``generate`` call each, every batch
waiting for its longest answer: the eval runner before session 34) and in one call with
``max_batch`` = ``--batch`` (the next request joins as one ends: the runner now), greedy, EOS
kept (answers of their natural lengths), per method; the answers must be identical. Each cell:
the best of ``--repeats`` alternated runs. Writes
``benchmarks/results/eval_batching_<device>.{md,json}``.

    python benchmarks/bench_eval_batching.py            # the published run
    python benchmarks/bench_eval_batching.py --quick    # 8 prompts, 16 tokens: a smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from safedecode.bench.machine import add_model_options, load_bench_model
from safedecode.bench.report import write_script_result
from safedecode.data import load_anchor
from safedecode.engine import SafeDecoder
from safedecode.eval.runner import parse_methods
from safedecode.models import model_name

OUT = Path(__file__).parent / "results"


def run(model, tok, names: list[str], n: int, batch: int, tokens: int, repeats: int,
        log) -> list[dict]:
    half = n // 2
    prompts = [it["prompt"] for it in load_anchor("safe", "train")[:n - half]
               + load_anchor("harmful", "train")[:half]]
    prompts.sort(key=lambda p: len(tok(p, add_special_tokens=False)["input_ids"]))
    rows = []
    for spec in parse_methods(",".join(names)):  # names or eval's knob strings
        name = spec.label
        dec = SafeDecoder(model, tok, spec.build())
        dec.generate(prompts[:2], max_new_tokens=2)  # warm-up
        best = {"static": float("inf"), "continuous": float("inf")}
        for _ in range(repeats):
            t0 = time.perf_counter()
            static = [r for i in range(0, len(prompts), batch)
                      for r in dec.generate(prompts[i:i + batch], max_new_tokens=tokens)]
            best["static"] = min(best["static"], time.perf_counter() - t0)
            t0 = time.perf_counter()
            cont = dec.generate(prompts, max_new_tokens=tokens, max_batch=batch)
            best["continuous"] = min(best["continuous"], time.perf_counter() - t0)
        same = sum(a.token_ids == b.token_ids for a, b in zip(static, cont, strict=True))
        new = sum(len(r.token_ids) for r in cont)
        lengths = sorted(len(r.token_ids) for r in cont)
        rows.append({"method": name, "static_s": best["static"],
                     "continuous_s": best["continuous"], "new_tokens": new,
                     "median_tokens": lengths[len(lengths) // 2], "identical": same,
                     "requests": len(prompts)})
        log(f"{name}: static {best['static']:.1f}s continuous {best['continuous']:.1f}s "
            f"({best['static'] / best['continuous']:.2f}x), identical {same}/{len(prompts)}")
    return rows


def markdown(r: dict, command: str, machine: str) -> str:
    lines = [f"# Continuous batching inside one `generate` call: an evaluation's speed, "
             f"{r['model']} ({r['device']})", "", machine, "",
             f"{r['rows'][0]['requests']} anchor-train prompts (half safe, half "
             f"harmful; shortest first), greedy, at most {r['tokens']} new tokens (EOS kept), "
             f"{r['batch']} requests decoding at once; best of {r['repeats']} alternated runs. "
             "*static*: one `generate` call per batch of that size (each waits for its longest "
             "answer); *continuous*: one call, `max_batch` the same (`safedecode eval` now).",
             "", f"    {command}", "",
             "| method | static s | continuous s | continuous / static speed | new tokens | "
             "median answer | identical answers |", "|---|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        lines.append(f"| `{x['method']}` | {x['static_s']:.1f} | {x['continuous_s']:.1f} | "
                     f"**{x['static_s'] / x['continuous_s']:.2f}×** | {x['new_tokens']} | "
                     f"{x['median_tokens']} | {x['identical']}/{x['requests']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=None,
                    help="comma-separated, names or eval's knob strings (default plain,acd; "
                         "--quick: plain,acd-text, which runs on any model)")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    add_model_options(ap)
    args = ap.parse_args()
    for flag in ("requests", "batch", "tokens", "repeats"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag}: must be >= 1")
    try:
        model, tok = load_bench_model(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        ap.error(str(exc))
    n, tokens, repeats = (8, 16, 1) if args.quick else (args.requests, args.tokens, args.repeats)
    batch = min(args.batch, 4) if args.quick else args.batch
    names = [args.methods or ("plain,acd-text" if args.quick else "plain,acd")]
    rows = run(model, tok, names, n, batch, tokens, repeats,
               lambda m: print(m, file=sys.stderr, flush=True))
    r = {"rows": rows, "tokens": tokens, "batch": batch, "repeats": repeats,
         "model": model_name(model), "device": args.device, "dtype": args.dtype}
    name = f"eval_batching_{args.device}" + ("_quick" if args.quick else "")
    write_script_result(args.out, name, r, "benchmarks/bench_eval_batching.py", markdown,
                        sys.argv[1:], args.device)


if __name__ == "__main__":
    main()
