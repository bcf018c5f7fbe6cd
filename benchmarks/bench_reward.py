"""The ``harmless`` reward model's call, whole sequences vs a shared prefix per prompt.

The calls are shaped as the methods make them: the router scores two beginnings of each
request's answer (``horizon`` tokens); DeAL scores every candidate of every request (k = 4 and
2 proposals: 6), each its committed reply so far plus a chunk-and-lookahead tail. The texts
scored against one prompt share the chat-formatted prompt and the committed reply; with
``share_prefix`` (the default) that prefix runs once per prompt. Prompts from the anchor train
part; replies cut from one answer text to exact token counts (the call's cost is in its
tokens). Median of 5 calls per contender, alternated; the largest score difference between the
two. Writes ``benchmarks/results/reward_cpu.md``.

    python benchmarks/bench_reward.py     # ~3 min on 2 CPU cores
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
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
