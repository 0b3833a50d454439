"""The parameter tree and the KV cache a model config describes.

params = init_params(cfg, seed=0)       # TensorDict: embed, layers/0/attn/wqkv, ...
shapes = param_shapes(cfg)              # {"embed.weight": (V, D), ...}, no memory
cache = init_cache(cfg, batch_size, max_len)
"""

from __future__ import annotations

import functools
from types import MappingProxyType

import torch
from tensordict import TensorDict

from llmfn.layers.block import init_block
from llmfn.layers.init import normal
from llmfn.layers.norm import init_norm
from llmfn.layers.positions import init_learned_positions
from llmfn.model_config import ModelConfig


def init_params(
    cfg: ModelConfig,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TensorDict:
    """A fresh parameter tree, deterministic from `seed` (drawn on CPU, then moved).

    Weights are [out, in]; residual projections (attn wo, mlp w2) are scaled by 1/sqrt(2·L).
    """
    gen = torch.Generator().manual_seed(seed)
    tree = {
        "embed": TensorDict(
            {"weight": normal((cfg.vocab_size, cfg.hidden_size), cfg.init_std, gen)}, []
        )
    }
    if cfg.position == "learned":
        tree["pos"] = init_learned_positions(cfg, gen)
    tree["layers"] = TensorDict({str(i): init_block(cfg, gen) for i in range(cfg.num_layers)}, [])
    if cfg.norm_position == "pre":
        tree["final_norm"] = init_norm(cfg)
    if not cfg.tie_embeddings:
        tree["lm_head"] = TensorDict(
            {"weight": normal((cfg.vocab_size, cfg.hidden_size), cfg.init_std, gen)}, []
        )
    params = TensorDict(tree, batch_size=[])
    if dtype is not None:
        params = params.to(dtype)
    return params.to(device) if device is not None else params


@functools.lru_cache(maxsize=64)
def param_shapes(cfg: ModelConfig) -> MappingProxyType:
    """{"embed.weight": (V, D), "layers.0.attn.wqkv": (...), ...}: the leaf shapes of
    `init_params(cfg)` in its key order, built on the meta device (no memory); cached per cfg."""
    with torch.device("meta"), torch._C._DisableFuncTorch():  # first called inside vmap, say
        params = init_params(cfg)
    leaves = params.items(include_nested=True, leaves_only=True)
    return MappingProxyType({".".join(key): tuple(leaf.shape) for key, leaf in leaves})


def init_cache(
    cfg: ModelConfig,
    batch_size: int,
    max_len: int,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> TensorDict:
    """A zeroed KV cache: layers/{i}/k and /v, each [B, num_kv_heads, max_len, head_dim]."""
    shape = (batch_size, cfg.kv_heads, max_len, cfg.head_dim)

    def layer_cache() -> TensorDict:
        return TensorDict(
            {
                "k": torch.zeros(shape, dtype=dtype, device=device),
                "v": torch.zeros(shape, dtype=dtype, device=device),
            },
            [],
        )

    return TensorDict(
        {"layers": TensorDict({str(i): layer_cache() for i in range(cfg.num_layers)}, [])}, []
    )
