"""Feed-forward blocks: GLU variants (SwiGLU, GeGLU) and plain MLPs.

GLU params: {"w13": [2·I, D] (gate rows, then up rows), "w2": [D, I]}; plain: {"w1": [I, D],
"w2": [D, I]}; with mlp_bias also "b13"/"b1" and "b2". Fusing gate and up is one matmul.
"""

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from llmfn.layers.init import normal, residual_std, zeros
from llmfn.layers.linear import linear
from llmfn.layers.norm import normed_linear
from llmfn.layers.recomputed_input import recomputed_input_linear
from llmfn.model_config import ModelConfig

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation_fn(name: str):
    return _ACTIVATIONS[name]


def up_names(cfg: ModelConfig) -> tuple[str, str]:
    """The up projection's weight and bias names: w13 and b13 (gate and up fused) with a GLU,
    w1 and b1 without."""
    return ("w13", "b13") if cfg.use_glu else ("w1", "b1")


def up_rows(cfg: ModelConfig, width: int) -> int:
    """The up projection's output rows for hidden width `width` (gate and up with a GLU)."""
    return 2 * width if cfg.use_glu else width


def init_mlp(cfg: ModelConfig, gen: torch.Generator, width: int | None = None) -> TensorDict:
    """width: the hidden width (cfg.ffn_size unless given, e.g. for shared experts)."""
    width = width or cfg.ffn_size
    up, up_bias = up_names(cfg)
    leaves = {
        up: normal((up_rows(cfg, width), cfg.hidden_size), cfg.init_std, gen),
        "w2": normal((cfg.hidden_size, width), residual_std(cfg), gen),
    }
    if cfg.mlp_bias:
        leaves[up_bias] = zeros(up_rows(cfg, width))
        leaves["b2"] = zeros(cfg.hidden_size)
    return TensorDict(leaves, batch_size=[])


def hidden_activation(cfg: ModelConfig):
    """The up projection's output [..., rows] -> the hidden activation [..., width]:
    act(gate) * up with a GLU (gate rows first), act(h) without."""
    act = activation_fn(cfg.activation)
    if not cfg.use_glu:
        return act

    def glu(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return act(gate) * up

    return glu


def mlp(
    params: TensorDict, x: torch.Tensor, cfg: ModelConfig, *, input_norm: TensorDict | None = None
) -> torch.Tensor:
    """x: [..., D] -> [..., D]. input_norm: the params of a norm to apply to x first (a pre-norm
    block's); its output, like the hidden activation, is recomputed in the backward rather than
    kept (`llmfn.layers.recomputed_input`)."""
    up, up_bias = up_names(cfg)
    h = normed_linear(input_norm, x, params[up], params.get(up_bias), cfg)
    if h.device.type == "cpu":
        # Recomputing the activation costs a CPU its exp again (SiLU, GELU): 2.5-4% of the 15M
        # bench step for 110 of its 518 MB of step memory. A GPU redoes it at memory speed.
        return linear(hidden_activation(cfg)(h), params["w2"], params.get("b2"))
    return recomputed_input_linear(hidden_activation(cfg), [h], params["w2"], params.get("b2"))
