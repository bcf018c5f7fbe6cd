"""What sharing a conversation's history as a prefix buys: B requests that end a common few-shot
chat with their own question (the history's KV computed once, from the second request on)
against the same engine with history sharing off, B requests with histories of their own
(nothing to share: the cost of looking), and B chats that grow turn by turn (each turn's history
extends the turn before's kept prompt + answer: only the new question is computed). One
machine, one run, alternated calls. The embedded model, ``acd-text`` (K = 2), greedy. Writes
``benchmarks/results/prefix_history_cpu.md``.

    python benchmarks/bench_prefix_history.py [--batch 8] [--shots 10] [--tokens 16] [--turns 5]
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
from safedecode.engine import SafeDecoder
from safedecode.models import load_default

OUT = Path(__file__).parent / "results" / "prefix_history_cpu.md"
SHOTS = [("What is the capital of France?", "Paris is the capital of France."),
         ("How many legs does a spider have?", "A spider has eight legs."),
         ("What gas do plants take in?", "Plants take in carbon dioxide from the air."),
         ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
         ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea "
                                                 "level."),
         ("How many continents are there?", "There are seven continents."),
         ("What is the largest planet?", "Jupiter is the largest planet in the solar system."),
         ("What do bees make?", "Bees make honey and beeswax."),
         ("What is the square root of 81?", "The square root of 81 is 9."),
         ("Which ocean is the largest?", "The Pacific Ocean is the largest ocean."),
         ("What language is spoken in Brazil?", "Portuguese is spoken in Brazil."),
         ("How many days are in a leap year?", "A leap year has 366 days.")]
QUESTIONS = ["What is the capital of Japan?", "How many legs does an ant have?",
             "Who painted the Mona Lisa?", "What is the freezing point of water?",
             "What is the smallest prime number?", "Which planet is called the red planet?",
             "What do cows drink?", "How many hours are in a day?"]


def _history(shots: int, offset: int = 0) -> list[dict]:
    msgs = []
    for i in range(shots):
        q, a = SHOTS[(i + offset) % len(SHOTS)]
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--turns", type=int, default=5, help="turns of the growing chats")
    args = ap.parse_args()
    model, tok = load_default()
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.batch)]
    shared = [_history(args.shots) + [{"role": "user", "content": q}] for q in qs]
    # each request a history of its own (the shots rotated) and a call-specific first turn,
    # so no history is ever seen twice
    cases = {"shared history": lambda r: shared,
             "own histories": lambda r: [
                 [{"role": "user", "content": f"Call {r}, request {i}: hello."},
                  {"role": "assistant", "content": "Hello!"}] + _history(args.shots, i)[2:]
                 + [{"role": "user", "content": q}] for i, q in enumerate(qs)]}
    runs: dict[tuple[str, bool], list[float]] = {(c, on): [] for c in cases for on in (0, 1)}
    ttft: dict[tuple[str, bool], list[float]] = {k: [] for k in runs}
    answers = {}
    for rep in range(args.repeats + 1):  # the first round warms up
        for case, prompts in cases.items():
            for on in (False, True):
                dec = SafeDecoder(model, tok, methods.get("acd-text"))  # a fresh store
                dec.builder.share_history = on
                batch = prompts(rep)
                t = time.perf_counter()
                out = dec.generate(batch, max_new_tokens=args.tokens)
                wall = time.perf_counter() - t
                if rep:
                    runs[case, on].append(wall)
                    ttft[case, on].append(max(r.timing["prefill_s"] for r in out))
                answers.setdefault((case, rep), []).append([r.token_ids for r in out])
    for key, got in answers.items():  # the same answers either way
        assert got[0] == got[1], key
    n_hist = len(tok(tok.apply_chat_template(_history(args.shots), tokenize=False),
                     add_special_tokens=False)["input_ids"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    first = {k: statistics.median(v) for k, v in ttft.items()}
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        "# A conversation's history shared as a prefix (cpu)", "",
        f"`{cmd}`", "", machine_line(describe("cpu")), "",
        f"The embedded model (SmolLM2-135M-Instruct), `acd-text` (K = 2), greedy, B = "
        f"{args.batch} requests in one `generate` call, {args.tokens} new tokens each; a "
        f"{args.shots}-shot chat history ({n_hist} tokens) before each request's question. "
        "*Shared history*: every request ends the same history with its own question (a "
        "few-shot prompt); *own histories*: no two requests share one (nothing to reuse: the "
        "cost of looking). Each call on a fresh decoder (empty prefix store), with "
        "`PromptBuilder.share_history` off and on; median of "
        f"{args.repeats} alternated rounds after a warm-up; the same tokens either way "
        "(checked). First token = the slowest request's time to its first token.", "",
        "| requests | history sharing | call s | first token s | call vs off |",
        "|---|---|---:|---:|---:|"]
    for case in cases:
        for on in (False, True):
            lines.append(f"| {case} | {'on' if on else 'off'} | {med[case, on]:.2f} | "
                         f"{first[case, on]:.2f} | {med[case, False] / med[case, on]:.2f}x |")
    lines += growing_chats(model, tok, args)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def growing_chats(model, tok, args) -> list[str]:
    """B chats over ``args.turns`` turns, each turn one ``generate`` call on one decoder (its
    store kept): each request = the chat so far + its answer + a new question. Per turn, the
    call and first-token time with history sharing off and on (median of the rounds)."""
    def chats(r: int) -> list[list[dict]]:  # each its own history: a call-specific first turn
        return [[{"role": "user", "content": f"Round {r}, chat {i}: hello."},
                 {"role": "assistant", "content": "Hello!"}] + _history(args.shots, i)[2:]
                + [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
                for i in range(args.batch)]

    wall: dict[tuple[int, bool], list[float]] = {}
    first: dict[tuple[int, bool], list[float]] = {}
    tokens: dict[int, int] = {}
    for rep in range(args.repeats + 1):  # the first round warms up
        answers = {}
        for on in (False, True):
            dec = SafeDecoder(model, tok, methods.get("acd-text"))
            dec.builder.share_history = on
            batch = chats(rep)
            for turn in range(args.turns):
                t = time.perf_counter()
                out = dec.generate(batch, max_new_tokens=args.tokens)
                if rep:
                    wall.setdefault((turn, on), []).append(time.perf_counter() - t)
                    first.setdefault((turn, on), []).append(
                        max(r.timing["prefill_s"] for r in out))
                tokens[turn] = max(len(tok(tok.apply_chat_template(c, tokenize=False),
                                           add_special_tokens=False)["input_ids"])
                                   for c in batch)
                answers.setdefault(turn, []).append([r.token_ids for r in out])
                for i, (c, r) in enumerate(zip(batch, out, strict=True)):
                    c += [{"role": "assistant", "content": r.text},
                          {"role": "user", "content": QUESTIONS[(i + turn + 1) % len(QUESTIONS)]}]
        for turn, got in answers.items():  # the same answers either way
            assert got[0] == got[1], (rep, turn)
    med = {k: statistics.median(v) for k, v in wall.items()}
    fst = {k: statistics.median(v) for k, v in first.items()}
    lines = [
        "", "## Growing chats", "",
        f"{args.batch} chats in one `generate` call per turn, on one decoder over "
        f"{args.turns} turns; each chat starts with its own {args.shots}-shot history and each "
        f"turn's request is the chat so far, its last answer ({args.tokens} tokens) and a new "
        "question. With sharing on, each finished request's prompt and answer KV is kept "
        "(`turn_store_bytes`, 512 MiB) and from the second turn each chat's history extends "
        "it: only the last answer token and the turn's end are computed as prefix, then the "
        "new question as the request's own part. Median of "
        f"{args.repeats} rounds after a warm-up; the same tokens either way (checked).", "",
        "| turn | longest prompt (tokens) | call s off | call s on | first token s off | "
        "first token s on | call off / on |",
        "|---:|---:|---:|---:|---:|---:|---:|"]
    for turn in range(args.turns):
        lines.append(f"| {turn + 1} | {tokens[turn]} | {med[turn, False]:.2f} | "
                     f"{med[turn, True]:.2f} | {fst[turn, False]:.2f} | {fst[turn, True]:.2f} | "
                     f"{med[turn, False] / med[turn, True]:.2f}x |")
    return lines


if __name__ == "__main__":
    main()
