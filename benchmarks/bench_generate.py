"""End-to-end generation speed on the embedded default model (SmolLM2-135M-Instruct).

Per batch size (1, 8) and mode (greedy; sampled at T=0.7, top-p 0.9), 128 new tokens per request
(EOS ignored so every run does the same work), tokens/s = B * 128 / wall time of the whole call:

* ``hf_plain``: transformers ``generate``, one branch (safety system prompt);
* ``hf_cfg``: transformers ``generate`` with ``guidance_scale`` + ``negative_prompt_ids`` (its own
  two-pass contrast, the negative prompt run unbatched on a second cache);
* ``naive_k2``: K separate passes per step over K caches + the reference op (the papers' code);
* ``sd_k2_noprefix``: safedecode, ACD-style K = 2 in one batched pass, no prefix sharing;
* ``sd_k2``: the same with shared branch prefixes (warm prefix store).

Plus the prefill of 32 requests with and without shared branch prefixes, and peak resident memory
above the pre-run level (a 2 ms sampler of /proc/self/statm; CUDA: max allocated). Everything is
measured in one process, one run, so the ratios are meaningful on a noisy machine.

    python benchmarks/bench_generate.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from safedecode import methods
from safedecode.engine import SafeDecoder
from safedecode.engine.naive import NaiveContrastGenerator
from safedecode.models import DEFAULT_NAME, load_default

sys.path.insert(0, str(Path(__file__).parent))
from bench_ops import machine  # noqa: E402

# Written for the benchmark (not from an evaluation set); mixed lengths.
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "How do I kill a Python process that hangs?",
    "Explain photosynthesis to a ten-year-old.",
    "What are three tips for a job interview?",
    "Describe the water cycle.",
    "Give me a recipe for banana bread with walnuts and a little cinnamon.",
    "Why is the sky blue?",
    "List the planets of the solar system in order.",
]


class PeakRSS:
    """Peak resident set size (bytes) above the level at entry, sampled every 2 ms."""

    def __init__(self, device: str) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _loop(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss() - self.base)

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self._t = threading.Thread(target=self._loop, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._t.join()
            self.peak = max(self.peak, self._rss() - self.base)


def hf_inputs(tok, system: str, prompts: list[str], device: str):
    texts = [tok.apply_chat_template([{"role": "system", "content": system},
                                      {"role": "user", "content": p}],
                                     tokenize=False, add_generation_prompt=True) for p in prompts]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _impls(model, naive, sd, sd_noprefix, prompts, pos, neg, kw, hf_kw, n_new) -> dict:
    """The five generators of one (batch, mode) case, as zero-argument callables."""
    (ids, mask), (neg_ids, neg_mask) = pos, neg
    return {
        "hf_plain": lambda: model.generate(ids, attention_mask=mask, **hf_kw),
        "hf_cfg": lambda: model.generate(
            ids, attention_mask=mask, guidance_scale=1.5, negative_prompt_ids=neg_ids,
            negative_prompt_attention_mask=neg_mask, **hf_kw),
        "naive_k2": lambda: naive.generate(prompts, max_new_tokens=n_new, ignore_eos=True,
                                           seed=0, **kw),
        "sd_k2_noprefix": lambda: sd_noprefix.generate(prompts, max_new_tokens=n_new,
                                                       ignore_eos=True, seed=0, **kw),
        "sd_k2": lambda: sd.generate(prompts, max_new_tokens=n_new, ignore_eos=True, seed=0,
                                     **kw),
    }


def run(args) -> dict:
    device = args.device
    model, tok = load_default(device=device)
    acd = methods.get("acd-text", alpha=0.5)
    safe = acd.branches[0].system
    adversarial = acd.branches[1].system
    sd = SafeDecoder(model, tok, acd)
    sd_noprefix = SafeDecoder(model, tok, acd, prefix_cache=False)
    naive = NaiveContrastGenerator(model, tok, acd, backend="reference")
    n_new = args.new_tokens
    modes = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=0.7, top_p=0.9)}
    rows = []
    for b in args.batch:
        prompts = (PROMPTS * ((b + len(PROMPTS) - 1) // len(PROMPTS)))[:b]
        ids, mask = hf_inputs(tok, safe, prompts, device)
        neg_ids, neg_mask = hf_inputs(tok, adversarial, prompts, device)
        for mode, kw in modes.items():
            hf_kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=tok.pad_token_id,
                         do_sample=kw["temperature"] > 0)
            if hf_kw["do_sample"]:
                hf_kw.update(temperature=kw["temperature"], top_p=kw["top_p"], top_k=0)
            impls = _impls(model, naive, sd, sd_noprefix, prompts, (ids, mask),
                           (neg_ids, neg_mask), kw, hf_kw, n_new)
            row = {"B": b, "mode": mode, "new_tokens": n_new}
            for name, fn in impls.items():
                fn()  # warm-up (and fills the prefix store)
                times, peak = [], 0
                for _ in range(args.repeats):
                    with PeakRSS(device) as mem:
                        t0 = time.perf_counter()
                        fn()
                        if device == "cuda":
                            torch.cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                    peak = max(peak, mem.peak)
                t = statistics.median(times)
                row[f"{name}_tok_s"] = b * n_new / t
                row[f"{name}_s"] = t
                row[f"{name}_peak_MB"] = peak / 2**20
                print(f"B={b} {mode:<7} {name:<15} {b * n_new / t:8.1f} tok/s "
                      f"({t:.2f} s, peak +{peak / 2**20:.0f} MB)", file=sys.stderr)
            row["sd_k2_vs_hf_plain"] = row["sd_k2_tok_s"] / row["hf_plain_tok_s"]
            row["sd_k2_vs_naive_k2"] = row["sd_k2_tok_s"] / row["naive_k2_tok_s"]
            row["sd_k2_vs_hf_cfg"] = row["sd_k2_tok_s"] / row["hf_cfg_tok_s"]
            rows.append(row)

    # Prefill of 32 requests (K = 2): shared branch prefixes vs every row prefilling its prompt.
    prompts32 = (PROMPTS * 4)[:args.prefill_batch]
    prefill = {}
    for name, dec in (("shared", sd), ("unshared", sd_noprefix)):
        dec.generate(prompts32, max_new_tokens=1)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            dec.generate(prompts32, max_new_tokens=1)
            times.append(time.perf_counter() - t0)
        prefill[f"{name}_s"] = statistics.median(times)
    prefill["speedup"] = prefill["unshared_s"] / prefill["shared_s"]
    prefill["B"] = args.prefill_batch
    print(f"prefill B={args.prefill_batch}: shared {prefill['shared_s']:.3f} s, unshared "
          f"{prefill['unshared_s']:.3f} s, x{prefill['speedup']:.2f}", file=sys.stderr)

    # Compaction: requests that finish early stop costing compute.
    mixed = ["Say only the word yes."] * 4 + PROMPTS[:4]
    comp = {}
    for compact in (True, False):
        dec = SafeDecoder(model, tok, acd, compact=compact)
        dec.generate(mixed, max_new_tokens=n_new)
        t0 = time.perf_counter()
        res = dec.generate(mixed, max_new_tokens=n_new)
        comp["compact_s" if compact else "masked_s"] = time.perf_counter() - t0
        comp["tokens"] = sum(len(r.token_ids) for r in res)
    comp["speedup"] = comp["masked_s"] / comp["compact_s"]

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"benchmark": "generate", "device": device, "model": DEFAULT_NAME,
            "machine": machine(), "weight_MB": weight_bytes / 2**20,
            "command": " ".join(["python"] + sys.argv), "rows": rows, "prefill": prefill,
            "compaction": comp}


def markdown(r: dict) -> str:
    m = r["machine"]
    wb = r["weight_MB"] * 2**20
    lines = [
        f"# Generation benchmark ({r['device']}, {r['model']})", "", f"`{r['command']}`", "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), GPU: {m['gpu'] or 'none'}. Weights: "
        f"{r['weight_MB']:.0f} MB.", "",
        "Tokens/s over whole calls (prefill included), 128 new tokens per request, EOS ignored. "
        "K=2 is ACD-style contrast with text prompts; `hf_cfg` is transformers' "
        "`guidance_scale` + `negative_prompt_ids`.", "",
        "| B | mode | hf plain | hf cfg | naive K=2 | sd K=2 no prefix | sd K=2 | sd/hf plain "
        "| sd/naive | weight GB/s (sd) | peak MB (hf plain / sd) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["rows"]:
        steps_s = x["sd_k2_tok_s"] / x["B"]
        lines.append(
            f"| {x['B']} | {x['mode']} | {x['hf_plain_tok_s']:.1f} | {x['hf_cfg_tok_s']:.1f} | "
            f"{x['naive_k2_tok_s']:.1f} | {x['sd_k2_noprefix_tok_s']:.1f} | "
            f"{x['sd_k2_tok_s']:.1f} | {x['sd_k2_vs_hf_plain']:.2f} | "
            f"{x['sd_k2_vs_naive_k2']:.2f} | {wb * steps_s / 1e9:.2f} | "
            f"{x['hf_plain_peak_MB']:.0f} / {x['sd_k2_peak_MB']:.0f} |")
    p, c = r["prefill"], r["compaction"]
    lines += ["", f"Prefill of {p['B']} requests, K=2: shared prefixes {p['shared_s']:.3f} s, "
              f"unshared {p['unshared_s']:.3f} s: **{p['speedup']:.2f}x**.", "",
              f"Compaction (4 of 8 requests stop early): dropping finished rows "
              f"{c['compact_s']:.2f} s vs keeping them masked {c['masked_s']:.2f} s "
              f"(x{c['speedup']:.2f}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill-batch", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.new_tokens, args.repeats, args.prefill_batch = [1, 2], 8, 1, 8
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"generate_{args.device}{'_quick' if args.quick else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
