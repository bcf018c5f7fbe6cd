"""Smoke run of the engine benchmark's measurements on the tiny model (the published run uses the
embedded model: benchmarks/bench_engine.py)."""

from __future__ import annotations

from engine_fixtures import tiny_llama

from safedecode import methods
from safedecode.bench.continuous import (
    EngineBenchConfig,
    fork_vs_prefill,
    host_reads_per_step,
    serve,
    workload,
)
from safedecode.engine import SafeDecoder


def test_engine_bench_measurements_on_the_tiny_model():
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("acd-text", alpha=0.5))
    cfg = EngineBenchConfig(requests=6, rate=50.0, min_new=2, max_new=8, max_seqs=2,
                            fork_context=160, fork_n=2, repeats=1)
    work = workload(cfg)
    assert [w.arrival for w in work] == sorted(w.arrival for w in work)
    assert work == workload(cfg)  # seeded
    want = sum(w.max_new for w in work)
    static, cont = (serve(dec, work, cfg.max_seqs, static=s) for s in (True, False))
    for r in (static, cont):
        assert r["tokens"] == want and r["tok_s"] > 0
        assert 0 < r["latency_p50_s"] <= r["latency_p90_s"] <= r["makespan_s"]
    # continuous batching never needs more steps than static batches of the same slots
    assert cont["steps"] <= static["steps"]
    f = fork_vs_prefill(dec, tok, cfg)
    assert f["context"] >= 100 and f["fork_s"] > 0 and f["prefill_s"] > 0 and f["copied_MB"] > 0
    assert host_reads_per_step(dec, steps=3, batch=2) == 1.0
