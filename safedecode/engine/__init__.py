"""Branch-batched decoding: one forward pass per step for all K branches of all B requests."""

from .branches import Branch, BranchHook, Method, contrastive, plain
from .decoder import GenerationResult, SafeDecoder, StreamEvent

__all__ = ["Branch", "BranchHook", "Method", "contrastive", "plain", "SafeDecoder",
           "GenerationResult", "StreamEvent"]
