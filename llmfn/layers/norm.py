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
    """x: [..., D]. Normalises in float32, casts back, then scales (as HF Llama does)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def normalize(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: ModelConfig
) -> torch.Tensor:
    """x: [..., D] -> [..., D], the norm of cfg.norm_type with these leaves (bias: layernorm)."""
    if cfg.norm_type == "rmsnorm":
        return rms_norm(x, weight, cfg.norm_eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, cfg.norm_eps)


def norm(params: TensorDict, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """x: [..., D] -> [..., D]."""
    return normalize(x, params["weight"], params.get("bias"), cfg)


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
    leaves = [norm_params["weight"]]
    if cfg.norm_type == "layernorm":
        leaves.append(norm_params["bias"])

    def pre(h: torch.Tensor, norm_weight: torch.Tensor, *norm_bias: torch.Tensor) -> torch.Tensor:
        return normalize(h, norm_weight, norm_bias[0] if norm_bias else None, cfg)

    return recomputed_input_linear(pre, [x, *leaves], weight, bias)
