"""The decoder as pure functions over a TensorDict of parameters.

    params = init_params(cfg, seed=0)           # TensorDict: embed, layers/0/attn/wqkv, ...
    logits = forward(params, tokens, cfg)       # tokens [B, T] -> logits [B, T, V]
    value, metrics = loss(params, batch, cfg)   # next-token cross-entropy (+ MoE losses)

Every function here works under `torch.func.grad`, `torch.func.vmap` and `torch.compile`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from llmfn.input_checks import check_inputs, check_range, check_rng
from llmfn.layers.block import block
from llmfn.layers.dropout import dropout, fold_in
from llmfn.layers.linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy
from llmfn.layers.norm import norm, normed_linear
from llmfn.layers.positions import rope_angles, sinusoidal_table
from llmfn.layers.remat import remat
from llmfn.model_config import ModelConfig
from llmfn.model_params import init_cache, init_params, param_shapes

__all__ = [  # init_params, param_shapes and init_cache live in llmfn.model_params
    "IGNORE_INDEX",
    "DecoderOutput",
    "ModelOutput",
    "apply",
    "count_params",
    "cross_entropy",
    "decoder",
    "embed",
    "flops_per_token",
    "forward",
    "forward_cached",
    "forward_with_aux",
    "head",
    "head_cross_entropy",
    "init_cache",
    "init_params",
    "loss",
    "matmul_params_per_token",
    "param_shapes",
]


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V]
    cache: TensorDict | None  # the updated KV cache, when one was passed in
    losses: dict[str, torch.Tensor]  # MoE losses averaged over layers (empty for dense models)


def token_slots(tokens: torch.Tensor, cache_start: torch.Tensor | None) -> torch.Tensor:
    """[T] long: the cache slots (or, without a cache, the positions) of tokens [B, T]:
    cache_start + t, from 0 without a cache."""
    start = 0 if cache_start is None else cache_start
    return torch.arange(tokens.shape[1], device=tokens.device) + start


def default_positions(
    tokens: torch.Tensor, attention_mask: torch.Tensor | None, cache_start: torch.Tensor | None
) -> torch.Tensor:
    """[B, T] positions: start + t, or the count of real tokens before t when padding is masked
    (so left-padded rows start at 0); start = cache_start (0-d long), 0 without a cache. With a
    cache the mask is over slots, and the positions are read at slots start .. start + T - 1
    (so cached decode matches the uncached forward)."""
    slots = token_slots(tokens, cache_start)
    if attention_mask is None:
        return slots.expand(tokens.shape)
    real_before = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, T or max_len]
    return real_before.index_select(1, slots)


def token_mask(
    attention_mask: torch.Tensor | None,
    tokens: torch.Tensor,
    cache: TensorDict | None,
    cache_start: torch.Tensor | None,
) -> torch.Tensor | None:
    """The attention_mask at the tokens being run: [B, T] (with a cache, the [B, max_len] slot
    mask read at slots cache_start .. cache_start + T - 1), or None without a mask."""
    if attention_mask is None or cache is None:
        return attention_mask
    return attention_mask.index_select(1, token_slots(tokens, cache_start))


def embed(
    params: TensorDict, tokens: torch.Tensor, positions: torch.Tensor, cfg: ModelConfig
) -> torch.Tensor:
    """tokens, positions: [B, T] -> [B, T, D]: token embedding plus absolute positions, if any."""
    x = F.embedding(tokens, params["embed", "weight"])
    if cfg.position == "learned":
        x = x + F.embedding(positions, params["pos", "weight"])
    elif cfg.position == "sinusoidal":
        x = x + sinusoidal_table(positions, cfg.hidden_size, x.dtype).to(x.dtype)
    return x


def checkpointed_block(
    layer: TensorDict,
    x: torch.Tensor,
    cfg: ModelConfig,
    *,
    positions: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    key_valid: torch.Tensor | None,
    token_valid: torch.Tensor | None,
    dropout_key: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`block` without a cache, its activations recomputed in the backward (`layers.remat`), so
    it works under torch.func.grad / vmap and torch.compile. x: [B, T, D] -> (x, MoE losses)."""
    flat = layer.flatten_keys(".")
    names = list(flat.keys())
    options = {"key_valid": key_valid, "token_valid": token_valid, "dropout_key": dropout_key}
    option_names = [option for option, value in options.items() if value is not None]
    rope = () if rope is None else tuple(rope)
    loss_names = ("moe_aux_loss", "router_z_loss") if cfg.use_moe else ()

    def run(h, *tensors):
        leaves, (pos, *rest) = tensors[: len(names)], tensors[len(names) :]
        angles, option_values = tuple(rest[: len(rope)]), rest[len(rope) :]
        params = TensorDict(dict(zip(names, leaves, strict=True)), []).unflatten_keys(".")
        options = dict(zip(option_names, option_values, strict=True))
        out, _, losses = block(params, h, cfg, positions=pos, rope=angles or None, **options)
        return (out, *(losses[loss_name] for loss_name in loss_names))

    constants = [positions, *rope, *(options[option] for option in option_names)]
    out, *loss_values = remat(run, [x, *flat.values()], constants)
    return out, dict(zip(loss_names, loss_values, strict=True))


