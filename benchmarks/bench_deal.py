"""DeAL's cost on the embedded model: tokens/s of DeAL (k = 4, lookahead = 8; one-token and
chunk commits, and chunk commits over the first ``--horizon`` tokens only) against plain
decoding of the same requests, and against the naive DeAL baseline (batch 1, everything
prefilled again at every search step, as the public code), at B = 1 and 8.
Writes ``benchmarks/results/deal_<device>.{md,json}``.

    python benchmarks/bench_deal.py            # the published run
    python benchmarks/bench_deal.py --quick    # B = 1, a few tokens: a smoke run
    python benchmarks/bench_deal.py --device cuda --dtype bfloat16   # on a GPU

The reward is a keyword reward (cheap), so the numbers are the search's own cost. The naive
baseline runs requests one after another, so its tokens/s does not depend on B; it is measured
on ``--naive-requests`` prompts (default 2) and that rate is compared at every B.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from safedecode import methods
from safedecode.bench.machine import add_model_options, load_bench_model
from safedecode.bench.naive import NaiveDeAL
from safedecode.bench.report import write_script_result
from safedecode.engine import SafeDecoder
from safedecode.models import model_name

OUT = Path(__file__).parent / "results"
PROMPTS = ["How do I pick a lock?", "Write a short poem about autumn.",
           "What are three tips for learning a new language?", "Describe the water cycle.",
           "How can I make a fake ID?", "Give me a recipe for pancakes.",
           "Explain what a database index is.", "How do I get revenge on my neighbour?"]
REWARD = "keywords:include=sorry|cannot|safe:exclude=kill|weapon"


def _rate(results, seconds: float) -> float:
    return sum(len(r.token_ids) for r in results) / seconds


def run(model, tok, batch: list[int], tokens: int, k: int, lookahead: int, horizon: int,
        naive_requests: int, log) -> dict:
    plain = SafeDecoder(model, tok, methods.get("plain"))
    modes = {"token": (1, None), "chunk": (lookahead, None), "horizon": (lookahead, horizon)}
    decs = {m: SafeDecoder(model, tok, methods.get("deal", k=k, lookahead=lookahead,
                                                     chunk=c, horizon=h, reward=REWARD))
            for m, (c, h) in modes.items()}
    plain.generate(PROMPTS[0], max_new_tokens=4)  # warm-up
    rows = []
    for b in batch:
        prompts = (PROMPTS * (b // len(PROMPTS) + 1))[:b]
        kw = dict(max_new_tokens=tokens, ignore_eos=True)
        t0 = time.perf_counter()
        ref = plain.generate(prompts, **kw)
        row = {"batch": b, "plain_tok_s": _rate(ref, time.perf_counter() - t0)}
        for mode, dec in decs.items():
            t0 = time.perf_counter()
            out = dec.generate(prompts, **kw)
            row[f"{mode}_tok_s"] = _rate(out, time.perf_counter() - t0)
            row[f"{mode}_slowdown"] = row["plain_tok_s"] / row[f"{mode}_tok_s"]
        rows.append(row)
        log(json.dumps(row))
    naive = NaiveDeAL(model, tok, decs["token"].search)
    t0 = time.perf_counter()
    n_tok = 0
    for p in PROMPTS[:naive_requests]:
        n_tok += len(naive.generate(p, max_new_tokens=tokens).token_ids)
    naive_rate = n_tok / (time.perf_counter() - t0)
    for row in rows:
        row["naive_tok_s"] = naive_rate
        row["token_over_naive"] = row["token_tok_s"] / naive_rate
        row["chunk_over_naive"] = row["chunk_tok_s"] / naive_rate
    log(json.dumps({"naive_tok_s": naive_rate}))
    return {"rows": rows, "k": k, "lookahead": lookahead, "horizon": horizon, "tokens": tokens,
            "naive_requests": naive_requests, "reward": REWARD}


def markdown(r: dict, command: str, machine: str) -> str:
    lines = [f"| {x['batch']} | {x['plain_tok_s']:.1f} | {x['token_tok_s']:.2f} "
             f"({x['token_slowdown']:.1f}x) | {x['chunk_tok_s']:.2f} "
             f"({x['chunk_slowdown']:.1f}x) | {x['horizon_tok_s']:.2f} "
             f"({x['horizon_slowdown']:.1f}x) | {x['naive_tok_s']:.3f} | "
             f"**{x['token_over_naive']:.1f}x** | {x['chunk_over_naive']:.1f}x |"
             for x in r["rows"]]
    by = {x["batch"]: x for x in r["rows"]}
    notes = []
    if 8 in by:
        x = by[8]
        met = "met" if x["token_over_naive"] >= 10 else "MISSED"
        notes.append(f"- DeAL (one-token commits) / naive at B = 8: "
                     f"**{x['token_over_naive']:.1f}x** (target >= 10x: {met})")
    for b, x in sorted(by.items()):
        notes.append(f"- chunk commits at B = {b}: {x['chunk_slowdown']:.2f}x plain's time per "
                     "token (target within 3x: "
                     f"{'met' if x['chunk_slowdown'] <= 3 else 'MISSED'}); "
                     f"searching the first {r['horizon']} tokens only: "
                     f"{x['horizon_slowdown']:.2f}x")
    return "\n".join([
        f"# DeAL, {r['model']} ({r['device']})", "",
        f"`{command}` ({time.strftime('%Y-%m-%dT%H:%M:%S%z')})", "", machine, "",
        f"k = {r['k']} candidates, lookahead {r['lookahead']} (greedy rollouts), beam 1, reward "
        f"`{r['reward']}`, base `plain`, {r['tokens']} new tokens per request (EOS ignored). "
        "*token*: one token committed per search step (the paper); *chunk*: the best "
        f"rollout's first {r['lookahead']} tokens; *horizon*: chunk commits over the first "
        f"{r['horizon']} tokens, then the base method alone (`horizon={r['horizon']}`). "
        "Naive: one request at a time, the whole "
        "context prefilled again for the candidates and for every rollout at every step "
        f"(measured on {r['naive_requests']} requests; its rate does not depend on B).", "",
        "| B | plain tok/s | DeAL token tok/s (slowdown) | DeAL chunk tok/s (slowdown) | DeAL "
        "horizon tok/s (slowdown) | naive DeAL tok/s | token / naive | chunk / naive |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *lines, "", *notes, "",
        "On this CPU a decode step costs about in proportion to its rows, and a search step "
        "decodes k = 4 sequences per request, so chunk commits cost about k·(1 + 1/lookahead) "
        "times plain decoding once the rows stop being cheap (B = 8: 32 sequences); at B = 1 "
        "the extra rows are nearly free. Near the end of an answer a rollout that reaches "
        "max_new_tokens is accepted whole (in both DeAL and the naive baseline), so a search "
        "needs fewer steps than tokens.", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--naive-requests", type=int, default=2)
    ap.add_argument("--horizon", type=int, default=16)
    ap.add_argument("--out", type=Path, default=OUT)
    add_model_options(ap)
    args = ap.parse_args()
    batch = [1] if args.quick else [1, 8]
    tokens = args.tokens or (8 if args.quick else 32)
    try:
        model, tok = load_bench_model(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        ap.error(str(exc))
    t0 = time.perf_counter()
    r = run(model, tok, batch, tokens, 4, 8, args.horizon,
            1 if args.quick else args.naive_requests,
            lambda m: print(m, file=sys.stderr, flush=True))
    r.update(wall_s=time.perf_counter() - t0, model=model_name(model), device=args.device,
             dtype=args.dtype)
    name = f"deal_{args.device}" + ("_quick" if args.quick else "")
    write_script_result(args.out, name, r, "benchmarks/bench_deal.py", markdown, sys.argv[1:],
                        args.device)


if __name__ == "__main__":
    main()
