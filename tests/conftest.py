"""Shared fixtures. Triton runs through its interpreter on this CPU-only machine, which must be
switched on before triton is first imported."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers: one thread each
    torch.set_num_threads(1)

from safedecode.ops import registry  # noqa: E402

# Backends compared with the reference on this machine's tensors (CPU; triton via interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST_BACKENDS = ["cpp", "triton"] if DEVICE == "cpu" else ["triton", "cuda"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny random Llama of ``engine_fixtures`` saved as a model folder (for CLI tests)."""
    from engine_fixtures import tiny_llama

    model, tok = tiny_llama()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(params=FAST_BACKENDS)
def backend(request) -> str:
    """A fast backend; it must load here (a load failure is a test failure, not a skip)."""
    registry.load(request.param)
    return request.param


try:  # CI runs hypothesis derandomised so a red build is reproducible
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        _hyp_settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass
