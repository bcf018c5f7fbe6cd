"""Load benchmark of ``safedecode serve`` on the embedded model: throughput and p50/p99 time to
first token and inter-token latency at concurrency 1, 4, 16, 32 (closed-loop streaming clients,
:mod:`safedecode.bench.load`), everything on 127.0.0.1. Writes
``benchmarks/results/serve_<device>.{md,json,png}``
(``--device cuda --dtype bfloat16 --model PATH``: the same on a GPU).

    python benchmarks/bench_serve.py            # the published run
    python benchmarks/bench_serve.py --quick    # concurrency 1 and 4, few requests: a smoke run

Each server setting of ``--max-prefill-tokens`` (default: 0 = no budget, and 32) is a run, with
admission steps as one packed forward (the default) and, with ``--forwards packed two``, as two
forwards (``--no-packed``) in the same run for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from safedecode.bench.load import run_level
from safedecode.bench.machine import (
    BenchError,
    add_model_options,
    describe,
    machine_line,
    require_device,
)
from safedecode.models import DEFAULT_NAME
from safedecode.serve.process import ServerProcess

OUT = Path(__file__).parent / "results"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    for run in runs:
        levels = run["levels"]
        tag = _tag(run["max_prefill_tokens"], run.get("packed", True), run.get("reward_thread"))
        c = [x["concurrency"] for x in levels]
        ax[0].plot(c, [x["tok_s"] for x in levels], "o-", label=tag)
        for a, key in ((ax[1], "ttft"), (ax[2], "itl")):
            a.plot(c, [x[f"{key}_p50_s"] * 1e3 for x in levels], "o-", label=f"p50, {tag}")
            a.plot(c, [x[f"{key}_p99_s"] * 1e3 for x in levels], "s--", label=f"p99, {tag}")
    ax[0].set(title="throughput", xlabel="concurrency", ylabel="tokens/s")
    ax[1].set(title="time to first token", xlabel="concurrency", ylabel="ms")
    ax[2].set(title="inter-token latency", xlabel="concurrency", ylabel="ms")
    c = [x["concurrency"] for x in runs[0]["levels"]]
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_xticks(c, [str(x) for x in c])
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _tag(budget: int | None, packed: bool = True, reward_thread: bool | None = None) -> str:
    tag = f"prefill budget {budget}" if budget else "no prefill budget"
    reward = {None: "", True: ", reward on a thread", False: ", reward inline"}[reward_thread]
    return tag + ("" if packed else ", two forwards") + reward


def _table(run: dict) -> list[str]:
    rows = [f"| {x['concurrency']} | {x['requests']} | {x['errors']} | {x['tok_s']:.1f} | "
            f"{x['ttft_p50_s'] * 1e3:.0f} | {x['ttft_p99_s'] * 1e3:.0f} | "
            f"{x['itl_p50_s'] * 1e3:.0f} | {x['itl_p99_s'] * 1e3:.0f} |" for x in run["levels"]]
    flag = run["max_prefill_tokens"] or 0
    packed = run.get("packed", True)
    reward = run.get("reward_thread")
    flags = (f"--max-prefill-tokens {flag}" + ("" if packed else " --no-packed")
             + {None: "", True: " --reward-thread", False: " --reward-inline"}[reward])
    return [f"## `{flags}` ({_tag(run['max_prefill_tokens'], packed, reward)})", "",
            "| concurrency | requests | errors | tokens/s | TTFT p50 ms | TTFT p99 ms | "
            "ITL p50 ms | ITL p99 ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
            *(f"- {line}" for line in run["targets"]["lines"]), ""]


def markdown(r: dict, command: str, machine: str) -> str:
    body = [line for run in r["runs"] for line in _table(run)]
    return "\n".join([
        f"# `safedecode serve` under load, "
        f"{DEFAULT_NAME if r.get('model', 'default') == 'default' else r['model']} "
        f"({r['device']})", "",
        f"`{command}` ({time.strftime('%Y-%m-%dT%H:%M:%S%z')})", "", machine, "",
        f"Method `{r['method']}` (K = {r['k']}), `--max-seqs {r['max_seqs']}`; each level: "
        f"closed-loop streaming clients, {r['max_tokens']} ± {r['spread']:.0%} tokens per "
        "request (uniform, so the clients fall out of step and prompts are prefilled while "
        "others decode; EOS ignored, temperature 0.7, a seed per request), the server and the "
        "async httpx client on 127.0.0.1 of this machine (they share its cores). TTFT: "
        "request sent to first content chunk; ITL: gap between a stream's consecutive "
        "content chunks (one token each).", "",
        *body, "## Reading it", "", r["reading"], "", f"![load]({Path(r['plot']).name})", ""])


def targets(levels: list[dict]) -> dict:
    by = {x["concurrency"]: x for x in levels}
    lines, ok = [], {}
    if 1 in by and 16 in by:
        thr = by[16]["tok_s"] / by[1]["tok_s"]
        itl = by[16]["itl_p99_s"] / by[1]["itl_p99_s"]
        ok = {"throughput_16_over_1": thr, "itl_p99_16_over_1": itl}
        lines.append(f"throughput at 16 / at 1: **{thr:.2f}x** (target >= 4x: "
                     f"{'met' if thr >= 4 else 'MISSED'})")
        lines.append(f"p99 inter-token latency at 16 / at 1: **{itl:.2f}x** (target <= 4x: "
                     f"{'met' if itl <= 4 else 'MISSED'})")
    return {"lines": lines, **ok}


READING = (
    "A step that admits requests runs the running sequences' decode and the new prompts' "
    "prefill as one packed forward (the default; `--no-packed`: two forwards, as the engine did "
    "before). On this CPU a forward costs a fixed part (reading the weights, module overhead) "
    "plus a share per token, so packing saves the fixed part of every admission step: those "
    "steps get shorter (the inter-token latency tail) and throughput rises where admissions are "
    "frequent (high concurrency). A prefill budget admits about one request per step: "
    "admission steps are short but more frequent; `safedecode serve` uses 32 on a CPU unless "
    "told (no limit on a GPU; runs of both: `serve_budget_s33/`). The configurations run one "
    "after another, "
    "so a drift of the machine's speed during the run shows in absolute tokens/s; the targets' "
    "ratios are measured within one server (one configuration) each.")


def _built(method: str):
    """``--method`` (a name or ``name:key=value...``, as `safedecode serve -m` takes it) built,
    with its registry name."""
    from safedecode.eval.runner import parse_methods

    (spec,) = parse_methods(method)
    return spec.name, spec.build()


def _sequences_per_request(method: str) -> int:
    """Sequences one answer holds at once: a routed one two until its reward chooses, a DeAL
    one its search's; others one."""
    return getattr(_built(method)[1], "sequences_per_request", 1)


