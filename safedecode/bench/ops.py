"""Op benchmark: one decoding step of K = 2 contrastive sampling, fused vs naive pipelines.

ACD-style ``lp_0 - 0.5 lp_1`` with temperature 0.7, top-k 50, top-p 0.9 (β from the grid):

* ``fused``: ``contrastive_sample`` on the fastest backend here (cpp on CPU; cuda, else triton, on
  a GPU); on a GPU the other fused backend is timed too, under its own name (``triton``);
* ``naive``: the reference backend (plain PyTorch: combine, mask, sort-based top-k/top-p, draw);
* ``hf``: what research code does: two ``log_softmax``, combine, transformers' Temperature / TopK /
  TopP logits warpers, softmax, ``torch.multinomial``;
* ``flashinfer`` (GPU, when importable): the same contrast in PyTorch, then FlashInfer's fused
  ``top_k_top_p_sampling_from_logits``.

Each timing is of the whole call (Python overhead included). Effective bandwidth is the bytes of
logits read over the time, next to the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from safedecode.bench.machine import BenchError, copy_bandwidth
from safedecode.bench.timing import measure
from safedecode.ops import contrastive_sample, registry

ALPHA, TEMP, TOP_K, TOP_P = 0.5, 0.7, 50, 0.9
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class OpCase:
    """One grid point: K branches of B requests over a vocabulary of V."""

    b: int
    v: int
    beta: float = 0.1
    dtype: str = "float32"
    k: int = 2

    def __post_init__(self) -> None:
        if self.b < 1 or self.v < 2:
            raise BenchError(f"op case: need B >= 1 and V >= 2, got B={self.b}, V={self.v}")
        if not 0.0 <= self.beta <= 1.0:
            raise BenchError(f"op case: beta must be in [0, 1], got {self.beta}")
        if self.dtype not in DTYPES:
            raise BenchError(f"--dtype: must be one of {DTYPES}, got {self.dtype!r}")

    def __str__(self) -> str:
        return f"V{self.v}-B{self.b}-beta{self.beta}-{self.dtype}"


@dataclass
class OpsConfig:
    """The grid and timing budget of one op run."""

    device: str = "cpu"
    vocab: tuple[int, ...] = (32000, 49152, 128256, 151936)
    batch: tuple[int, ...] = (1, 8, 64)
    beta: tuple[float, ...] = (0.0, 0.1)
    dtype: str = "float32"
    min_time: float = 0.5
    min_reps: int = 5
    max_reps: int = 200
    quick: bool = False

    @classmethod
    def make(cls, device: str, *, quick: bool = False, batch: tuple[int, ...] | None = None,
             repeats: int | None = None, dtype: str = "float32") -> OpsConfig:
        """The full grid, or with ``quick`` a tiny one with short timings."""
        cfg = cls(device=device, dtype=dtype, quick=quick)
        if quick:
            cfg.vocab, cfg.batch, cfg.min_time, cfg.min_reps, cfg.max_reps = (
                (8192, 32000), (1, 8), 0.05, 3, 10)
        if batch:
            cfg.batch = tuple(batch)
        if repeats is not None:
            if repeats < 1:
                raise BenchError(f"--repeats: must be >= 1, got {repeats}")
            cfg.min_reps, cfg.max_reps = repeats, max(cfg.max_reps, repeats)
        return cfg

    def cases(self) -> list[OpCase]:
        return [OpCase(b, v, beta, self.dtype) for v in self.vocab for b in self.batch
                for beta in self.beta]


def fused_backends(device: str) -> list[str]:
    """The fused backends timed on ``device``, fastest-expected first; raises if none loads."""
    names = ("cpp",) if device == "cpu" else ("cuda", "triton")
    ok, why = [], []
    for name in names:
        try:
            registry.load(name)
            ok.append(name)
        except RuntimeError as exc:
            why.append(str(exc))
    if not ok:
        raise BenchError(f"--device {device}: no fused backend loads ({'; '.join(why)}); "
                         "see `safedecode info`")
    return ok


def make_logits(case: OpCase, device: str, seed: int = 0) -> torch.Tensor:
    """``[K, B, V]`` logits with a realistic spread (std 3)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(case.k, case.b, case.v, generator=g) * 3
    return z.to(device=device, dtype=getattr(torch, case.dtype))


