"""RMSNorm and LayerNorm as pure functions: params {"weight": [D]} (+ {"bias": [D]})."""

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from llmfn.layers.init import ones, zeros
from llmfn.layers.linear import linear
from llmfn.layers.recomputed_input import recomputed_input_linear
from llmfn.model_config import ModelConfig


def init_norm(cfg: ModelConfig) -> TensorDict:
    leaves = {"weight": ones(cfg.hidden_size)}
    if cfg.norm_type == "layernorm":
        leaves["bias"] = zeros(cfg.hidden_size)
    return TensorDict(leaves, batch_size=[])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., D]. Normalises in float32 (float64 stays float64), casts back, then scales (as
    HF Llama does)."""
    upcast = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = upcast * torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def norm(
    params: TensorDict | dict[str, torch.Tensor], x: torch.Tensor, cfg: ModelConfig
) -> torch.Tensor:
    """x: [..., D] -> [..., D]."""
    if cfg.norm_type == "rmsnorm":
        return rms_norm(x, params["weight"], cfg.norm_eps)
    return F.layer_norm(x, (x.shape[-1],), params["weight"], params["bias"], cfg.norm_eps)


def normed_linear(
    norm_params: TensorDict | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: ModelConfig,
) -> torch.Tensor:
    """linear(norm(norm_params, x, cfg), weight, bias): [..., D] -> [..., out], the norm's
    output recomputed in the backward rather than kept (`recomputed_input_linear`); without
    norm_params, linear(x, weight, bias)."""
    if norm_params is None:
        return linear(x, weight, bias)
    names = list(norm_params.keys())

    def pre(h: torch.Tensor, *leaves: torch.Tensor) -> torch.Tensor:
        return norm(dict(zip(names, leaves, strict=True)), h, cfg)

    return recomputed_input_linear(pre, [x, *norm_params.values()], weight, bias)
