"""llmfn: a functional LLM library in pure PyTorch.

Parameters are TensorDict trees, `forward` is a pure function, and the train step is one
compiled function over a state tree.

The names below load on first use, so `python -m llmfn.train --help` and a config error answer
without importing torch and tensordict (seconds).
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

from llmfn.lazy_exports import lazy_exports

_EXPORTS = {  # name -> the module that defines it
    "decode_weights": "llmfn.cached_decode",
    "generate": "llmfn.generate",
    "stream": "llmfn.generate",
    "IGNORE_INDEX": "llmfn.model",
    "DecoderOutput": "llmfn.model",
    "ModelOutput": "llmfn.model",
    "apply": "llmfn.model",
    "count_params": "llmfn.model",
    "decoder": "llmfn.model",
    "flops_per_token": "llmfn.model",
    "forward": "llmfn.model",
    "forward_cached": "llmfn.model",
    "forward_with_aux": "llmfn.model",
    "init_cache": "llmfn.model_params",
    "init_params": "llmfn.model_params",
    "loss": "llmfn.model",
    "ModelConfig": "llmfn.model_config",
    "as_module": "llmfn.module",
}
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

if TYPE_CHECKING:
    from llmfn.cached_decode import decode_weights
    from llmfn.generate import generate, stream
    from llmfn.model import (
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
        loss,
    )
    from llmfn.model_config import ModelConfig
    from llmfn.model_params import init_cache, init_params
    from llmfn.module import as_module


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """`llmfn.generate` is the function, also once the submodule of that name is imported
    (`import llmfn.generate`, or by `llmfn.evaluation`): the import system then binds the
    submodule to the package's attribute, and this binds its function instead."""

    def __setattr__(self, name: str, value) -> None:
        if name == "generate" and isinstance(value, types.ModuleType):
            value = value.generate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
