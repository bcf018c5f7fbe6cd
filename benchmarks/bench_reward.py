"""The ``harmless`` reward model's call: whole sequences, a shared prefix per prompt, and that
prefix stored from the previous call.

The calls are shaped as the methods make them: the router scores two beginnings of each
request's answer (``horizon`` tokens); DeAL scores every candidate of every request (k = 4 and
2 proposals: 6), each its committed reply so far plus a chunk-and-lookahead tail. The texts
scored against one prompt share the chat-formatted prompt and the committed reply; with
``share_prefix`` (the default) that prefix runs once per prompt, and with the prefix store (the
default) only what the previous call's prefix of that prompt did not cover: a DeAL step after
one that committed 8 tokens runs those 8. Prompts from the anchor train part; replies cut from
one answer text to exact token counts (the call's cost is in its tokens). Median of 5 calls
per contender, alternated; the largest score difference from whole-sequence scoring. Then end
to end: DeAL over ``acd`` with the knobs of its efficacy report (``harmless`` reward, λ 0.5,
k 4, 2 proposals, mix 0.25, chunk 8, lookahead 8, horizon 24) on 8 requests, 64 new tokens,
greedy, with whole sequences, the shared prefix, and the stored prefix, beside plain decoding.
Writes ``benchmarks/results/reward_cpu.md``.

    python benchmarks/bench_reward.py     # ~7 min on 2 CPU cores
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from safedecode.bench.machine import describe, machine_line
from safedecode.data import load_anchor
from safedecode.methods.harmless import HarmlessReward, PrefixStore

OUT = Path(__file__).parent / "results" / "reward_cpu.md"
CONTENDERS = ("whole", "shared", "stored")
ANSWER = ("Sure, here is a clear answer. First, gather everything you need and read the whole "
          "plan once before you start, so that nothing surprises you halfway through. Then work "
          "through the steps in order, checking each result before moving on to the next one, "
          "and keep notes of what you changed so that you can undo it if something goes wrong. "
          "Finally, test the result under the conditions you expect it to meet.")


def use(rm: HarmlessReward, contender: str) -> None:
    """Set ``rm`` up as ``contender`` scores: whole sequences, a prefix shared within the call,
    or that prefix also stored across calls (an empty store)."""
    rm.share_prefix = contender != "whole"
    rm.prefixes = PrefixStore(32 if contender == "stored" else 0)


def end_to_end(rm: HarmlessReward, prompts: list[str], tokens: int = 64) -> list[str]:
    """DeAL ∘ acd (the efficacy report's knobs) for every contender, and plain decoding, on
    ``prompts`` in one batch: seconds per call (median of 2, after a warm-up)."""
    from safedecode import methods
    from safedecode.engine import SafeDecoder
    from safedecode.models import load_default

    model, tok = load_default()
    spec = methods.get("deal", base="acd", reward=rm, lam=0.5, k=4, propose=2, mix=0.25,
                       chunk=8, lookahead=8, horizon=24)
    deal, plain = SafeDecoder(model, tok, spec), SafeDecoder(model, tok, methods.get("plain"))
    kw = dict(max_new_tokens=tokens, ignore_eos=True)
    runs: dict[str, list[float]] = {name: [] for name in ("plain", *CONTENDERS)}
    texts = {}
    for rep in range(3):
        for name, times in runs.items():
            use(rm, "whole" if name == "plain" else name)
            t0 = time.perf_counter()
            out = (plain if name == "plain" else deal).generate(prompts, **kw)
            if rep:
                times.append(time.perf_counter() - t0)
            texts[name] = [r.token_ids for r in out]
            print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in runs.items()}
    n = len(prompts) * tokens
    same = {c: sum(a == b for a, b in zip(texts["whole"], texts[c], strict=True))
            for c in CONTENDERS[1:]}
    return ["## End to end: DeAL ∘ `acd` with the `harmless` reward", "",
            f"{len(prompts)} requests (anchor train part) in one batch, {tokens} new tokens "
            "each (EOS ignored), greedy; `deal:base=acd:reward=harmless:lam=0.5:k=4:propose=2:"
            "mix=0.25:chunk=8:lookahead=8:horizon=24`. Median of 2 calls after a warm-up.", "",
            "| contender | s per call | tokens/s | slowdown vs plain |", "|---|---:|---:|---:|",
            *(f"| {name} | {med[name]:.1f} | {n / med[name]:.1f} | "
              f"{med[name] / med['plain']:.2f}x |" for name in runs),
            "", "Against whole sequences, DeAL with the shared prefix: "
            f"**{med['whole'] / med['shared']:.2f}x** faster, the same answers for "
            f"{same['shared']} of {len(prompts)} requests; with the stored prefix: "
            f"**{med['whole'] / med['stored']:.2f}x** ({med['shared'] / med['stored']:.2f}x the "
            f"shared prefix alone), the same answers for {same['stored']} of {len(prompts)} (the "
            "scores differ by float rounding, which can tip a near tie).", ""]


def main() -> None:
    rm = HarmlessReward()
    ids = rm.tok(ANSWER, add_special_tokens=False)["input_ids"]

    def reply(start: int, n: int) -> str:
        return rm.tok.decode(ids[start:start + n])

    prompts = [it["prompt"] for it in load_anchor("safe", "train")]
    def step(ps: list[str], committed: int) -> list[str]:
        return [reply(0, committed) + reply(committed + 2 * c, 16) for _ in ps for c in range(6)]

    shapes = []  # (label, prompts, texts, the previous step's texts or None)
    for b in (1, 8):
        ps = prompts[:b]
        shapes.append((f"route, B = {b}: 2 beginnings of 16 tokens",
                       [p for p in ps for _ in range(2)],
                       [reply(0, 16), reply(3, 16)] * b, None))
        for committed in (0, 24):
            shapes.append((f"DeAL, B = {b}: 6 candidates, {committed} committed + 16",
                           [p for p in ps for _ in range(6)], step(ps, committed),
                           step(ps, committed - 8) if committed else None))
    lines = ["# The `harmless` reward's call: whole sequences, a shared prefix, a stored prefix",
             "", f"`python benchmarks/bench_reward.py` ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine_line(describe('cpu'))}.", "",
             "Reward model: SmolLM2-135M-Instruct + the shipped LoRA and score head (merged), "
             f"batches of {rm.batch_size} rows. Median of 5 calls per contender, alternated. "
             "*Stored*: the previous step's prefix of each prompt (its committed reply 8 tokens "
             "shorter) is in the store when the call starts.",
             "", "| call | texts | whole ms | shared prefix ms | stored prefix ms | whole / "
             "shared | shared / stored | max abs score diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, ps, ts, before in shapes:
        times: dict[str, list[float]] = {c: [] for c in CONTENDERS}
        scores = {}
        for _ in range(6):
            for contender in CONTENDERS:
                use(rm, contender)
                if contender == "stored" and before:
                    rm(ps, before)  # the previous search step, untimed
                t0 = time.perf_counter()
                scores[contender] = rm(ps, ts)
                times[contender].append(time.perf_counter() - t0)
        ms = {c: statistics.median(times[c][1:]) * 1e3 for c in CONTENDERS}
        diff = max(abs(a - b) for c in CONTENDERS[1:]
                   for a, b in zip(scores["whole"], scores[c], strict=True))
        stored = f"{ms['stored']:.0f}" if before else "—"
        ratio = f"**{ms['shared'] / ms['stored']:.2f}x**" if before else "—"
        row = (f"| {label} | {len(ts)} | {ms['whole']:.0f} | {ms['shared']:.0f} | {stored} | "
               f"**{ms['whole'] / ms['shared']:.2f}x** | {ratio} | {diff:.1e} |")
        print(row, file=sys.stderr)
        lines.append(row)
    lines += ["", "A DeAL step over B requests scores 6·B texts that differ only in their last "
              "16 tokens: the shared path runs each request's prompt and committed reply once, "
              "the stored path only the reply committed since the previous step. The router's "
              "two beginnings share only the prompt (one call per request: nothing to store).",
              ""]
    lines += end_to_end(rm, prompts[:8])
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