class DecoderOutput(NamedTuple):
    hidden: torch.Tensor  # [B, T, D], the last block's output (before the final norm)
    cache: TensorDict | None  # the updated KV cache, when one was passed in
    losses: dict[str, torch.Tensor]  # MoE losses averaged over layers (empty for dense models)


def decoder(
    params: TensorDict,
    tokens: torch.Tensor,
    cfg: ModelConfig,
    *,
    positions: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    cache: TensorDict | None = None,
    cache_start: torch.Tensor | None = None,
    training: bool = False,
    rng: torch.Tensor | None = None,
) -> DecoderOutput:
    """The model up to its head: tokens [B, T] long -> hidden states [B, T, D].

    positions: [B, T] (default: see `default_positions`). attention_mask: 1 for real tokens,
    0 for padding; [B, T], or [B, max_len] over the cache slots when a cache is given.
    cache / cache_start: a tree from `init_cache` and the first slot this call writes (0-d long).
    training + rng (an int64 key: 0-d, or one per row [B] for masks that do not depend on the
    rest of the batch): dropout, as a pure function of the key.
    Misfit inputs or params raise a ValueError naming them (`check_inputs`).
    """
    check_inputs(
        params,
        tokens,
        cfg,
        attention_mask=attention_mask,
        cache=cache,
        positions=positions,
        cache_start=cache_start,
    )
    if training and cfg.dropout > 0:
        check_rng(rng, tokens.shape[0])
    if positions is None:
        positions = default_positions(tokens, attention_mask, cache_start)
    dropout_key = rng if training and cfg.dropout > 0 else None
    x = dropout(embed(params, tokens, positions, cfg), cfg.dropout, dropout_key)
    rope = rope_angles(positions, cfg, x.dtype) if cfg.position == "rope" else None  # once
    # MoE routing leaves padding out of its losses and capacity (dense blocks need no mask)
    token_valid = token_mask(attention_mask, tokens, cache, cache_start) if cfg.use_moe else None

    new_layers, layer_losses = {}, []
    for i in range(cfg.num_layers):
        name = str(i)
        layer_cache = None if cache is None else cache["layers", name]
        layer_key = None if dropout_key is None else fold_in(dropout_key, i + 1)
        layer_inputs = dict(
            positions=positions,
            rope=rope,
            key_valid=attention_mask,
            token_valid=token_valid,
            dropout_key=layer_key,
        )
        if cfg.activation_checkpointing and cache is None and torch.is_grad_enabled():
            x, losses = checkpointed_block(params["layers", name], x, cfg, **layer_inputs)
        else:
            x, layer_cache, losses = block(
                params["layers", name],
                x,
                cfg,
                cache=layer_cache,
                cache_start=cache_start,
                **layer_inputs,
            )
        new_layers[name] = layer_cache
        layer_losses.append(losses)
    new_cache = None if cache is None else TensorDict({"layers": TensorDict(new_layers, [])}, [])
    return DecoderOutput(x, new_cache, mean_over_layers(layer_losses))


