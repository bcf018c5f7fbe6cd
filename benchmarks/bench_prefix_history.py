"""What sharing what requests have in common as a prefix buys: B requests that end a common
few-shot chat with their own question (the history's KV computed once, from the first request
on), B raw completions that continue a common few-shot text (its leading tokens' KV computed
once), the same few-shot text scored against several continuations per question (lm-eval's
multiple choice), each against the same engine with sharing off; B requests with histories of
their own (nothing to share: the cost of looking); and B chats that grow turn by turn (each
turn's history extends the turn before's kept prompt + answer: only the new question is
computed; leading tokens alone beside it). One machine, one run, alternated calls. The embedded
model, ``acd-text`` (K = 2), greedy. Writes ``benchmarks/results/prefix_history_cpu.md``.

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
from safedecode.engine.decoder import TokenPrompts
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


CHOICES = [" Yes.", " No.", " I am not sure.", " It depends."]
MODES = {"off": (False, False), "leading tokens": (False, True), "on": (True, True)}


def _decoder(model, tok, mode: str) -> SafeDecoder:
    """A fresh decoder (an empty prefix store) with sharing ``mode`` (``MODES``)."""
    dec = SafeDecoder(model, tok, methods.get("acd-text"))
    dec.builder.share_history, dec.builder.share_tokens = MODES[mode]
    return dec


def _fewshot_text(shots: int) -> str:
    return "".join(f"Q: {q}\nA: {a}\n\n" for q, a in (SHOTS[i % len(SHOTS)]
                                                    for i in range(shots)))


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
    text = _fewshot_text(args.shots)
    # each branch's prompt rendered by the caller, as transformers' generate hands them to
    # custom_generate (TokenPrompts): no branch prefix split off, leading tokens shared
    render = _decoder(model, tok, "off").builder
    m = methods.get("acd-text")
    rendered = TokenPrompts([[p.ids + s for p, s in (render.build(br, q, 0) for q in shared)]
                             for br in m.branches])
    cases = {"shared chat history": lambda r: shared,
             "few-shot completions (raw)": lambda r: [text + f"Q: {q}\nA:" for q in qs],
             "few-shot completions (raw), one per call": lambda r: [
                 text + f"Q: {q}\nA:" for q in qs],
             "rendered prompts (custom_generate)": lambda r: rendered,
             "own histories": lambda r: [
                 [{"role": "user", "content": f"Call {r}, request {i}: hello."},
                  {"role": "assistant", "content": "Hello!"}] + _history(args.shots, i)[2:]
                 + [{"role": "user", "content": q}] for i, q in enumerate(qs)]}
    runs: dict[tuple[str, bool], list[float]] = {(c, on): [] for c in cases for on in (0, 1)}
    ttft: dict[tuple[str, bool], list[float]] = {k: [] for k in runs}
    scored = f"scoring {len(CHOICES)} continuations (raw)"
    runs.update({(scored, on): [] for on in (0, 1)})
    answers = {}
    for rep in range(args.repeats + 1):  # the first round warms up
        for case, prompts in cases.items():
            for on in (False, True):
                dec = _decoder(model, tok, "on" if on else "off")
                batch = prompts(rep)
                if isinstance(batch, TokenPrompts):  # shared unless the prefix cache is off
                    dec = SafeDecoder(model, None, m, prefix_cache=on)
                t = time.perf_counter()
                if "one per call" in case:  # as a server gets them: one after another
                    out = [dec.generate([p], max_new_tokens=args.tokens, raw=True)[0]
                           for p in batch]
                else:
                    out = dec.generate(batch, max_new_tokens=args.tokens, raw="raw" in case)
                wall = time.perf_counter() - t
                if rep:
                    runs[case, on].append(wall)
                    ttft[case, on].append(max(r.timing["prefill_s"] for r in out))
                answers.setdefault((case, rep), []).append([r.token_ids for r in out])
        for on in (False, True):  # every question against each of CHOICES
            dec = _decoder(model, tok, "on" if on else "off")
            t = time.perf_counter()
            out = dec.score([text + f"Q: {q}\nA:" for q in qs for _ in CHOICES],
                            CHOICES * len(qs), raw=True)
            if rep:
                runs[scored, on].append(time.perf_counter() - t)
            answers.setdefault((scored, rep), []).append([r.logprobs for r in out])
    for key, got in answers.items():  # the same answers either way
        if key[0] == scored:
            assert all(abs(a - b) < 1e-3 for x, y in zip(*got, strict=True)
                       for a, b in zip(x, y, strict=True)), key
        else:
            assert got[0] == got[1], key
    n_hist = len(tok(tok.apply_chat_template(_history(args.shots), tokenize=False),
                     add_special_tokens=False)["input_ids"])
    n_text = len(tok(text)["input_ids"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    first = {k: statistics.median(v) for k, v in ttft.items()}
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        "# What requests share, shared as a prefix: chat histories and leading tokens (cpu)",
        "",
        f"`{cmd}`", "", machine_line(describe("cpu")), "",
        f"The embedded model (SmolLM2-135M-Instruct), `acd-text` (K = 2), greedy, B = "
        f"{args.batch} requests in one `generate` call, {args.tokens} new tokens each. "
        f"*Shared chat history*: every request ends the same {args.shots}-shot chat history "
        f"({n_hist} tokens) with its own question; *few-shot completions*: every request "
        f"continues the same {args.shots}-shot text ({n_text} tokens) after its own question "
        "(a raw prompt: shared by its leading tokens), in one call or *one per call* (as a "
        "server gets them: the first request's prompt and answer KV is kept when it finishes, "
        "and the next one's common start is cut from it); *rendered prompts*: the shared-history "
        "requests rendered per branch by the caller, as `model.generate(custom_generate=...)` "
        "hands them over (`TokenPrompts`: no branch prefix split off; leading tokens shared, "
        "off = `prefix_cache=False`); *scoring*: each of the completions' prompts "
        f"scored against {len(CHOICES)} continuations (`SafeDecoder.score`, "
        f"{args.batch * len(CHOICES)} requests; log-probs only); *own histories*: no two "
        "requests share a history or a start (nothing to reuse: the cost of looking). Each "
        "call on a fresh decoder (empty prefix store), with `PromptBuilder.share_history` and "
        "`share_tokens` both off and both on; median of "
        f"{args.repeats} alternated rounds after a warm-up; the same tokens (log-probs) either "
        "way (checked). First token = the slowest request's time to its first token.", "",
        "| requests | sharing | call s | first token s | call vs off |",
        "|---|---|---:|---:|---:|"]
    for case in [*cases, scored]:
        for on in (False, True):
            fst = f"{first[case, on]:.2f}" if (case, on) in first else "–"
            lines.append(f"| {case} | {'on' if on else 'off'} | {med[case, on]:.2f} | "
                         f"{fst} | {med[case, False] / med[case, on]:.2f}x |")
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

    wall: dict[tuple[int, str], list[float]] = {}
    first: dict[tuple[int, str], list[float]] = {}
    tokens: dict[int, int] = {}
    for rep in range(args.repeats + 1):  # the first round warms up
        answers = {}
        for mode in MODES:
            dec = _decoder(model, tok, mode)
            batch = chats(rep)
            for turn in range(args.turns):
                t = time.perf_counter()
                out = dec.generate(batch, max_new_tokens=args.tokens)
                if rep:
                    wall.setdefault((turn, mode), []).append(time.perf_counter() - t)
                    first.setdefault((turn, mode), []).append(
                        max(r.timing["prefill_s"] for r in out))
                tokens[turn] = max(len(tok(tok.apply_chat_template(c, tokenize=False),
                                           add_special_tokens=False)["input_ids"])
                                   for c in batch)
                answers.setdefault(turn, []).append([r.token_ids for r in out])
                for i, (c, r) in enumerate(zip(batch, out, strict=True)):
                    c += [{"role": "assistant", "content": r.text},
                          {"role": "user", "content": QUESTIONS[(i + turn + 1) % len(QUESTIONS)]}]
        for turn, got in answers.items():  # the same answers every way
            assert all(g == got[0] for g in got), (rep, turn)
    med = {k: statistics.median(v) for k, v in wall.items()}
    fst = {k: statistics.median(v) for k, v in first.items()}
    lines = [
        "", "## Growing chats", "",
        f"{args.batch} chats in one `generate` call per turn, on one decoder over "
        f"{args.turns} turns; each chat starts with its own {args.shots}-shot history and each "
        f"turn's request is the chat so far, its last answer ({args.tokens} tokens) and a new "
        "question. Each finished request's prompt and answer KV is kept "
        "(`turn_store_bytes`, 512 MiB) and from the second turn each chat's history extends "
        "it (*on*): only the last answer token and the turn's end are computed as prefix, then "
        "the new question as the request's own part. *Leading tokens* (`share_history` off, "
        "`share_tokens` on): a turn's request starts like the turn before's prompt and "
        "answer, so its whole blocks through them are shared, cut from the kept KV. Median of "
        f"{args.repeats} rounds after a warm-up; the same tokens every way (checked).", "",
        "| turn | longest prompt (tokens) | call s off | call s leading tokens | call s on | "
        "first token s off | first token s leading tokens | first token s on | "
        "call off / leading tokens | call off / on |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for turn in range(args.turns):
        lines.append(f"| {turn + 1} | {tokens[turn]} | " + " | ".join(
            f"{med[turn, m]:.2f}" for m in MODES) + " | " + " | ".join(
            f"{fst[turn, m]:.2f}" for m in MODES) + " | " + " | ".join(
            f"{med[turn, 'off'] / med[turn, m]:.2f}x" for m in ("leading tokens", "on")) + " |")
    return lines


if __name__ == "__main__":
    main()
