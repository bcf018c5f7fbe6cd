"""Smoke test of ``safedecode bench all --quick``: the result files exist and are well-formed.

Only the shape of the results is checked (keys, machine block, positive numbers, ratios that
agree with the timings), never that a performance target is reached.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import datetime

import pytest
import torch
from typer.testing import CliRunner

from safedecode.bench import report
from safedecode.cli import app

runner = CliRunner()
THREADS = torch.get_num_threads()


def m_threads(r: dict) -> int:
    return r["machine"]["torch_threads"]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run of the whole suite into a temporary folder. One thread: with other jobs
    on the cores, torch's spinning thread pool can make a 30 s run take 10 minutes."""
    out = tmp_path_factory.mktemp("bench")
    res = runner.invoke(app, ["bench", "all", "--quick", "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, res.output


@pytest.mark.parametrize("bench", ["ops", "generate"])
def test_files_and_header(quick, bench):
    out, _ = quick
    for ext in ("json", "md", "png"):
        assert (out / f"{bench}_cpu.{ext}").is_file()
    r = json.loads((out / f"{bench}_cpu.json").read_text())
    assert r["benchmark"] == bench and r["device"] == "cpu" and r["quick"] is True
    assert r["command"].startswith("safedecode bench all --device cpu --quick --threads 1 --out ")
    assert m_threads(r) == 1 and torch.get_num_threads() == THREADS  # used, then restored
    assert isinstance(r["argv"], list)
    assert datetime.fromisoformat(r["timestamp"]).tzinfo is not None
    assert r["git_commit"] is None or len(r["git_commit"]) >= 40
    m = r["machine"]
    assert m["cpu"] and m["logical_cores"] >= 1 and m["torch_threads"] >= 1
    assert m["torch"] == torch.__version__ and "triton" in m and m["gpu"] is None
    assert r["copy_bandwidth_GBps"] > 0 and r["wall_s"] > 0 and r["rows"]
    png = (out / f"{bench}_cpu.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from matplotlib.image import imread

    h, w = imread(out / f"{bench}_cpu.png").shape[:2]
    assert h > 100 and w > 100
    md = (out / f"{bench}_cpu.md").read_text()
    assert md.startswith("# ") and "quick run" in md and r["command"] in md
    assert sum(line.startswith(("| 1 |", "| 2 |", "| 8 |", "| 8192 |", "| 32000 |"))
               for line in md.splitlines()) >= len(r["rows"])


def test_ops_numbers(quick):
    out, _ = quick
    r = json.loads((out / "ops_cpu.json").read_text())
    impls = report.op_impls(r)
    assert impls[:3] == ["fused", "naive", "hf"]
    for x in r["rows"]:
        for n in impls:
            assert 0 < x[f"{n}_us_min"] <= x[f"{n}_us"] <= x[f"{n}_us_max"]
            assert x[f"{n}_reps"] >= 3
        for n in impls[1:]:
            assert _close(x[f"speedup_vs_{n}"], x[f"{n}_us"] / x["fused_us"])
        assert _close(x["fused_GBps"], x["logits_bytes"] / (x["fused_us"] * 1e-6) / 1e9)
        assert _close(x["fused_frac_copy_bw"], x["fused_GBps"] / r["copy_bandwidth_GBps"])
        assert x["logits_bytes"] == x["K"] * x["B"] * x["V"] * 4


def test_generate_numbers(quick):
    out, _ = quick
    r = json.loads((out / "generate_cpu.json").read_text())
    wbytes = r["weight_MB"] * 2**20
    assert wbytes > 0
    for x in r["rows"]:
        for m in report.GEN_LABELS:
            assert 0 < x[f"{m}_s_min"] <= x[f"{m}_s"] <= x[f"{m}_s_max"]
            assert _close(x[f"{m}_tok_s"], x["B"] * x["new_tokens"] / x[f"{m}_s"])
            assert _close(x[f"{m}_weight_GBps"], wbytes * x[f"{m}_tok_s"] / x["B"] / 1e9)
            assert x[f"{m}_peak_MB"] >= 0
        for base in ("hf_plain", "naive_k2", "hf_cfg"):
            assert _close(x[f"sd_k2_vs_{base}"], x["sd_k2_tok_s"] / x[f"{base}_tok_s"])
    p, e = r["prefill"], r["early_finish"]
    assert _close(p["speedup"], p["unshared_s"] / p["shared_s"])
    assert _close(e["overhead"], e["mixed_s"] / e["long_only_s"]) and e["tokens"] > 0


def test_targets_and_readme_section(quick, tmp_path):
    out, output = quick
    ts = report.targets(json.loads((out / "ops_cpu.json").read_text()),
                        json.loads((out / "generate_cpu.json").read_text()))
    assert len(ts) == 5
    for t in ts:
        assert t["met"] in (True, False, None) and t["text"] in output
        assert t["min"] > 0 or t["met"] is None
    prefill = next(t for t in ts if t["target"].startswith("Prefix sharing"))
    assert prefill["met"] is None  # quick prefill is not at B = 32: not assessed, not claimed
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{report.START}\nold text\n{report.END}\n\nrest\n")
    res = runner.invoke(app, ["bench", "report", "--out", str(out), "--readme", str(readme)])
    assert res.exit_code == 0, res.output
    text = readme.read_text()
    assert text.startswith("intro\n\n" + report.START) and text.endswith(report.END + "\n\nrest\n")
    assert "old text" not in text and "Quick run" in text
    for t in ts:
        assert f"- {t['text']}" in text
    for name in ("ops_cpu.png", "generate_cpu.png"):
        link = next(line for line in text.splitlines() if name in line)
        assert (tmp_path / link.split("(", 1)[1].rstrip(")")).is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error without a GPU")
def test_cuda_missing_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["bench", "ops", "--device", "cuda", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "--device cuda: CUDA is not available" in res.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["ops", "--device", "tpu"], "--device: must be 'cpu' or 'cuda'"),
    (["ops", "--repeats", "0"], "--repeats: must be >= 1"),
    (["generate", "--threads", "0"], "--threads: must be >= 1"),
    (["ops", "--dtype", "int8"], "--dtype: must be one of"),
    (["generate", "--new-tokens", "0"], "--new-tokens: must be >= 1"),
    (["generate", "--model", "/no/such/model"], "model: cannot load '/no/such/model'"),
])
def test_bad_options(tmp_path, args, message):
    res = runner.invoke(app, ["bench", *args, "--out", str(tmp_path)])
    assert res.exit_code == 2 and message in res.output, res.output


def test_generate_on_another_model(tmp_path, tiny_model_dir):
    """``--model`` benchmarks any local model folder; ``--new-tokens`` sets the work per request."""
    res = runner.invoke(app, ["bench", "generate", "--quick", "--threads", "1", "--model",
                              str(tiny_model_dir), "--new-tokens", "3", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "generate_cpu.json").read_text())
    assert r["model"] == str(tiny_model_dir) and r["config"]["new_tokens"] == 3
    assert f"--model {tiny_model_dir} --new-tokens 3" in r["command"]
    assert all(row["new_tokens"] == 3 and row["sd_k2_tok_s"] > 0 for row in r["rows"])


def test_report_errors(tmp_path):
    res = runner.invoke(app, ["bench", "report", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "no ops_<device>.json" in res.output
    (tmp_path / "ops_cpu.json").write_text("{not json")
    res = runner.invoke(app, ["bench", "report", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "cannot read a benchmark result" in res.output


def test_cli_import_stays_light():
    code = ("import sys, safedecode.cli; "
            "print(sorted(m for m in sys.modules if m.startswith(('matplotlib', 'transformers', "
            "'safedecode.bench.ops', 'safedecode.bench.generate', 'safedecode.bench.report'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