def run_config(args, levels: list[int], budget: int, packed: bool = True,
               reward_thread: bool | None = None) -> dict:
    """One server setting's levels; ``reward_thread`` (routed methods): the reward on a
    thread of its own or inline (None: the server's default)."""
    max_seqs = max(levels) * _sequences_per_request(args.method)
    reward = {None: [], True: ["--reward-thread"], False: ["--reward-inline"]}[reward_thread]
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(
            ["--model", args.model, "-m", args.method, "--max-seqs", str(max_seqs),
             "--max-queue", str(4 * max_seqs), "--max-prefill-tokens", str(budget),
             "--packed" if packed else "--no-packed", *reward,
             *(["--max-len", str(args.max_len)] if args.max_len else []),
             "--device", args.device, "--dtype", args.dtype, "--name", "bench"],
            Path(tmp)) as srv:
        model_id = f"bench:{_built(args.method)[0]}"
        asyncio.run(run_level(srv.url, model_id, 1, 2, 4))  # warm-up: first-call costs
        results = []
        for c in levels:
            n = max(4, 2 * c) if not args.quick else max(2, c)
            res = asyncio.run(run_level(srv.url, model_id, c, n, args.max_tokens,
                                        time_limit=600, seed=1000 * c, spread=args.spread))
            results.append(res.summary())
            print(json.dumps({"max_prefill_tokens": budget, "packed": packed,
                              "reward_thread": reward_thread, **results[-1]}),
                  file=sys.stderr, flush=True)
    return {"max_prefill_tokens": budget or None, "packed": packed,
            "reward_thread": reward_thread, "levels": results, "targets": targets(results)}


def _k(method) -> int:
    """Branch rows per sequence (a routed method: its engine method's)."""
    return getattr(method, "engine_method", method).k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    add_model_options(ap)
    ap.add_argument("--method", default="acd-text")
    ap.add_argument("--concurrency", type=int, nargs="*", default=None)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--spread", type=float, default=0.5,
                    help="request lengths uniform in max_tokens * [1 - s, 1 + s]")
    ap.add_argument("--max-prefill-tokens", type=int, nargs="*", default=[0, 32],
                    help="server settings to compare (0: no budget)")
    ap.add_argument("--forwards", nargs="*", choices=["packed", "two"], default=["packed"],
                    help="admission steps as one packed forward and/or as two (--no-packed)")
    ap.add_argument("--reward", nargs="*", choices=["thread", "inline"], default=None,
                    help="route / deal: the reward on a thread of its own (the server's "
                         "default) and/or inline, between two steps")
    ap.add_argument("--max-len", type=int, default=None,
                    help="the server's --max-len (KV per sequence; a search's many sequences)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from safedecode import methods

    searched = isinstance(_built(args.method)[1], (methods.Route, methods.DeAL))
    if args.reward and not searched:
        ap.error("--reward: only for a method with a reward model (route, deal)")
    try:
        require_device(args.device)
    except BenchError as exc:
        ap.error(str(exc))
    levels = args.concurrency or ([1, 4] if args.quick else [1, 4, 16, 32])
    out = args.out or (OUT / "quick" if args.quick else OUT)
    out.mkdir(parents=True, exist_ok=True)
    rewards = [r == "thread" for r in args.reward] if args.reward else [None]
    runs = [run_config(args, levels, b, f == "packed", r) for r in rewards
            for f in args.forwards for b in args.max_prefill_tokens]
    command = shlex.join(["python", "benchmarks/bench_serve.py", *sys.argv[1:]])
    stem = out / f"serve_{args.device}"
    png = stem.with_suffix(".png")
    r = {"benchmark": "serve", "device": args.device, "dtype": args.dtype, "model": args.model,
         "quick": args.quick, "command": command,
         "method": args.method, "k": _k(_built(args.method)[1]),
         "max_seqs": max(levels) * _sequences_per_request(args.method),
         "max_tokens": args.max_tokens, "spread": args.spread, "runs": runs, "reading": READING,
         "machine": describe(args.device), "plot": str(png)}
    plot(runs, png)
    stem.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(r, command, machine_line(r["machine"])))
    print(f"wrote {stem.with_suffix('.md')}")
    for run in runs:
        for line in run["targets"]["lines"]:
            print(f"{_tag(run['max_prefill_tokens'], run['packed'])}: {line}")


if __name__ == "__main__":
    main()
