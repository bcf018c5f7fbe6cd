"""Smoke run of the engine benchmark's measurements on the tiny model (the published run uses the
embedded model: benchmarks/bench_engine.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from engine_fixtures import tiny_llama

from safedecode import methods
from safedecode.bench.continuous import (
    EngineBenchConfig,
    admission_step,
    fork_vs_prefill,
    host_reads_per_step,
    serve,
    workload,
)
from safedecode.engine import SafeDecoder

ROOT = Path(__file__).resolve().parents[1]


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
    two = serve(dec, work, cfg.max_seqs, static=False, packed=False)
    for r in (static, cont, two):
        assert r["tokens"] == want and r["tok_s"] > 0
        assert 0 < r["latency_p50_s"] <= r["latency_p90_s"] <= r["makespan_s"]
    # continuous batching never needs more steps than static batches of the same slots
    assert cont["steps"] <= static["steps"]
    f = fork_vs_prefill(dec, tok, cfg)
    assert f["context"] >= 100 and f["fork_s"] > 0 and f["prefill_s"] > 0 and f["copied_MB"] > 0
    assert host_reads_per_step(dec, steps=3, batch=2) == 1.0
    adm = admission_step(dec, running=2, repeats=2)
    assert adm["packed_s"] > 0 and adm["two forwards_s"] > 0 and adm["decode_s"] > 0


@pytest.mark.parametrize("script, name", [("bench_engine.py", "engine_cpu_quick"),
                                          ("bench_deal.py", "deal_cpu_quick"),
                                          ("bench_eval_batching.py",
                                           "eval_batching_cpu_quick")])
def test_benchmark_scripts_take_any_model(tmp_path, tiny_model_dir, script, name):
    """``--model/--dtype/--device`` (what a GPU run of these scripts uses) on the tiny model."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--model",
           str(tiny_model_dir), "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((tmp_path / f"{name}.json").read_text())
    assert (r["model"], r["device"], r["dtype"]) == (str(tiny_model_dir), "cpu", "float32")
    assert f"{r['model']} (cpu)" in (tmp_path / f"{name}.md").read_text()
    bad = subprocess.run(cmd[:2] + ["--device", "tpu", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2 and "--device: must be 'cpu' or 'cuda'" in bad.stderr
