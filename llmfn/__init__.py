"""llmfn: a functional LLM library in pure PyTorch.

Parameters are TensorDict trees, `forward` is a pure function, and the train step is one
compiled function over a state tree.
"""

from llmfn.model import (
    IGNORE_INDEX,
    ModelOutput,
    apply,
    count_params,
    flops_per_token,
    forward,
    forward_cached,
    forward_with_aux,
    init_cache,
    init_params,
    loss,
)
from llmfn.model_config import ModelConfig

__all__ = [
    "IGNORE_INDEX",
    "ModelConfig",
    "ModelOutput",
    "apply",
    "count_params",
    "flops_per_token",
    "forward",
    "forward_cached",
    "forward_with_aux",
    "init_cache",
    "init_params",
    "loss",
]
