"""Generation benchmark on the embedded default model (SmolLM2-135M-Instruct).

Per batch size and mode (greedy; sampled at T 0.7, top-p 0.9), N new tokens per request (EOS
ignored, so every contender does the same work); tokens/s = B * N / wall time of the whole call:

* ``hf_plain``: transformers ``generate``, one branch (the safety system prompt);
* ``hf_cfg``: transformers ``generate`` with ``guidance_scale`` + ``negative_prompt_ids`` (its own
  two-pass contrast; the negative prompt runs on a second cache);
* ``naive_k2``: K separate passes per step over K caches + the reference op (the papers' code);
* ``sd_k2_noprefix``: safedecode, ACD-style K = 2 in one batched pass, no prefix sharing;
* ``sd_k2_torchgemm``: shared prefixes, but the linear layers on torch's GEMM instead of
  safedecode's small-M GEMM (``SafeDecoder(small_gemm=False)``): what the GEMM contributes;
* ``sd_k2``: shared branch prefixes (warm prefix store) and the small-M GEMM (the default).

The contenders run round-robin (one run of each per round) after a warm-up round. Also measured:
the prefill of many requests with and without shared branch prefixes, a batch where half the
requests stop early against its long requests alone (freed slots cost nothing), peak memory above
the pre-run level, the model-weight bandwidth (weight bytes x decoding steps/s, as gpt-fast
prints it) and, outside ``--quick``, ``SafeDecoder(compile=True)`` at B = 1 greedy.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from safedecode.bench.machine import BenchError, copy_bandwidth
from safedecode.bench.timing import measure_round_robin

METHODS = ("hf_plain", "hf_cfg", "naive_k2", "sd_k2_noprefix", "sd_k2_torchgemm", "sd_k2")
MODES = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.7, "top_p": 0.9}}
CFG_SCALE = 1.5

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
EARLY_STOP = "Say only the word yes."


def prompts_for(b: int) -> list[str]:
    """``b`` prompts, cycling through :data:`PROMPTS`."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(b)]


@dataclass
class GenConfig:
    """Batch sizes, tokens and repeats of one generation run."""

    device: str = "cpu"
    batch: tuple[int, ...] = (1, 8)
    modes: tuple[str, ...] = ("greedy", "sampled")
    new_tokens: int = 128
    repeats: int = 3
    prefill_batch: int = 32
    dtype: str = "float32"
    quick: bool = False
    model: str | None = None  # None: the embedded default model

    @classmethod
    def make(cls, device: str, *, quick: bool = False, batch: tuple[int, ...] | None = None,
             repeats: int | None = None, dtype: str = "float32", model: str | None = None,
             new_tokens: int | None = None) -> GenConfig:
        """The full run, or with ``quick`` B = 2, 8 new tokens, one timed run each."""
        cfg = cls(device=device, dtype=dtype, quick=quick, model=model)
        if quick:
            cfg.batch, cfg.new_tokens, cfg.repeats, cfg.prefill_batch = (2,), 8, 1, 4
        if batch:
            cfg.batch = tuple(batch)
        if repeats is not None:
            cfg.repeats = repeats
        if new_tokens is not None:
            cfg.new_tokens = new_tokens
        if cfg.repeats < 1 or min(cfg.batch) < 1:
            raise BenchError(f"need --repeats >= 1 and --batch >= 1, got {cfg.repeats}, "
                             f"{cfg.batch}")
        if cfg.new_tokens < 1:
            raise BenchError(f"--new-tokens: must be >= 1, got {cfg.new_tokens}")
        return cfg


class PeakMemory:
    """Peak memory (bytes) above the level at entry: CUDA max allocated, else the resident set
    sampled every 2 ms from /proc/self/statm (0 where that file does not exist)."""

    def __init__(self, device: str) -> None:
        self.device, self.peak, self.base = device, 0, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _loop(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss() - self.base)

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self.base)


