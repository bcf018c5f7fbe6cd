"""lm-evaluation-harness on safedecode vs lm-eval's own HF model: a multiple-choice task (a
5-shot preamble, then a question, four answers) and a rolling log-likelihood task (texts of a
few hundred tokens: perplexity) through lm-eval's evaluator, on the embedded model. ``plain``
under the ``safedecode`` model against lm-eval's ``HFLM`` (same model, same batch size): wall
time, the metric, the largest log-likelihood difference; the same with scored answers decoded
one token per step (``forced_prefill_tokens = 0``, as before they were fed with the prompt);
``acd-text`` (K = 2) beside them, what a contrast method costs to evaluate. One machine, one
run, alternated repeats. Writes ``benchmarks/results/lm_eval_cpu.md``.

    python benchmarks/bench_lm_eval.py [--docs 40] [--batch 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from safedecode import methods
from safedecode.bench.machine import describe, git_commit, machine_line
from safedecode.engine import SafeDecoder
from safedecode.engine import engine as engine_mod
from safedecode.eval.harness import SafeDecodeLM
from safedecode.models import load_default

OUT = Path(__file__).parent / "results" / "lm_eval_cpu.md"
SHOTS = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in [
    ("What is the capital of France?", "Paris"), ("How many legs does a spider have?", "eight"),
    ("What gas do plants take in?", "carbon dioxide"), ("Who wrote Hamlet?", "Shakespeare"),
    ("What is the largest planet?", "Jupiter")])
FACTS = [("What colour is a ripe banana?", "yellow"), ("How many days are in a week?", "seven"),
         ("What do bees make?", "honey"), ("What is frozen water called?", "ice"),
         ("Which animal says moo?", "a cow"), ("What is two plus three?", "five"),
         ("What is the opposite of hot?", "cold"), ("Where do fish live?", "in water")]
WRONG = ["purple", "a violin", "Tuesday", "eleven", "glass", "a mountain", "sand", "a cloud"]


def _docs(n: int) -> list[dict]:
    out = []
    for i in range(n):
        q, a = FACTS[i % len(FACTS)]
        wrong = [WRONG[(i + j) % len(WRONG)] for j in range(3)]
        at = i % 4
        out.append({"context": f"{SHOTS}Q: {q}\nA:", "choices": wrong[:at] + [a] + wrong[at:],
                    "answer": at})
    return out


def _texts(n: int) -> list[dict]:
    """Texts of a few hundred tokens for the rolling log-likelihood task."""
    out = []
    for i in range(n):
        facts = FACTS[i % len(FACTS):] + FACTS[:i % len(FACTS)]
        out.append({"text": " ".join(f"{q} The answer is {a}." for q, a in facts * 3)})
    return out


def _task(root: Path, docs: list[dict], texts: list[dict]) -> TaskManager:
    common = "dataset_path: json\ntest_split: test\n"
    for name, rows, body in (
            ("bench_mc", docs, "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
             "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
             "target_delimiter: \" \"\nmetric_list:\n  - metric: acc\n"),
            ("bench_roll", texts, "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
             "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n")):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in rows))
        (root / f"{name}.yaml").write_text(
            f"task: {name}\n{common}dataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {root / 'cache'}\n{body}")
    return TaskManager(include_path=str(root))


METRIC = {"bench_mc": "acc,none", "bench_roll": "word_perplexity,none"}


def _run(lm, tasks, task: str) -> tuple[float, float, list[float]]:
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tasks,
                                  log_samples=True, bootstrap_iters=0)
    dt = time.perf_counter() - t0
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    lls = [float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0])
           for s in samples for r in s["resps"]]
    return dt, out["results"][task][METRIC[task]], lls


@contextlib.contextmanager
def _forced_prefill(tokens: int | None):
    """Engines made inside use ``forced_prefill_tokens = tokens`` (None: the default)."""
    old = engine_mod.FORCED_PREFILL_TOKENS
    if tokens is not None:
        engine_mod.FORCED_PREFILL_TOKENS = tokens
    try:
        yield
    finally:
        engine_mod.FORCED_PREFILL_TOKENS = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--texts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, tok = load_default()

    def ours(method: str) -> SafeDecodeLM:
        return SafeDecodeLM(decoder=SafeDecoder(model, tok, methods.get(method)),
                            batch_size=args.batch)

    # name: (lm, forced_prefill_tokens)
    lms = {"lm-eval HFLM": (HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch), None),
           "safedecode plain": (ours("plain"), None),
           "safedecode plain, answers decoded": (ours("plain"), 0),
           "safedecode acd-text": (ours("acd-text"), None)}
    tasks_run = ("bench_mc", "bench_roll")
    times = {(k, t): [] for k in lms for t in tasks_run}
    metric, lls = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tasks = _task(Path(tmp), _docs(args.docs), _texts(args.texts))
        for _ in range(args.repeats):
            for task in tasks_run:
                for name, (lm, forced) in lms.items():
                    with _forced_prefill(forced):
                        dt, metric[name, task], lls[name, task] = _run(lm, tasks, task)
                    times[name, task].append(dt)
                    print(f"{task} {name}: {dt:.1f} s, {metric[name, task]:.4f}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    sections = []
    for task in tasks_run:
        ref = lls["lm-eval HFLM", task]
        diff = max(abs(a - b) for a, b in zip(lls["safedecode plain", task], ref, strict=True))
        rows = "\n".join(
            f"| {k} | {med[k, task]:.1f} | {len(ref) / med[k, task]:.1f} | "
            f"{metric[k, task]:.4g} | " + ", ".join(f"{t:.1f}" for t in times[k, task]) + " |"
            for k in lms)
        ratio = med["lm-eval HFLM", task] / med["safedecode plain", task]
        fed = med["safedecode plain, answers decoded", task] / med["safedecode plain", task]
        what = (f"{args.docs} questions after one 5-shot preamble, four answers each "
                f"({len(ref)} log-likelihood requests)" if task == "bench_mc" else
                f"{args.texts} texts of {len(tok(_texts(1)[0]['text'])['input_ids'])} tokens "
                "or so, one rolling window each")
        sections.append(f"""## {task}: {what}

| model | wall s | requests/s | {METRIC[task].split(',')[0]} | each run, s |
|---|---:|---:|---:|---|
{rows}

`safedecode plain` / lm-eval's HFLM: **{ratio:.2f}×** the speed; its answers fed with the
prompt / decoded one token per step: **{fed:.2f}×**; the largest log-likelihood difference
from HFLM {diff:.2e} (float32).
""")
    OUT.write_text(f"""# lm-evaluation-harness: safedecode vs lm-eval's own HF model

`python {shlex.join(['benchmarks/bench_lm_eval.py', *sys.argv[1:]])}`

{machine_line(describe("cpu"))}, commit {git_commit()}

The embedded model through `lm_eval.simple_evaluate` (evaluator overhead included), batch size
{args.batch}, median of {args.repeats} alternated runs (the first of each includes its
warm-up). The safedecode model computes a context's KV once for its answers and a common
preamble once for all requests (`SafeDecoder.score`'s shared leading tokens), and feeds a
scored answer's tokens with its prompt (one forward scores them, at most 1024 tokens per step;
"answers decoded": one engine step per token, as before); `acd-text` runs two branches per
request.

""" + "\n".join(sections))
    print(OUT.read_text())


if __name__ == "__main__":
    main()
