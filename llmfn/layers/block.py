"""The decoder block: attention and MLP (or MoE) residual branches, pre- or post-norm.

params: {"attn_norm", "attn", "mlp_norm", "mlp" | "moe"}.
"""

import torch
from tensordict import TensorDict

from llmfn.layers.attention import attention, init_attention
from llmfn.layers.dropout import dropout, fold_in
from llmfn.layers.mlp import init_mlp, mlp
from llmfn.layers.moe import init_moe, moe
from llmfn.layers.norm import init_norm, norm
from llmfn.model_config import ModelConfig


def init_block(cfg: ModelConfig, gen: torch.Generator) -> TensorDict:
    tree = {
        "attn_norm": init_norm(cfg),
        "attn": init_attention(cfg, gen),
        "mlp_norm": init_norm(cfg),
    }
    if cfg.use_moe:
        tree["moe"] = init_moe(cfg, gen)
    else:
        tree["mlp"] = init_mlp(cfg, gen)
    return TensorDict(tree, batch_size=[])


def feed_forward(
    params: TensorDict,
    x: torch.Tensor,
    cfg: ModelConfig,
    *,
    input_norm: TensorDict | None,
    token_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The block's second branch: dense MLP, or MoE with its routing losses; input_norm: the
    norm to apply to x first (pre-norm), or None; token_valid: [B, T] (0 = padding, left out
    of the MoE's losses and capacity), or None."""
    if cfg.use_moe:
        h = x if input_norm is None else norm(input_norm, x, cfg)
        return moe(params["moe"], h, cfg, token_valid)
    return mlp(params["mlp"], x, cfg, input_norm=input_norm), {}


def block(
    params: TensorDict,
    x: torch.Tensor,
    cfg: ModelConfig,
    *,
    positions: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    key_valid: torch.Tensor | None = None,
    token_valid: torch.Tensor | None = None,
    cache: TensorDict | None = None,
    cache_start: torch.Tensor | None = None,
    dropout_key: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TensorDict | None, dict]:
    """x: [B, T, D] -> (x [B, T, D], updated cache, MoE losses {name: 0-d tensor}).

    key_valid: the attention mask over the keys ([B, T], or [B, max_len] with a cache);
    token_valid: [B, T], 1 where x holds a real token (MoE routing leaves padding out)."""
    attn_key = None if dropout_key is None else fold_in(dropout_key, 1)
    mlp_key = None if dropout_key is None else fold_in(dropout_key, 2)

    def self_attention(
        h: torch.Tensor, input_norm: TensorDict | None
    ) -> tuple[torch.Tensor, TensorDict | None]:
        return attention(
            params["attn"],
            h,
            cfg,
            positions=positions,
            rope=rope,
            key_valid=key_valid,
            cache=cache,
            cache_start=cache_start,
            input_norm=input_norm,
        )

    # Pre-norm: each branch normalises its own input (the norm's output is recomputed in the
    # backward rather than kept, `llmfn.layers.recomputed_input`).
    if cfg.norm_position == "pre":
        attn_out, cache = self_attention(x, params["attn_norm"])
        x = x + dropout(attn_out, cfg.dropout, attn_key)
        ff_out, losses = feed_forward(
            params, x, cfg, input_norm=params["mlp_norm"], token_valid=token_valid
        )
        x = x + dropout(ff_out, cfg.dropout, mlp_key)
    else:
        attn_out, cache = self_attention(x, None)
        x = norm(params["attn_norm"], x + dropout(attn_out, cfg.dropout, attn_key), cfg)
        ff_out, losses = feed_forward(params, x, cfg, input_norm=None, token_valid=token_valid)
        x = norm(params["mlp_norm"], x + dropout(ff_out, cfg.dropout, mlp_key), cfg)
    return x, cache, losses