@dataclass
class Setup:
    """The model, tokenizer, method and the four generators built on them."""

    model: object
    tok: object
    method: object
    sd: object
    sd_noprefix: object
    sd_torchgemm: object
    naive: object
    device: str

    @classmethod
    def load(cls, device: str = "cpu", dtype: str = "float32", model: str | None = None
             ) -> Setup:
        """Load ``model`` (a local folder or .gguf; default: the embedded model) and build the
        ACD (text prompts) generators."""
        from safedecode import methods
        from safedecode.bench.naive import NaiveContrastGenerator
        from safedecode.engine import SafeDecoder
        from safedecode.models import load_model

        model, tok = load_model(model or "default", dtype=dtype, device=device)
        acd = methods.get("acd-text", alpha=0.5)
        return cls(model, tok, acd, SafeDecoder(model, tok, acd),
                   SafeDecoder(model, tok, acd, prefix_cache=False),
                   SafeDecoder(model, tok, acd, small_gemm=False),
                   NaiveContrastGenerator(model, tok, acd, backend="reference"), device)

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def hf_inputs(self, system: str | None, prompts: list[str]):
        """Left-padded (ids, mask) of the chat-templated prompts for transformers ``generate``
        (rendered as the engine renders them: a template without a system role gets the system
        text in the user turn)."""
        from safedecode.engine.prompts import PromptBuilder

        builder = PromptBuilder(self.tok)
        texts = [builder.render(system or None, [{"role": "user", "content": p}])
                 for p in prompts]
        self.tok.padding_side = "left"
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def generators(self, prompts: list[str], mode: str, n_new: int
                   ) -> dict[str, Callable[[], object]]:
        """The six contenders of one (batch, mode) case, as zero-argument callables."""
        if mode not in MODES:
            raise BenchError(f"mode: must be one of {tuple(MODES)}, got {mode!r}")
        kw = MODES[mode]
        ids, mask = self.hf_inputs(self.method.branches[0].system, prompts)
        neg_ids, neg_mask = self.hf_inputs(self.method.branches[1].system, prompts)
        hf_kw = dict(max_new_tokens=n_new, min_new_tokens=n_new,
                     pad_token_id=self.tok.pad_token_id, do_sample=kw["temperature"] > 0)
        if hf_kw["do_sample"]:
            hf_kw.update(temperature=kw["temperature"], top_p=kw["top_p"], top_k=0)
        sd_kw = dict(max_new_tokens=n_new, ignore_eos=True, seed=0, **kw)
        return {
            "hf_plain": lambda: self.model.generate(ids, attention_mask=mask, **hf_kw),
            "hf_cfg": lambda: self.model.generate(
                ids, attention_mask=mask, guidance_scale=CFG_SCALE, negative_prompt_ids=neg_ids,
                negative_prompt_attention_mask=neg_mask, **hf_kw),
            "naive_k2": lambda: self.naive.generate(prompts, **sd_kw),
            "sd_k2_noprefix": lambda: self.sd_noprefix.generate(prompts, **sd_kw),
            "sd_k2_torchgemm": lambda: self.sd_torchgemm.generate(prompts, **sd_kw),
            "sd_k2": lambda: self.sd.generate(prompts, **sd_kw),
        }


def _ratios(row: dict) -> None:
    for base in ("hf_plain", "naive_k2", "hf_cfg", "sd_k2_noprefix", "sd_k2_torchgemm"):
        row[f"sd_k2_vs_{base}"] = row["sd_k2_tok_s"] / row[f"{base}_tok_s"]


def _resolved(backend: str, device: str) -> str:
    """The op backend name that ``backend`` (e.g. "auto") resolves to on ``device``."""
    from safedecode.ops import registry

    return registry.select(backend, torch.device(device)).__name__.rsplit(".", 1)[-1]


