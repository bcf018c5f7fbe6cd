"""Branch-batched decoding: one forward pass per step for all K branches of all requests.

:class:`SafeDecoder` generates for a batch (or streams); :class:`Engine` is the request-level
layer under it (add requests at any time, step, abort, fork) that servers and search methods use.
"""

from .branches import Branch, BranchHook, Method, contrastive, plain
from .decoder import SafeDecoder, StreamEvent
from .engine import Engine, GenerationResult, StepOutput
from .sampling import SamplingParams

__all__ = ["Branch", "BranchHook", "Method", "contrastive", "plain", "SafeDecoder",
           "GenerationResult", "StreamEvent", "Engine", "StepOutput", "SamplingParams"]
