"""Scoring texts beside a decoding stream under a server's prefill budget: each scored answer
fed in its prompt's chunks (scored from their logits) against one engine step per answer token
(``forced_prefill_tokens = 0``, as before). The embedded model, an engine with
``max_prefill_tokens`` = 32 (``safedecode serve``'s default on a CPU), one request generating
throughout while ``--texts`` rolling-log-likelihood-style requests (BOS, then a text of ~276
tokens to score) are queued; wall time until every scored request is done, the same log-probs
checked. Median of alternated runs. Then one answer longer than ``forced_prefill_tokens``
(``--long`` tokens) alone: fed in chunks over steps vs decoded. Writes
``benchmarks/results/scored_budget_cpu.md``.

    python benchmarks/bench_scored_budget.py [--texts 4] [--repeats 3] [--long 1500]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

from bench_lm_eval import _texts

from safedecode import methods
from safedecode.bench.machine import describe, git_commit, machine_line
from safedecode.engine import SafeDecoder, SamplingParams
from safedecode.models import load_default

OUT = Path(__file__).parent / "results" / "scored_budget_cpu.md"
BUDGET = 32


def _score(dec: SafeDecoder, texts: list[list[int]], forced: int, bos: int
           ) -> tuple[float, int, list[list[float]]]:
    """(seconds until every text is scored, engine steps, log-probs per text)."""
    eng = dec.engine(max_seqs=len(texts) + 1, max_prefill_tokens=BUDGET)
    eng.forced_prefill_tokens = forced
    eng.add_request("Tell me a long story about a fox.",
                    SamplingParams(max_new_tokens=1500, temperature=0, ignore_eos=True))
    eng.step()  # it decodes from here on; the scored requests arrive beside it
    t0 = time.perf_counter()
    ids = [eng.add_scored([bos], t, SamplingParams(logprobs=True), raw=True) for t in texts]
    left, steps, out = set(ids), 0, {}
    while left:
        for o in eng.step():
            if o.finish_reason and o.request_id in left:
                left.discard(o.request_id)
                out[o.request_id] = eng.pop_result(o.request_id).logprobs
        steps += 1
    return time.perf_counter() - t0, steps, [out[i] for i in ids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long", type=int, default=1500, help="tokens of the long answer")
    args = ap.parse_args()
    model, tok = load_default()
    texts = [tok(t["text"], add_special_tokens=False)["input_ids"]
             for t in _texts(args.texts)]
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    rows = []
    for name in ("plain", "acd-text"):
        dec = SafeDecoder(model, tok, methods.get(name))
        runs = {"fed": [], "decoded": []}
        got = {}
        for _ in range(args.repeats):
            for mode, forced in (("fed", 1024), ("decoded", 0)):
                dt, steps, lps = _score(dec, texts, forced, bos)
                runs[mode].append(dt)
                got[mode] = (steps, lps)
                print(f"{name} {mode}: {dt:.1f} s, {steps} steps", flush=True)
        diff = max(abs(a - b) for x, y in zip(got["fed"][1], got["decoded"][1], strict=True)
                   for a, b in zip(x, y, strict=True))
        fed, dec_s = statistics.median(runs["fed"]), statistics.median(runs["decoded"])
        rows.append(f"| `{name}` | {fed:.1f} ({got['fed'][0]} steps) | {dec_s:.1f} "
                    f"({got['decoded'][0]} steps) | **{dec_s / fed:.2f}×** | {diff:.1e} |")
    n_tok = sum(len(t) for t in texts)
    # one long answer alone, no budget: fed in chunks of forced_prefill_tokens vs decoded
    long_ids = [t for d in _texts(-(-args.long // 200))
                for t in tok(d["text"], add_special_tokens=False)["input_ids"]][:args.long]
    dec = SafeDecoder(model, tok, methods.get("plain"))
    long_s, long_lp = {}, {}
    for forced in (1024, 0):
        eng = dec.engine(max_seqs=1)
        eng.forced_prefill_tokens = forced
        t0 = time.perf_counter()
        rid = eng.add_scored([bos], long_ids, SamplingParams(logprobs=True), raw=True)
        steps = 0
        while eng.has_unfinished():
            eng.step()
            steps += 1
        long_s[forced] = (time.perf_counter() - t0, steps)
        long_lp[forced] = sum(eng.pop_result(rid).logprobs)
        print(f"long answer, forced_prefill_tokens={forced}: {long_s[forced][0]:.1f} s, "
              f"{steps} steps", flush=True)
    OUT.write_text(f"""# Scored answers under a prefill budget, beside a decoding stream

`python {shlex.join(['benchmarks/bench_scored_budget.py', *sys.argv[1:]])}`

{machine_line(describe("cpu"))}, commit {git_commit()}

An engine with `max_prefill_tokens={BUDGET}` (`safedecode serve`'s default on a CPU), one
request generating throughout (greedy, EOS ignored); {args.texts} scored requests queued beside
it, each BOS then a text of ~{n_tok // args.texts} tokens ({n_tok} in all: lm-eval's rolling
log-likelihood, or a served `echo`). Seconds until every scored request is done, median of
{args.repeats} alternated runs. *Fed*: each answer rides in its prompt's chunks, its positions
scored from their logits; *decoded*: one engine step per answer token
(`forced_prefill_tokens = 0`).

| method | fed: s | decoded: s | speed-up | largest log-prob difference |
|---|---:|---:|---:|---:|
""" + "\n".join(rows) + f"""

## One answer longer than `forced_prefill_tokens`

`plain`, no budget, nothing else running: BOS then {len(long_ids)} tokens to score (an lm-eval
rolling window), fed in chunks of at most 1024 answer positions per step: {long_s[1024][0]:.1f} s
({long_s[1024][1]} steps); decoded one token per step: {long_s[0][0]:.1f} s ({long_s[0][1]}
steps), **{long_s[0][0] / long_s[1024][0]:.1f}×**; summed log-probs {long_lp[1024]:.3f} vs
{long_lp[0]:.3f}. One run each.
""")
    print(OUT.read_text())


if __name__ == "__main__":
    main()