def _contrast(logits: torch.Tensor, beta: float) -> torch.Tensor:
    lp0 = torch.log_softmax(logits[0].float(), dim=-1)
    lp1 = torch.log_softmax(logits[1].float(), dim=-1)
    s = lp0 - ALPHA * lp1
    if beta > 0:
        s = s.masked_fill(lp0 < lp0.amax(dim=-1, keepdim=True) + math.log(beta), -math.inf)
    return s


def hf_chain(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """log_softmax x2, combine, transformers' warpers, softmax, multinomial."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    s = _contrast(logits, beta)
    for warper in (TemperatureLogitsWarper(TEMP), TopKLogitsWarper(TOP_K), TopPLogitsWarper(TOP_P)):
        s = warper(None, s)
    return torch.multinomial(torch.softmax(s, dim=-1), 1)[:, 0]


def flashinfer_sampler() -> Callable | None:
    """FlashInfer's ``top_k_top_p_sampling_from_logits`` when importable, else None."""
    try:
        from flashinfer.sampling import top_k_top_p_sampling_from_logits
    except Exception:  # noqa: BLE001 - missing or broken install: no baseline
        return None
    return top_k_top_p_sampling_from_logits


def implementations(logits: torch.Tensor, case: OpCase, backends: list[str]
                    ) -> dict[str, Callable[[], torch.Tensor]]:
    """Zero-argument callables for each contender on these logits; ``fused`` is backends[0]."""
    seeds = torch.arange(case.b, device=logits.device)
    kw = dict(temperature=TEMP, top_k=TOP_K, top_p=TOP_P, beta=case.beta, seed=seeds)
    w = [1.0, -ALPHA]

    def op(backend: str) -> Callable[[], torch.Tensor]:
        return lambda: contrastive_sample(logits, w, backend=backend, **kw)

    fns = {"fused": op(backends[0])}
    fns.update({name: op(name) for name in backends[1:]})
    fns["naive"] = op("reference")
    fns["hf"] = lambda: hf_chain(logits, case.beta)
    fi = flashinfer_sampler() if logits.is_cuda else None
    if fi is not None:
        fns["flashinfer"] = lambda: fi(_contrast(logits, case.beta) / TEMP, TOP_K, TOP_P)
    return fns


def run_ops(cfg: OpsConfig, log: Callable[[str], None] = print) -> dict:
    """Time every case of ``cfg``; returns the result dict (without the run header)."""
    backends = fused_backends(cfg.device)
    bw = copy_bandwidth(cfg.device, max_reps=cfg.max_reps if cfg.quick else 20)
    log(f"copy bandwidth: {bw:.1f} GB/s (read + write); fused backend(s): {', '.join(backends)}")
    rows = []
    for case in cfg.cases():
        logits = make_logits(case, cfg.device)
        nbytes = logits.numel() * logits.element_size()
        res = {name: measure(fn, device=cfg.device, min_time=cfg.min_time,
                             min_reps=cfg.min_reps, max_reps=cfg.max_reps)
               for name, fn in implementations(logits, case, backends).items()}
        f = res["fused"].median_s
        row = {"K": case.k, "B": case.b, "V": case.v, "beta": case.beta, "dtype": case.dtype,
               "fused_backend": backends[0], "logits_bytes": nbytes}
        for name, t in res.items():
            row.update({f"{name}_us": t.median_s * 1e6, f"{name}_us_min": t.min_s * 1e6,
                        f"{name}_us_max": t.max_s * 1e6, f"{name}_reps": t.reps})
        for name, t in res.items():
            if name != "fused":
                row[f"speedup_vs_{name}"] = t.median_s / f
        row["fused_GBps"] = nbytes / f / 1e9
        row["fused_frac_copy_bw"] = row["fused_GBps"] / bw
        rows.append(row)
        log(f"V={case.v:>6} B={case.b:>3} beta={case.beta:<4} fused {row['fused_us']:9.1f} us  "
            f"naive x{row['speedup_vs_naive']:6.1f}  hf x{row['speedup_vs_hf']:6.1f}  "
            f"{row['fused_GBps']:6.2f} GB/s ({100 * row['fused_frac_copy_bw']:.0f}% of copy bw)")
    return {"benchmark": "ops", "copy_bandwidth_GBps": bw, "fused_backends": backends,
            "flashinfer": flashinfer_sampler() is not None and cfg.device == "cuda",
            "params": {"alpha": ALPHA, "temperature": TEMP, "top_k": TOP_K, "top_p": TOP_P},
            "config": asdict(cfg), "rows": rows}