def head(params: TensorDict, cfg: ModelConfig) -> tuple[TensorDict | None, torch.Tensor]:
    """(the final norm's params, or None for a post-norm model; the head's weight [V, D])."""
    weight = params["embed", "weight"] if cfg.tie_embeddings else params["lm_head", "weight"]
    return (params["final_norm"] if cfg.norm_position == "pre" else None), weight


def apply(
    params: TensorDict,
    tokens: torch.Tensor,
    cfg: ModelConfig,
    *,
    last_logits_only: bool = False,
    **options,
) -> ModelOutput:
    """The full model: tokens [B, T] long -> logits [B, T, V], the new cache, the MoE losses.

    Options (positions, attention_mask, cache, cache_start, training, rng) as in `decoder`.
    last_logits_only: logits of the last position only ([B, 1, V]; a prefill needs no more).
    """
    x, cache, losses = decoder(params, tokens, cfg, **options)
    if last_logits_only:
        x = x[:, -1:]
    final_norm, weight = head(params, cfg)
    logits = normed_linear(final_norm, x, weight, None, cfg)  # the norm's output not kept
    return ModelOutput(logits, cache, losses)


def mean_over_layers(layer_losses: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-layer MoE losses [{name: 0-d tensor}] -> {name: their mean over the layers} ({} for
    a dense model, whose layers have none)."""
    if not layer_losses or not layer_losses[0]:
        return {}
    names = layer_losses[0]
    return {name: torch.stack([losses[name] for losses in layer_losses]).mean() for name in names}


def forward(params: TensorDict, tokens: torch.Tensor, cfg: ModelConfig, **options) -> torch.Tensor:
    """tokens: [B, T] -> logits [B, T, V]. Options as in `apply` (positions, attention_mask,
    training, rng)."""
    return apply(params, tokens, cfg, **options).logits


def forward_with_aux(
    params: TensorDict, tokens: torch.Tensor, cfg: ModelConfig, **options
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Like `forward`, plus the MoE losses {"moe_aux_loss", "router_z_loss"} (empty if dense)."""
    out = apply(params, tokens, cfg, **options)
    return out.logits, out.losses


def forward_cached(
    params: TensorDict,
    tokens: torch.Tensor,
    cfg: ModelConfig,
    cache: TensorDict,
    cache_start: torch.Tensor,
    **options,
) -> tuple[torch.Tensor, TensorDict]:
    """Run tokens [B, T] at cache slots cache_start.. and return (logits [B, T, V], new cache).

    attention_mask, if given, is [B, max_len] over the cache slots (0 = padding)."""
    out = apply(params, tokens, cfg, cache=cache, cache_start=cache_start, **options)
    return out.logits, out.cache


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V], targets [B, T] (IGNORE_INDEX = no loss) -> (mean loss, token count)."""
    count = (targets != IGNORE_INDEX).sum()
    logits = logits.flatten(0, 1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays
    total = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / count.clamp(min=1), count


def head_cross_entropy(
    params: TensorDict, hidden: torch.Tensor, targets: torch.Tensor, cfg: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cross_entropy` of the head's logits for hidden [B, T, D] (the `decoder`'s output),
    computed `cfg.loss_chunk_size` rows at a time without keeping the logits
    (`layers.linear_cross_entropy`) -> (mean loss, token count)."""
    count = (targets != IGNORE_INDEX).sum()
    final_norm, weight = head(params, cfg)
    h = hidden if final_norm is None else norm(final_norm, hidden, cfg)
    total = linear_cross_entropy(h, weight, targets, cfg.loss_chunk_size)
    return total / count.clamp(min=1), count


