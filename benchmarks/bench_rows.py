"""What a second branch row costs in one decode step of the default model (issue 3's B = 1 case).

Times the model's own forward of one new token per row over a 100-token KV cache, for 1 and 2
rows (medians of 110 steps after 10 warm-up steps, alternated twice), then the whole B = 1 greedy
call of 128 tokens for transformers ``generate`` (1 branch) and safedecode K = 2 (ACD text
prompts), alternated 3 times. Writes ``benchmarks/results/forward_rows_cpu.md``.

    python benchmarks/bench_rows.py
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from safedecode import methods
from safedecode.bench.machine import describe, machine_line
from safedecode.engine import SafeDecoder
from safedecode.methods import prompts as text_prompts
from safedecode.models import load_default

OUT = Path(__file__).parent / "results" / "forward_rows_cpu.md"
PROMPT = "Write a short story about a lighthouse keeper."


def step_ms(model, rows: int, ctx: int = 100, steps: int = 120) -> float:
    ids = torch.randint(0, 1000, (rows, ctx))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        tok = torch.randint(0, 1000, (rows, 1))
        ts = []
        for _ in range(steps):
            t0 = time.perf_counter()
            model(tok, past_key_values=cache, use_cache=True)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts[10:]) * 1e3


def main() -> None:
    model, tok = load_default()
    rows = {1: [], 2: []}
    for _ in range(2):
        for r, times in rows.items():
            times.append(step_ms(model, r))
    msgs = [{"role": "system", "content": text_prompts.SAFEGUARD},
            {"role": "user", "content": PROMPT}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    dec = SafeDecoder(model, tok, methods.get("acd-text"))
    calls = {
        "transformers generate, 1 branch": lambda: model.generate(
            enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=128,
            min_new_tokens=128, do_sample=False, pad_token_id=tok.pad_token_id),
        "safedecode K = 2": lambda: dec.generate(PROMPT, max_new_tokens=128, ignore_eos=True),
    }
    for f in calls.values():
        f()
    wall = {k: [] for k in calls}
    for _ in range(3):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            wall[k].append(time.perf_counter() - t0)
    one, two = statistics.median(rows[1]), statistics.median(rows[2])
    lines = [
        "# Cost of a second branch row (B = 1, default model)", "",
        "`python benchmarks/bench_rows.py`", "", f"Machine: {machine_line(describe('cpu'))}", "",
        "| forward of one decode step | ms (median) |", "|---|---:|",
        f"| 1 row | {one:.2f} |", f"| 2 rows | {two:.2f} ({two / one:.3f}x) |", "",
        "| whole call, 128 greedy tokens | s (median of 3) | tok/s | per step ms |",
        "|---|---:|---:|---:|",
    ]
    for k, v in wall.items():
        s = statistics.median(v)
        lines.append(f"| {k} | {s:.3f} | {128 / s:.1f} | {s / 128 * 1e3:.2f} |")
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(OUT.read_text())


if __name__ == "__main__":
    main()
