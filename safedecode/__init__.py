"""safedecode: decoding-time safety alignment (contrastive decoding) that costs no throughput."""

from safedecode.ops import contrastive_logprobs, contrastive_sample

__version__ = "0.1.0"
__all__ = ["contrastive_sample", "contrastive_logprobs", "__version__"]
