"""Feed-forward blocks: GLU variants (SwiGLU, GeGLU) and plain MLPs.

GLU params: {"w13": [2·I, D] (gate rows, then up rows), "w2": [D, I]}; plain: {"w1": [I, D],
"w2": [D, I]}; with mlp_bias also "b13"/"b1" and "b2". Fusing gate and up is one matmul.
"""

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from llmfn.layers.init import normal, residual_std, zeros
from llmfn.layers.linear import linear
from llmfn.model_config import ModelConfig

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation_fn(name: str):
    return _ACTIVATIONS[name]


def up_projection(cfg: ModelConfig, width: int) -> tuple[str, int]:
    """The input projection's weight name and row count for hidden width `width`: the fused
    gate-and-up "w13" (2·width rows) with a GLU, else "w1" (width rows)."""
    if cfg.use_glu:
        return "w13", 2 * width
    return "w1", width


def init_mlp(cfg: ModelConfig, gen: torch.Generator, width: int | None = None) -> TensorDict:
    """width: the hidden width (cfg.ffn_size unless given, e.g. for shared experts)."""
    width = width or cfg.ffn_size
    up, up_rows = up_projection(cfg, width)
    leaves = {
        up: normal((up_rows, cfg.hidden_size), cfg.init_std, gen),
        "w2": normal((cfg.hidden_size, width), residual_std(cfg), gen),
    }
    if cfg.mlp_bias:
        leaves["b13" if cfg.use_glu else "b1"] = zeros(up_rows)
        leaves["b2"] = zeros(cfg.hidden_size)
    return TensorDict(leaves, batch_size=[])


def mlp(params: TensorDict, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """x: [..., D] -> [..., D]."""
    act = activation_fn(cfg.activation)
    if cfg.use_glu:
        gate, up = linear(x, params["w13"], params.get("b13")).chunk(2, dim=-1)
        hidden = act(gate) * up
    else:
        hidden = act(linear(x, params["w1"], params.get("b1")))
    return linear(hidden, params["w2"], params.get("b2"))
