"""Writing trained peft adapters the way safedecode ships them."""

from __future__ import annotations

from pathlib import Path


def save_adapter(model, out: Path) -> None:
    """``model.save_pretrained(out)`` for a peft model, weights stored in fp16 (half the size;
    loaders upcast), without peft's model-card template."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model.save_pretrained(str(out))
    path = out / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k).half() for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata=meta)
    (out / "README.md").unlink(missing_ok=True)
