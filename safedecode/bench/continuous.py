"""Engine benchmarks: continuous vs static batching on a Poisson stream, fork vs prefill, host
reads per decode step.

* **Continuous vs static batching** (and continuous with two forwards per admission step,
  ``packed=False``, to show what the packed forward adds). ``n`` requests (the generation
  benchmark's prompts, max new tokens drawn uniformly from ``[min_new, max_new]``, EOS
  ignored so the work is fixed) arrive as a Poisson stream. *Continuous*: one
  :class:`~safedecode.engine.Engine` with ``max_seqs`` slots; a request joins at the next step
  boundary after it arrives and leaves when it ends. *Static*: the same engine, but a new
  batch (up to ``max_seqs`` of the requests that have arrived) starts only when the previous
  one has ended, as ``SafeDecoder.generate`` runs a batch. Reported: tokens/s over the
  makespan and per-request latency (arrival to last token).
* **Fork.** A request with a ``context``-token prompt forks into ``n`` children (KV copied into
  their slots) vs prefilling ``n`` copies of the same prompt.
* **Admission step**: a step that admits one request while ``max_seqs - 1`` decode, as one packed
  forward vs two, against a decode step alone (alternated, medians).
* **Host reads per decode step**, counted by patching ``Tensor.tolist/item/__bool__/...``.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from safedecode.bench.generate import PROMPTS


@dataclass
class EngineBenchConfig:
    requests: int = 64
    rate: float = 4.0  # arrivals per second (Poisson)
    min_new: int = 8
    max_new: int = 128
    max_seqs: int = 8
    fork_context: int = 512
    fork_n: int = 4
    repeats: int = 3
    seed: int = 0


@dataclass
class Request:
    arrival: float
    prompt: str
    max_new: int


def workload(cfg: EngineBenchConfig) -> list[Request]:
    """Poisson arrivals with mixed prompt and output lengths (seeded)."""
    rng = random.Random(cfg.seed)
    t, out = 0.0, []
    for _ in range(cfg.requests):
        t += rng.expovariate(cfg.rate)
        out.append(Request(t, rng.choice(PROMPTS), rng.randint(cfg.min_new, cfg.max_new)))
    return out


def serve(dec, work: list[Request], max_seqs: int, *, static: bool, packed: bool = True
          ) -> dict:
    """Run ``work`` in real time on one engine; returns tokens/s and latencies. ``packed``:
    admission steps as one packed forward (else two: decode, then prefill)."""
    from safedecode.engine import SamplingParams

    eng = dec.engine(max_seqs=max_seqs, max_len=512, packed=packed)
    pending = list(work)
    arrival: dict[int, float] = {}
    done: dict[int, tuple[float, int]] = {}
    t0 = time.perf_counter()
    steps = 0
    while pending or eng.has_unfinished():
        now = time.perf_counter() - t0
        may_add = not static or not eng.has_unfinished()
        while may_add and pending and pending[0].arrival <= now:
            if static and eng.num_waiting() >= max_seqs:
                break
            r = pending.pop(0)
            rid = eng.add_request(r.prompt, SamplingParams(max_new_tokens=r.max_new,
                                                           ignore_eos=True))
            arrival[rid] = r.arrival
        if not eng.has_unfinished():
            time.sleep(max(0.0, pending[0].arrival - (time.perf_counter() - t0)))
            continue
        for o in eng.step():
            if o.finish_reason:
                res = eng.pop_result(o.request_id)
                done[o.request_id] = (time.perf_counter() - t0, len(res.token_ids))
        steps += 1
    makespan = time.perf_counter() - t0
    lat = sorted(done[i][0] - arrival[i] for i in done)
    tokens = sum(n for _, n in done.values())
    return {"tokens": tokens, "makespan_s": makespan, "tok_s": tokens / makespan,
            "steps": steps, "latency_mean_s": statistics.fmean(lat),
            "latency_p50_s": lat[len(lat) // 2], "latency_p90_s": lat[int(0.9 * (len(lat) - 1))]}


def _sync(dec) -> None:
    """Wait for the model's device (a GPU runs the copies and the prefill asynchronously)."""
    dev = dec.model.get_input_embeddings().weight.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def fork_vs_prefill(dec, tok, cfg: EngineBenchConfig) -> dict:
    """Median seconds to fork a ``fork_context``-token request into ``fork_n`` vs to prefill
    ``fork_n`` copies of it (one batched prefill)."""
    from safedecode.engine import SamplingParams

    words = ("The lighthouse keeper wrote down the weather every hour of the night. " * 200)
    ids = tok(words, add_special_tokens=False)["input_ids"]
    prompt = tok.decode(ids[:cfg.fork_context - 60])  # room for the template and the prefix
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    fork_s, prefill_s, ctx = [], [], 0
    for _ in range(cfg.repeats):
        eng = dec.engine(max_seqs=cfg.fork_n + 1, max_len=cfg.fork_context + 64)
        rid = eng.add_request(prompt, sp)
        eng.step()
        ctx = max(eng.state.host_len)
        _sync(dec)
        t = time.perf_counter()
        eng.fork(rid, cfg.fork_n)
        _sync(dec)
        fork_s.append(time.perf_counter() - t)
        eng = dec.engine(max_seqs=cfg.fork_n, max_len=cfg.fork_context + 64)
        for _ in range(cfg.fork_n):
            eng.add_request(prompt, sp)
        st = eng.state
        _sync(dec)
        t = time.perf_counter()
        slots = tuple(st.acquire() for _ in range(cfg.fork_n))
        built = [s.built for s in eng.scheduler.admit(cfg.fork_n)]
        with torch.no_grad():
            eng.runner.prefill(st, slots, built)
        _sync(dec)
        prefill_s.append(time.perf_counter() - t)
        per_col = st.cache.nbytes_per_column()
    f, p = statistics.median(fork_s), statistics.median(prefill_s)
    return {"context": ctx, "n": cfg.fork_n, "fork_s": f, "prefill_s": p, "speedup": p / f,
            "copied_MB": cfg.fork_n * dec.method.k * ctx * per_col / 2**20}


