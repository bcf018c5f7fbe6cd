"""What computing a new prefix within ``max_prefill_tokens`` buys the streams already decoding:
one request decodes while two requests arrive that share a long document (its KV not stored yet:
they share it from the first, so it is a prefix). With the prefix computed in budget-sized
chunks (``ModelStep.advance_prefix``) against the same engine computing it whole in the step the
requests are admitted (the behaviour before): the decoding stream's step times while they are
admitted, and when the new requests' first tokens come. The embedded model, ``acd-text``
(K = 2), greedy; one machine, one run, alternated. Writes
``benchmarks/results/prefix_chunks_cpu.md``.

    python benchmarks/bench_prefix_chunks.py [--budget 64] [--doc-tokens 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

from safedecode import methods
from safedecode.bench.machine import describe, machine_line
from safedecode.engine import SafeDecoder, SamplingParams
from safedecode.models import load_default

OUT = Path(__file__).parent / "results" / "prefix_chunks_cpu.md"
SENTENCES = ["The river rises in the hills and runs east through three towns.",
             "Each town keeps a mill, a market and a bridge over the water.",
             "In spring the snow melts and the mills run day and night.",
             "Traders bring wool down the valley and carry salt back up.",
             "The oldest bridge was built of oak and rebuilt in stone later."]


def _document(tok, n: int) -> str:
    text, i = "", 0
    while len(tok(text)["input_ids"]) < n:
        text += SENTENCES[i % len(SENTENCES)] + " "
        i += 1
    return text


def run(dec: SafeDecoder, doc: str, budget: int, chunked: bool, stream_tokens: int) -> dict:
    """One decoding stream; after 4 of its steps, two requests sharing ``doc`` arrive."""
    eng = dec.engine(max_seqs=4, max_prefill_tokens=budget)
    if not chunked:  # the behaviour before: a missing prefix is computed whole when fed
        eng.runner.prefix_missing = lambda built: []
    stream = eng.add_request("Tell me a long story about a river.",
                             SamplingParams(max_new_tokens=stream_tokens, ignore_eos=True))
    steps, first, arrived = [], {}, None
    for i in range(stream_tokens + 100):
        if i == 4:
            built = eng.build_many([doc + "Question: which town is first?\nAnswer:",
                                    doc + "Question: what do traders bring?\nAnswer:"],
                                   raw=True)
            ids = [eng.add_built(b, SamplingParams(max_new_tokens=8))[0] for b in built]
            arrived = time.perf_counter()
        t = time.perf_counter()
        outs = eng.step()
        now = time.perf_counter()
        if arrived is not None and any(o.request_id == stream for o in outs):
            steps.append(now - t)
        for o in outs:
            if arrived is not None and o.request_id in ids and o.request_id not in first:
                first[o.request_id] = now - arrived
        if not eng.has_unfinished():
            break
    assert len(first) == 2, "the new requests did not start"
    return {"max": max(steps), "median": statistics.median(steps),
            "p95": sorted(steps)[int(0.95 * (len(steps) - 1))], "first": max(first.values()),
            "computed": dec.prefixes.computed_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=int, default=64, help="max_prefill_tokens")
    ap.add_argument("--doc-tokens", type=int, default=1000)
    ap.add_argument("--stream-tokens", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, tok = load_default()
    doc = _document(tok, args.doc_tokens)
    got: dict[bool, list[dict]] = {True: [], False: []}
    for rep in range(args.repeats + 1):  # the first round warms up
        for chunked in (False, True):
            dec = SafeDecoder(model, tok, methods.get("acd-text"))  # an empty prefix store
            r = run(dec, doc, args.budget, chunked, args.stream_tokens)
            if rep:
                got[chunked].append(r)
    med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in got.items()}
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    n_doc = len(tok(doc)["input_ids"])
    lines = [
        "# A new prefix computed within the prefill budget (cpu)", "",
        f"`{cmd}`", "", machine_line(describe("cpu")), "",
        f"The embedded model (SmolLM2-135M-Instruct), `acd-text` (K = 2), greedy, "
        f"`max_prefill_tokens={args.budget}`. One request decodes {args.stream_tokens} tokens; "
        f"after its fourth step two raw requests arrive that continue the same {n_doc}-token "
        "document with their own question (built together: the document's whole blocks are "
        "a prefix from the first; not stored yet, so it must be computed). *Whole*: the "
        "prefix computed in the step the requests are fed (the behaviour before); "
        "*chunked*: at most the budget of its columns per step on top of what is computed so "
        "far (`ModelStep.advance_prefix`). Step times = the decoding stream's steps from the "
        "requests' arrival to its end; first token = the later of the two new requests' "
        f"first tokens after their arrival. Median of {args.repeats} alternated rounds after "
        "a warm-up.", "",
        "| prefix | stream step max s | p95 s | median s | new requests' first token s | "
        "prefix columns computed |",
        "|---|---:|---:|---:|---:|---:|"]
    for chunked in (False, True):
        m = med[chunked]
        lines.append(f"| {'chunked' if chunked else 'whole'} | {m['max']:.3f} | {m['p95']:.3f} "
                     f"| {m['median']:.3f} | {m['first']:.2f} | {m['computed']:.0f} |")
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
