"""What the per-request extras cost a decode step: ``top_logprobs``, presence / frequency
penalties with a logit bias, the repetition penalty and token bans, each against the same
requests without them, one machine, one run. The embedded model, ``acd-text`` (K = 2), B
requests decoding together, sampled and seeded, EOS ignored. Writes
``benchmarks/results/sampling_extras_cpu.md``.

    python benchmarks/bench_sampling_extras.py [--batch 8] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

from safedecode import methods
from safedecode.bench.machine import describe, machine_line
from safedecode.engine import SafeDecoder
from safedecode.models import load_default

OUT = Path(__file__).parent / "results" / "sampling_extras_cpu.md"
PROMPTS = ["Write a short poem about the sea.", "How do I bake sourdough bread?",
           "Explain how a bicycle gear works.", "Give me three tips for a job interview.",
           "What is the capital of Australia and why?", "Describe a sunset over the desert.",
           "How do I kill a Python process that hangs?", "Summarise the plot of Hamlet."]
# one- and several-token words (the longer ones checked on the host every step)
BAD_WORDS = ("water", "bread", "the sea", "process that", "Hamlet's uncle", "gear ratio")
MODES = {
    "none (logprobs only)": {},
    "top_logprobs=5": {"top_logprobs": 5},
    "presence + frequency + logit_bias": {"presence_penalty": 0.5, "frequency_penalty": 0.5,
                                          "logit_bias": {28: -5.0, 30: 2.0}},
    "repetition_penalty=1.2": {"repetition_penalty": 1.2},
    "min_tokens + bad_words": {"min_tokens": 48, "bad_words": BAD_WORDS},
    "allowed_token_ids (V / 2)": {"allowed_token_ids": tuple(range(0, 49152, 2))},
    "all of them": {"top_logprobs": 5, "presence_penalty": 0.5, "frequency_penalty": 0.5,
                    "logit_bias": {28: -5.0, 30: 2.0}, "repetition_penalty": 1.2,
                    "min_tokens": 48, "bad_words": BAD_WORDS},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, tok = load_default()
    dec = SafeDecoder(model, tok, methods.get("acd-text"))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    runs: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(args.repeats + 1):  # the first round warms up
        for name, extra in MODES.items():  # alternated, so drift hits all alike
            out = dec.generate(prompts, max_new_tokens=args.tokens, ignore_eos=True,
                               temperature=0.7, seed=list(range(args.batch)),
                               return_logprobs=True, **extra)
            if rep:
                runs[name].append(max(r.timing["decode_s"] for r in out))
    med = {m: statistics.median(v) for m, v in runs.items()}
    base = next(iter(MODES))
    tps = {m: args.batch * args.tokens / d for m, d in med.items()}
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        "# Per-request sampling extras: cost per decode step (cpu)", "",
        f"`{cmd}`", "", machine_line(describe("cpu")), "",
        f"The embedded model (SmolLM2-135M-Instruct, V = {model.config.vocab_size}), "
        f"`acd-text` (K = 2), B = {args.batch} requests decoding together, T = 0.7 seeded, "
        f"{args.tokens} new tokens each (EOS ignored), every request with `logprobs`; median "
        f"of {args.repeats} alternated calls after a warm-up round. Decode = the longest "
        "request's decode phase (`timing['decode_s']`). Each extra is asked by every request "
        "(a step where no request asks for one runs as before: the first row).", "",
        "| extras | decode tokens/s | decode s | vs none |", "|---|---:|---:|---:|"]
    for m in MODES:
        lines.append(f"| {m} | {tps[m]:.1f} | {med[m]:.2f} | {tps[m] / tps[base]:.2f}x |")
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