def admission_step(dec, running: int = 7, repeats: int = 9) -> dict:
    """Median seconds of a decode step over ``running`` sequences, and of a step that also
    admits one new request, with the admission as one packed forward and as two forwards;
    the two engines alternate, each measurement a fresh admission (the newcomer is aborted
    after its first step)."""
    from safedecode.engine import SamplingParams

    sp = SamplingParams(max_new_tokens=256, ignore_eos=True)  # outlives the measurement
    engines = {}
    for packed in (True, False):
        eng = dec.engine(max_seqs=running + 1, max_len=512, packed=packed)
        for p in PROMPTS[:running]:
            eng.add_request(p, sp)
        eng.step()
        engines[packed] = eng
    times: dict[str, list[float]] = {"decode": [], "packed": [], "two forwards": []}
    with torch.no_grad():
        for i in range(repeats):
            for packed, eng in engines.items():
                _sync(dec)
                t = time.perf_counter()
                eng.step()
                _sync(dec)
                if packed:
                    times["decode"].append(time.perf_counter() - t)
                rid = eng.add_request(PROMPTS[(running + i) % len(PROMPTS)], sp)
                _sync(dec)
                t = time.perf_counter()
                eng.step()
                _sync(dec)
                times["packed" if packed else "two forwards"].append(time.perf_counter() - t)
                eng.abort(rid)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"running": running, "repeats": repeats, **{f"{k}_s": v for k, v in med.items()},
            "speedup": med["two forwards"] / med["packed"]}


def host_reads_per_step(dec, steps: int = 20, batch: int = 4) -> float:
    """Mean reads of device values into Python per decode step (each a sync on a GPU)."""
    from safedecode.engine import SamplingParams

    eng = dec.engine(max_seqs=batch, max_len=512)
    for p in PROMPTS[:batch]:
        eng.add_request(p, SamplingParams(max_new_tokens=steps + 2, temperature=0.7, seed=0,
                                          ignore_eos=True))
    eng.step()
    with host_reads() as count:
        for _ in range(steps):
            eng.step()
    return count[0] / steps


@contextlib.contextmanager
def host_reads() -> Iterator[list[int]]:
    """Count the reads of device values into Python (each a sync on a GPU) made inside: yields
    a one-item list whose item is the count so far (``Tensor.tolist/item/__bool__/...``
    patched meanwhile)."""
    names = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    count = [0]

    def wrap(orig):
        def counted(t, *a, **kw):
            count[0] += 1
            return orig(t, *a, **kw)
        return counted

    try:
        for n in names:
            setattr(torch.Tensor, n, wrap(saved[n]))
        yield count
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def run_engine_bench(dec, tok, cfg: EngineBenchConfig,
                     log: Callable[[str], None] = print) -> dict:
    """All three measurements; the batching runs alternate (static, continuous, continuous
    with two forwards per admission step) ``repeats`` times on the same seeded workload."""
    work = workload(cfg)
    runs = {"static": [], "continuous": [], "continuous, two forwards": []}
    for i in range(cfg.repeats):
        for mode, done in runs.items():
            r = serve(dec, work, cfg.max_seqs, static=mode == "static",
                      packed="two" not in mode)
            done.append(r)
            log(f"[{i}] {mode:<10} {r['tok_s']:7.1f} tok/s, makespan {r['makespan_s']:.1f} s, "
                f"latency mean {r['latency_mean_s']:.1f} s p90 {r['latency_p90_s']:.1f} s")
    med = {m: sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2] for m, rs in runs.items()}
    fork = fork_vs_prefill(dec, tok, cfg)
    log(f"fork at {fork['context']} tokens into {fork['n']}: {fork['fork_s'] * 1e3:.1f} ms vs "
        f"prefill {fork['prefill_s'] * 1e3:.1f} ms (x{fork['speedup']:.0f})")
    reads = host_reads_per_step(dec)
    log(f"host reads per decode step: {reads:.2f}")
    adm = admission_step(dec, running=cfg.max_seqs - 1)
    log(f"admission step over {adm['running']} running: packed {adm['packed_s'] * 1e3:.0f} ms, "
        f"two forwards {adm['two forwards_s'] * 1e3:.0f} ms (x{adm['speedup']:.2f}); decode "
        f"alone {adm['decode_s'] * 1e3:.0f} ms")
    return {"config": asdict(cfg), "batching": med, "batching_runs": runs,
            "speedup": med["continuous"]["tok_s"] / med["static"]["tok_s"],
            "packing_speedup": (med["continuous"]["tok_s"]
                                / med["continuous, two forwards"]["tok_s"]),
            "fork": fork, "host_reads_per_step": reads, "admission": adm}
