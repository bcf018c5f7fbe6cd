"""safedecode: decoding-time safety alignment (contrastive decoding) that costs no throughput."""

from safedecode.ops import contrastive_logprobs, contrastive_sample

__version__ = "0.1.0"
__all__ = ["contrastive_sample", "contrastive_logprobs", "custom_generate", "__version__"]


def __getattr__(name: str):
    if name == "custom_generate":  # imports transformers: only on demand
        from safedecode.hf_generate import custom_generate

        return custom_generate
    raise AttributeError(f"module 'safedecode' has no attribute {name!r}")
