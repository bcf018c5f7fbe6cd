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


def _task(root: Path, docs: list[dict]) -> TaskManager:
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\n  cache_dir: {root / 'cache'}\ntest_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "target_delimiter: \" \"\nmetric_list:\n  - metric: acc\n")
    return TaskManager(include_path=str(root))


def _run(lm, tasks) -> tuple[float, float, list[float]]:
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=["bench_mc"], task_manager=tasks,
                                  log_samples=True, bootstrap_iters=0)
    dt = time.perf_counter() - t0
    samples = sorted(out["samples"]["bench_mc"], key=lambda s: s["doc_id"])
    lls = [r[0][0] for s in samples for r in s["resps"]]
    return dt, out["results"]["bench_mc"]["acc,none"], lls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model, tok = load_default()
    lms = {"lm-eval HFLM": HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch),
           "safedecode plain": SafeDecodeLM(decoder=SafeDecoder(model, tok,
                                                                  methods.get("plain")),
                                            batch_size=args.batch),
           "safedecode acd-text": SafeDecodeLM(decoder=SafeDecoder(model, tok,
                                                                     methods.get("acd-text")),
                                               batch_size=args.batch)}
    times: dict[str, list[float]] = {k: [] for k in lms}
    acc, lls = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tasks = _task(Path(tmp), _docs(args.docs))
        for _ in range(args.repeats):
            for name, lm in lms.items():
                dt, acc[name], lls[name] = _run(lm, tasks)
                times[name].append(dt)
                print(f"{name}: {dt:.1f} s, acc {acc[name]:.3f}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = max(abs(a - b) for a, b in zip(lls["safedecode plain"], lls["lm-eval HFLM"],
                                          strict=True))
    n_req = len(lls["lm-eval HFLM"])
    rows = "\n".join(f"| {k} | {med[k]:.1f} | {n_req / med[k]:.1f} | {acc[k]:.3f} | "
                     + ", ".join(f"{t:.1f}" for t in times[k]) + " |" for k in lms)
    ratio = med["lm-eval HFLM"] / med["safedecode plain"]
    OUT.write_text(f"""# lm-evaluation-harness: safedecode vs lm-eval's own HF model

`python {shlex.join(['benchmarks/bench_lm_eval.py', *sys.argv[1:]])}`

{machine_line(describe("cpu"))}, commit {git_commit()}

The embedded model; a multiple-choice task through `lm_eval.simple_evaluate`: {args.docs}
questions after one 5-shot preamble, four answers each ({n_req} log-likelihood requests),
batch size {args.batch}, median of {args.repeats} alternated runs (evaluator overhead included).

| model | wall s | requests/s | acc | each run, s |
|---|---:|---:|---:|---|
{rows}

`safedecode plain` / lm-eval's HFLM: **{ratio:.2f}×** the speed; the largest log-likelihood
difference between them {diff:.2e} (float32). The safedecode model computes a context's KV once for
its four answers and the common preamble once for all requests (`SafeDecoder.score`'s shared
leading tokens), but scores a continuation one token per engine step, as it feeds an answer,
where the HF model teacher-forces it in one forward; `acd-text` runs two branches per request.
The first run of each includes its warm-up.
""")
    print(OUT.read_text())


if __name__ == "__main__":
    main()
