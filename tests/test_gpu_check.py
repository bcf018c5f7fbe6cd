"""scripts/gpu_check.py: its CPU smoke mode runs every check it would run on a GPU (bar CUDA graphs)
on small shapes with the cpp and interpreted Triton backends, so the script is known to work
before a GPU run spends minutes on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is the real check there")
def test_gpu_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "ops_smoke"
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--smoke",
                          "--out", str(out)], capture_output=True, text=True, env=env,
                         timeout=600, check=False)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["backends"] == ["cpp", "triton"]
    for be in ("cpp", "triton"):
        c = report["correctness"][be]
        assert c["ok"], c
        assert all(r["token_mismatches"] == 0 for r in c["random"])
        assert c["bad_rows"]["ok"] and all(x["ok"] for x in c["batch_invariance"])
    assert report["philox"] == {"triton": True}
    rows = report["timing"]["rows"]
    assert [r["B"] for r in rows] == [1, 8] and all(r["triton_us"] > 0 for r in rows)
    assert "| B | V |" in out.with_suffix(".md").read_text()


def test_gpu_check_refuses_to_report_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 2 and "no GPU here" in res.stderr
    assert not (tmp_path / "x.json").exists()