def loss(
    params: TensorDict,
    batch: dict,
    cfg: ModelConfig,
    *,
    training: bool = False,
    rng: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token loss of batch {"inputs": [B, T], "targets": [B, T], optional "attention_mask"}.

    targets are the inputs shifted by one with IGNORE_INDEX (-100) where no loss is wanted, of
    any integer dtype (int32 ids are widened to int64). The targets alone decide what is
    scored, as HF's labels do: attention_mask ([B, T], 1 = real token, 0 = padding) changes
    what the tokens attend to (and MoE routing), not the loss, so set the targets at padding
    to IGNORE_INDEX, or a padded position is scored like any other.
    Returns (loss, metrics): loss = cross-entropy + the weighted MoE losses; metrics hold
    "ce_loss", "tokens" and the MoE losses, all tensors. With `cfg.loss_chunk_size` the head
    and the cross-entropy run fused over row chunks (`head_cross_entropy`).
    """
    if not isinstance(batch, Mapping) or not {"inputs", "targets"} <= batch.keys():
        got = type(batch).__name__ if not isinstance(batch, Mapping) else sorted(batch)
        raise ValueError(
            f'loss takes a batch {{"inputs": [B, T], "targets": [B, T]}}, got {got} (forward '
            "takes the token ids)"
        )
    inputs, targets = batch["inputs"], batch["targets"]
    if targets.shape != inputs.shape:
        shapes = f"targets {list(targets.shape)}, inputs {list(inputs.shape)}"  # one f-string
        raise ValueError(f"{shapes}: expected targets of the inputs' shape [B, T] (the next ids)")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(
            f"targets must be integer token ids (any int dtype; {IGNORE_INDEX} = no loss), "
            f"got {targets.dtype}"
        )
    targets = targets.long()  # the cross-entropy kernels take int64 only; int64 is not copied
    if not torch.compiler.is_compiling():
        expected = f"targets must be in [0, model.vocab_size={cfg.vocab_size}) or {IGNORE_INDEX}"
        check_range(targets.masked_fill(targets == IGNORE_INDEX, 0), cfg.vocab_size, expected)
    options = dict(attention_mask=batch.get("attention_mask"), training=training, rng=rng)
    if cfg.loss_chunk_size:
        hidden, _, aux = decoder(params, inputs, cfg, **options)
        ce, count = head_cross_entropy(params, hidden, targets, cfg)
    else:
        logits, aux = forward_with_aux(params, inputs, cfg, **options)
        ce, count = cross_entropy(logits, targets)
    total = ce
    if aux:
        total = (
            total
            + cfg.moe_aux_loss_coef * aux["moe_aux_loss"]
            + cfg.router_z_loss_coef * aux["router_z_loss"]
        )
    return total, {
        "ce_loss": ce.detach(),
        "tokens": count,
        **{k: v.detach() for k, v in aux.items()},
    }


def count_params(params: TensorDict) -> int:
    """Total number of parameters in the tree."""
    return sum(leaf.numel() for leaf in params.values(include_nested=True, leaves_only=True))


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights touched by one token's matmuls (active experts only; LM head included, the
    embedding lookup not)."""
    D, hd = cfg.hidden_size, cfg.head_dim
    attn = D * (cfg.num_heads + 2 * cfg.kv_heads) * hd + cfg.num_heads * hd * D
    mlp_one = (3 if cfg.use_glu else 2) * D * cfg.ffn_size
    if cfg.use_moe:
        ff = cfg.num_experts * D + (cfg.top_k + cfg.num_shared_experts) * mlp_one
    else:
        ff = mlp_one
    return cfg.num_layers * (attn + ff) + cfg.vocab_size * D


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6·N_matmul + 12·L·H·hd·T (PaLM / torchtitan, full attention)."""
    return (
        6 * matmul_params_per_token(cfg)
        + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    )