def run_generate(cfg: GenConfig, log: Callable[[str], None] = print) -> dict:
    """Run the generation grid, the prefill comparison and the early-finish check."""
    from safedecode.models import model_name

    log(f"loading {cfg.model or 'the embedded default model'} ({cfg.dtype}, {cfg.device}) ...")
    st = Setup.load(cfg.device, cfg.dtype, cfg.model)
    wbytes = st.weight_bytes
    bw = copy_bandwidth(cfg.device, max_reps=5 if cfg.quick else 20)
    log(f"copy bandwidth: {bw:.1f} GB/s; weights {wbytes / 2**20:.0f} MB")
    rows = []
    for b in cfg.batch:
        prompts = prompts_for(b)
        for mode in cfg.modes:
            fns = st.generators(prompts, mode, cfg.new_tokens)
            res = measure_round_robin(fns, device=cfg.device, warmup=1, repeats=cfg.repeats,
                                      monitor=lambda: PeakMemory(cfg.device))
            row = {"B": b, "mode": mode, "new_tokens": cfg.new_tokens}
            for name, t in res.items():
                tok_s = b * cfg.new_tokens / t.median_s
                row.update({f"{name}_tok_s": tok_s, f"{name}_s": t.median_s,
                            f"{name}_s_min": t.min_s, f"{name}_s_max": t.max_s,
                            f"{name}_reps": t.reps, f"{name}_peak_MB": t.peak_bytes / 2**20,
                            f"{name}_weight_GBps": wbytes * tok_s / b / 1e9})
                log(f"B={b} {mode:<7} {name:<15} {tok_s:8.1f} tok/s ({t.median_s:.2f} s, "
                    f"min {t.min_s:.2f}, max {t.max_s:.2f}, peak +{t.peak_bytes / 2**20:.0f} MB)")
            _ratios(row)
            rows.append(row)

    # Prefill (one new token) of many requests: shared branch prefixes vs none.
    many = prompts_for(cfg.prefill_batch)
    res = measure_round_robin(
        {"shared": lambda: st.sd.generate(many, max_new_tokens=1),
         "unshared": lambda: st.sd_noprefix.generate(many, max_new_tokens=1)},
        device=cfg.device, warmup=1, repeats=cfg.repeats)
    prefill = {"B": cfg.prefill_batch, **{f"{n}_s": t.median_s for n, t in res.items()},
               **{f"{n}_s_min": t.min_s for n, t in res.items()},
               **{f"{n}_s_max": t.max_s for n, t in res.items()}}
    prefill["speedup"] = prefill["unshared_s"] / prefill["shared_s"]
    log(f"prefill B={prefill['B']}: shared {prefill['shared_s']:.3f} s, unshared "
        f"{prefill['unshared_s']:.3f} s, x{prefill['speedup']:.2f}")

    # Early finish: half the requests stop after a few tokens and free their slots; the rest
    # should run about as fast as they do alone (the freed rows cost nothing).
    mixed, long_only = [EARLY_STOP] * 4 + PROMPTS[:4], PROMPTS[:4]
    res = measure_round_robin(
        {"mixed": lambda: st.sd.generate(mixed, max_new_tokens=cfg.new_tokens),
         "long_only": lambda: st.sd.generate(long_only, max_new_tokens=cfg.new_tokens)},
        device=cfg.device, warmup=1, repeats=cfg.repeats)
    early = {f"{n}_s": t.median_s for n, t in res.items()}
    early["tokens"] = sum(len(r.token_ids) for r in st.sd.generate(
        mixed, max_new_tokens=cfg.new_tokens))
    early["overhead"] = early["mixed_s"] / early["long_only_s"]
    log(f"early finish: mixed batch / long requests alone x{early['overhead']:.2f}")
    compiled = None if cfg.quick else run_compiled(st, cfg, log)
    return {"benchmark": "generate", "model": model_name(st.model), "weight_MB": wbytes / 2**20,
            "copy_bandwidth_GBps": bw, "sd_backend": _resolved(st.sd.backend, cfg.device),
            "cfg_scale": CFG_SCALE, "config": asdict(cfg), "rows": rows, "prefill": prefill,
            "early_finish": early, "compiled": compiled}


def run_compiled(st: Setup, cfg: GenConfig, log: Callable[[str], None]) -> dict:
    """B = 1 greedy: ``SafeDecoder(compile=True)`` K = 2 vs eager K = 2 vs transformers
    ``generate`` (compilation happens in the warm-up round and is reported apart)."""
    import time

    from safedecode.engine import SafeDecoder

    prompts = prompts_for(1)
    comp = SafeDecoder(st.model, st.tok, st.method, compile=True)
    t0 = time.perf_counter()
    comp.generate(prompts, max_new_tokens=cfg.new_tokens, ignore_eos=True, seed=0)
    compile_s = time.perf_counter() - t0
    fns = st.generators(prompts, "greedy", cfg.new_tokens)
    fns = {"hf_plain": fns["hf_plain"], "sd_k2": fns["sd_k2"],
           "sd_k2_compiled": lambda: comp.generate(prompts, max_new_tokens=cfg.new_tokens,
                                                   ignore_eos=True, seed=0)}
    res = measure_round_robin(fns, device=cfg.device, warmup=1, repeats=cfg.repeats)
    row = {"B": 1, "mode": "greedy", "first_call_s": compile_s}
    for name, t in res.items():
        row[f"{name}_s"] = t.median_s
        row[f"{name}_tok_s"] = cfg.new_tokens / t.median_s
    row["compiled_vs_hf_plain"] = row["sd_k2_compiled_tok_s"] / row["hf_plain_tok_s"]
    row["compiled_vs_eager"] = row["sd_k2_compiled_tok_s"] / row["sd_k2_tok_s"]
    log(f"compiled B=1 greedy: {row['sd_k2_compiled_tok_s']:.1f} tok/s, x"
        f"{row['compiled_vs_hf_plain']:.2f} hf plain, x{row['compiled_vs_eager']:.2f} eager "
        f"(first call {compile_s:.0f} s)")
    return row
