"""llmfn: a functional LLM library in pure PyTorch.

Parameters are TensorDict trees, `forward` is a pure function, and the train step is one
compiled function over a state tree.
"""

import warnings

# `python -m llmfn.generate` runs a module this package has already imported (for `generate`).
warnings.filterwarnings(
    "ignore", message="'llmfn.generate' found in sys.modules", category=RuntimeWarning
)

from llmfn.cached_decode import decode_weights  # noqa: E402
from llmfn.generate import generate, stream  # noqa: E402
from llmfn.model import (  # noqa: E402
    IGNORE_INDEX,
    DecoderOutput,
    ModelOutput,
    apply,
    count_params,
    decoder,
    flops_per_token,
    forward,
    forward_cached,
    forward_with_aux,
    init_cache,
    init_params,
    loss,
)
from llmfn.model_config import ModelConfig  # noqa: E402
from llmfn.module import as_module  # noqa: E402

__all__ = [
    "decode_weights",
    "IGNORE_INDEX",
    "DecoderOutput",
    "ModelConfig",
    "ModelOutput",
    "apply",
    "as_module",
    "count_params",
    "decoder",
    "flops_per_token",
    "forward",
    "forward_cached",
    "forward_with_aux",
    "generate",
    "init_cache",
    "init_params",
    "loss",
    "stream",
]
