"""The ``harmless`` reward model's call, whole sequences vs a shared prefix per prompt.

The calls are shaped as the methods make them: the router scores two beginnings of each
request's answer (``horizon`` tokens); DeAL scores every candidate of every request (k = 4 and
2 proposals: 6), each its committed reply so far plus a chunk-and-lookahead tail. The texts
scored against one prompt share the chat-formatted prompt and the committed reply; with
``share_prefix`` (the default) that prefix runs once per prompt. Prompts from the anchor train
part; replies cut from one answer text to exact token counts (the call's cost is in its
tokens). Median of 5 calls per contender, alternated; the largest score difference between the
two. Then end to end: DeAL over ``acd`` with the knobs of its efficacy report (``harmless``
reward, λ 0.5, k 4, 2 proposals, mix 0.25, chunk 8, lookahead 8, horizon 24) on 8 requests,
64 new tokens, greedy, with and without the shared prefix, beside plain decoding. Writes
``benchmarks/results/reward_cpu.md``.

    python benchmarks/bench_reward.py     # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from safedecode.bench.machine import describe, machine_line
from safedecode.data import load_anchor
from safedecode.methods.harmless import HarmlessReward

OUT = Path(__file__).parent / "results" / "reward_cpu.md"
ANSWER = ("Sure, here is a clear answer. First, gather everything you need and read the whole "
          "plan once before you start, so that nothing surprises you halfway through. Then work "
          "through the steps in order, checking each result before moving on to the next one, "
          "and keep notes of what you changed so that you can undo it if something goes wrong. "
          "Finally, test the result under the conditions you expect it to meet.")


def end_to_end(rm: HarmlessReward, prompts: list[str], tokens: int = 64) -> list[str]:
    """DeAL ∘ acd (the efficacy report's knobs) with and without the shared prefix, and plain
    decoding, on ``prompts`` in one batch: seconds per call (median of 2, after a warm-up)."""
    from safedecode import methods
    from safedecode.engine import SafeDecoder
    from safedecode.models import load_default

    model, tok = load_default()
    spec = methods.get("deal", base="acd", reward=rm, lam=0.5, k=4, propose=2, mix=0.25,
                       chunk=8, lookahead=8, horizon=24)
    deal, plain = SafeDecoder(model, tok, spec), SafeDecoder(model, tok, methods.get("plain"))
    kw = dict(max_new_tokens=tokens, ignore_eos=True)
    runs: dict[str, list[float]] = {"plain": [], "whole": [], "shared": []}
    texts = {}
    for rep in range(3):
        for name, times in runs.items():
            rm.share_prefix = name == "shared"
            t0 = time.perf_counter()
            out = (plain if name == "plain" else deal).generate(prompts, **kw)
            if rep:
                times.append(time.perf_counter() - t0)
            texts[name] = [r.token_ids for r in out]
            print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in runs.items()}
    n = len(prompts) * tokens
    same = sum(a == b for a, b in zip(texts["whole"], texts["shared"], strict=True))
    return ["## End to end: DeAL ∘ `acd` with the `harmless` reward", "",
            f"{len(prompts)} requests (anchor train part) in one batch, {tokens} new tokens "
            "each (EOS ignored), greedy; `deal:base=acd:reward=harmless:lam=0.5:k=4:propose=2:"
            "mix=0.25:chunk=8:lookahead=8:horizon=24`. Median of 2 calls after a warm-up.", "",
            "| contender | s per call | tokens/s | slowdown vs plain |", "|---|---:|---:|---:|",
            *(f"| {name} | {med[name]:.1f} | {n / med[name]:.1f} | "
              f"{med[name] / med['plain']:.2f}x |" for name in ("plain", "whole", "shared")),
            "", "DeAL with the shared prefix / whole sequences: "
            f"**{med['whole'] / med['shared']:.2f}x** faster; the same answers for {same} of "
            f"{len(prompts)} requests (the scores "
            "differ by float rounding, which can tip a near tie).", ""]


def main() -> None:
    rm = HarmlessReward()
    ids = rm.tok(ANSWER, add_special_tokens=False)["input_ids"]

    def reply(start: int, n: int) -> str:
        return rm.tok.decode(ids[start:start + n])

    prompts = [it["prompt"] for it in load_anchor("safe", "train")]
    shapes = []  # (label, prompts, texts)
    for b in (1, 8):
        ps = prompts[:b]
        shapes.append((f"route, B = {b}: 2 beginnings of 16 tokens",
                       [p for p in ps for _ in range(2)],
                       [reply(0, 16), reply(3, 16)] * b))
        for committed in (0, 24):
            shapes.append((f"DeAL, B = {b}: 6 candidates, {committed} committed + 16",
                           [p for p in ps for _ in range(6)],
                           [reply(0, committed) + reply(committed + 2 * c, 16)
                            for _ in ps for c in range(6)]))
    lines = ["# The `harmless` reward's call: whole sequences vs a shared prefix per prompt", "",
             f"`python benchmarks/bench_reward.py` ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine_line(describe('cpu'))}.", "",
             "Reward model: SmolLM2-135M-Instruct + the shipped LoRA and score head (merged), "
             f"batches of {rm.batch_size} rows. Median of 5 calls per contender, alternated.",
             "", "| call | texts | whole ms | shared prefix ms | whole / shared | "
             "max abs score diff |", "|---|---:|---:|---:|---:|---:|"]
    for label, ps, ts in shapes:
        times: dict[bool, list[float]] = {False: [], True: []}
        scores = {}
        for _ in range(6):
            for share in (False, True):
                rm.share_prefix = share
                t0 = time.perf_counter()
                scores[share] = rm(ps, ts)
                times[share].append(time.perf_counter() - t0)
        whole, shared = (statistics.median(times[s][1:]) for s in (False, True))
        diff = max(abs(a - b) for a, b in zip(scores[False], scores[True], strict=True))
        row = (f"| {label} | {len(ts)} | {whole * 1e3:.0f} | {shared * 1e3:.0f} | "
               f"**{whole / shared:.2f}x** | {diff:.1e} |")
        print(row, file=sys.stderr)
        lines.append(row)
    lines += ["", "A DeAL step over B requests scores 6·B texts that differ only in their last "
              "16 tokens: the shared path runs each request's prompt and committed reply once. "
              "The router's two beginnings share only the prompt.", ""]
    lines += end_to_end(rm, prompts[:8])
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
