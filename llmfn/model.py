"""The decoder as pure functions over a TensorDict of parameters.

    params = init_params(cfg, seed=0)           # TensorDict: embed, layers/0/attn/wqkv, ...
    logits = forward(params, tokens, cfg)       # tokens [B, T] -> logits [B, T, V]
    value, metrics = loss(params, batch, cfg)   # next-token cross-entropy (+ MoE losses)

Every function here works under `torch.func.grad`, `torch.func.vmap` and `torch.compile`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase
from torch._subclasses.fake_tensor import is_fake

from llmfn.layers.block import block, init_block
from llmfn.layers.dropout import dropout, fold_in
from llmfn.layers.init import normal
from llmfn.layers.linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy
from llmfn.layers.norm import init_norm, norm, normed_linear
from llmfn.layers.positions import init_learned_positions, rope_angles, sinusoidal_table
from llmfn.layers.remat import remat
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


def _leaf_shapes(
    tree: TensorDictBase, prefix: str = "", shapes: dict | None = None
) -> dict[str, tuple[int, ...]]:
    """{"a.b": shape} of a tree's leaves in order (a plain walk, several times cheaper than
    `items(include_nested=True)`: it runs on every eager call)."""
    shapes = {} if shapes is None else shapes
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            shapes[prefix + key] = tuple(value.shape)
        else:
            _leaf_shapes(value, f"{prefix}{key}.", shapes)
    return shapes


def check_params(params: TensorDict, cfg: ModelConfig) -> None:
    """Raise a ValueError naming the first difference between the leaves of params and those of
    `init_params(cfg)` (`param_shapes`): the layer count, a missing or extra leaf (lm_head with
    tie_embeddings, pos without learned positions) or a shape (e.g. a fused wqkv of other head
    counts). A `decode_weights` panel leaf [P, in, 8] counts as its [P·8, in] weight. Trees of
    the same shapes pass: 2 heads of 16 and 4 heads of 8 cannot be told apart."""
    expected, given = param_shapes(cfg), _leaf_shapes(params)
    if given.keys() != expected.keys():
        layers = {key.split(".")[1] for key in given if key.startswith("layers.")}
        if len(layers) != cfg.num_layers:
            raise ValueError(
                f"params has {len(layers)} layers but model.num_layers={cfg.num_layers}"
            )
        missing = [key for key in expected if key not in given]
        extra = [key for key in given if key not in expected]
        raise ValueError(
            f"params do not match the model config: missing {missing}, unexpected {extra} "
            "(compared with init_params(cfg); check model.tie_embeddings, position, norm_*, *_bias)"
        )
    for key, shape in expected.items():
        actual = given[key]
        if len(actual) == 3 and len(shape) == 2:  # decode_weights' panels [P, in, width]
            actual = (actual[0] * actual[2], actual[1])
        if actual != shape:
            raise ValueError(
                f"params {key!r} has shape {list(given[key])} but the model config gives "
                f"{list(shape)} (hidden_size={cfg.hidden_size}, num_heads={cfg.num_heads}, "
                f"kv_heads={cfg.kv_heads}, ffn_size={cfg.ffn_size}, vocab_size={cfg.vocab_size})"
            )


def check_inputs(
    params: TensorDict,
    tokens: torch.Tensor,
    cfg: ModelConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    cache: TensorDict | None = None,
    positions: torch.Tensor | None = None,
    cache_start: torch.Tensor | None = None,
) -> None:
    """Raise a ValueError naming the argument when `decoder` cannot run its inputs: params not a
    nested TensorDict (`check_param_tree`), tokens not [B, T] int64/int32 (`check_tokens`),
    T > max_seq_len with learned positions, an attention_mask not [B, T] (or [B, max_len] with
    a cache) bool or 0/1 integers (`check_attention_mask`), positions not [B, T] or [1, T]
    (`check_positions`), a cache of another batch size or too few slots (`check_cache`), a
    stacked (ensemble) tree outside vmap, params that do not fit cfg (`check_params`), a token
    id outside the vocabulary, with learned positions a position outside the table
    (`check_learned_positions`).

    The shape and dtype checks read static metadata only (torch.compile traces them away: no
    graph break, no recompile). The params walk runs in eager only; so do the checks of ids,
    mask values, positions and cache slots, which read values (a host sync): on CPU only,
    outside vmap, not on fake tensors (`can_read_values`)."""
    check_param_tree(params)
    check_tokens(tokens)
    if params.batch_dims:
        raise ValueError(
            f"params has batch_size {list(params.batch_size)} (a stacked ensemble): run it under "
            "torch.func.vmap, e.g. vmap(lambda p: forward(p, tokens, cfg))(params)"
        )
    seq_len = tokens.shape[1]
    if cfg.position == "learned" and seq_len > cfg.max_seq_len:
        raise ValueError(
            f"tokens [B, T={seq_len}] exceed model.max_seq_len={cfg.max_seq_len} "
            "(learned positions)"
        )
    if attention_mask is not None:
        check_attention_mask(attention_mask, tokens, cache)
    if positions is not None:
        check_positions(positions, tokens)
    if cache is not None:
        check_cache(cache, tokens)
    if torch.compiler.is_compiling():
        return
    check_params(params, cfg)
    check_range(
        tokens, cfg.vocab_size, f"token ids must be in [0, model.vocab_size={cfg.vocab_size})"
    )
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        check_range(attention_mask, 2, "attention_mask must hold 1 (real token) or 0 (padding)")
    if cache is not None:
        check_cache_slots(cache, tokens, cache_start)
    if cfg.position == "learned":
        check_learned_positions(tokens, cfg, positions=positions, cache_start=cache_start)


def check_param_tree(params: TensorDict) -> None:
    """params must be a nested TensorDict, as `init_params` returns: not a dict (nested or
    flat), not a tree of dotted keys (`flatten_keys(".")`, which `check_params` would pass).
    The dotted-key walk runs in eager only."""
    if not isinstance(params, TensorDictBase):
        hint = (
            ": wrap a nested dict as TensorDict(params, batch_size=[]) (then "
            ".unflatten_keys('.') if its keys are dotted)"
            if isinstance(params, Mapping)
            else ""
        )
        raise ValueError(
            f"params must be a nested TensorDict as init_params returns, got "
            f"{type(params).__name__}{hint}"
        )
    if torch.compiler.is_compiling():
        return
    dotted = [key for key in params.keys() if "." in key]  # noqa: SIM118 (a TensorDict)
    if dotted:
        raise ValueError(
            f"params has dotted keys {dotted[:2]}...: a flat tree (flatten_keys('.')); pass "
            "params.unflatten_keys('.'), nested like init_params' params['embed', 'weight']"
        )


def check_tokens(tokens: torch.Tensor) -> None:
    """tokens: a [B, T] int64 or int32 tensor (a hint for [T] rows under vmap, and for a
    batch dict, which `loss` takes and `forward` does not)."""
    if not isinstance(tokens, torch.Tensor):
        hint = (
            ": forward takes the ids (batch['inputs']); loss takes the batch dict"
            if isinstance(tokens, Mapping)
            else ""
        )
        raise ValueError(
            f"tokens must be a [B, T] tensor of ids, got {type(tokens).__name__}{hint}"
        )
    if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        vmap_hint = (
            ": under vmap over examples, run the model on tokens[None], or vmap over the "
            "leading dim of a [N, B, T] batch"
            if tokens.ndim == 1
            else ""
        )
        shape = list(tokens.shape)  # one f-string: dynamo cannot add str to str
        raise ValueError(
            f"tokens must be [B, T] int64 (or int32) ids, got {shape} {tokens.dtype}{vmap_hint}"
        )


def check_attention_mask(
    attention_mask: torch.Tensor, tokens: torch.Tensor, cache: TensorDict | None
) -> None:
    """attention_mask: [B, T] (tokens [B, T]), or [B, max_len] over the cache's slots; bool or
    integer, 1 (True) = real token, 0 = padding. A float mask is refused: an additive one
    (0 = keep, -inf = masked, as inside HF models) would be read inverted."""
    batch_size, seq_len = tokens.shape
    slots = seq_len if cache is None else cache["layers", "0", "k"].shape[2]
    if tuple(attention_mask.shape) != (batch_size, slots):
        expected = "[B, T] like tokens" if cache is None else "[B, max_len] of the cache"
        raise ValueError(
            f"attention_mask {list(attention_mask.shape)} does not fit tokens "
            f"{list(tokens.shape)}: expected {expected}, {[batch_size, slots]}"
        )
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise ValueError(
            f"attention_mask must be bool or integer, 1 = real token, 0 = padding, got "
            f"{attention_mask.dtype}: an additive float mask (0 = keep, -inf = masked) means "
            "the opposite; pass (mask == 0) for one of those, mask.long() for a float 0/1 mask"
        )


def check_positions(positions: torch.Tensor, tokens: torch.Tensor) -> None:
    """positions: [B, T] like tokens [B, T], or [1, T] for every row (HF's position_ids)."""
    batch_size, seq_len = tokens.shape
    if (
        positions.ndim != 2
        or positions.shape[0] not in (1, batch_size)
        or (positions.shape[1] != seq_len)
    ):
        hint = ": pass positions[None] for one [T] row of positions" if positions.ndim == 1 else ""
        raise ValueError(
            f"positions must be [B, T] (or [1, T]) like tokens {list(tokens.shape)}, got "
            f"{list(positions.shape)}{hint}"
        )


def check_cache(cache: TensorDict, tokens: torch.Tensor) -> None:
    """The cache's batch size [B, KV, max_len, hd] is the tokens' [B, T] (static shapes)."""
    cache_batch = cache["layers", "0", "k"].shape[0]
    if cache_batch != tokens.shape[0]:
        raise ValueError(
            f"cache has batch size {cache_batch} but tokens are {list(tokens.shape)}: build "
            f"it with init_cache(cfg, batch_size={tokens.shape[0]}, max_len)"
        )


def check_cache_slots(
    cache: TensorDict, tokens: torch.Tensor, cache_start: torch.Tensor | int | None
) -> None:
    """cache_start + T <= the cache's max_len: the call writes slots cache_start ..
    cache_start + T - 1. Eager, where cache_start can be read (`can_read_values`)."""
    if isinstance(cache_start, torch.Tensor) and not can_read_values(cache_start):
        return
    start = 0 if cache_start is None else int(cache_start)
    max_len, seq_len = cache["layers", "0", "k"].shape[2], tokens.shape[1]
    if start < 0 or start + seq_len > max_len:
        raise ValueError(
            f"cache_start={start} + T={seq_len} tokens do not fit the cache's max_len={max_len} "
            f"slots: init_cache(cfg, batch_size, max_len) with max_len >= {start + seq_len}"
        )


def check_rng(rng: torch.Tensor | None, batch_size: int) -> None:
    """The dropout key of forward(training=True): an int64 tensor, 0-d or [B]."""
    if rng is None:
        raise ValueError(
            "forward(training=True) with model.dropout > 0 needs rng= (an int64 key tensor: 0-d, "
            "or one key per row [B])"
        )
    if rng.dtype != torch.int64 or rng.shape not in ((), (batch_size,)):
        raise ValueError(
            f"rng must be an int64 key, 0-d or one per row [B={batch_size}], got "
            f"{list(rng.shape)} {rng.dtype}"
        )


def check_range(values: torch.Tensor, end: int, expected: str) -> None:
    """ValueError `expected` (with the values' range) when an integer tensor holds values
    outside [0, end); only where its values can be read without a sync (`can_read_values`)."""
    if can_read_values(values):
        low, high = torch.aminmax(values)
        if low < 0 or high >= end:
            raise ValueError(f"{expected}, got {int(low)} .. {int(high)}")


def can_read_values(tensor: torch.Tensor) -> bool:
    """Whether an eager check may read the tensor's values: on CPU (no device sync), not a
    vmap-batched wrapper, not empty, not a FakeTensor (FakeTensorMode, shape propagation)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor(tensor)
    readable = tensor.device.type == "cpu" and tensor.numel() > 0 and not wrapped
    return readable and not is_fake(tensor)


def check_learned_positions(
    tokens: torch.Tensor,
    cfg: ModelConfig,
    *,
    positions: torch.Tensor | None,
    cache_start: torch.Tensor | None,
) -> None:
    """Raise a ValueError naming the argument when a learned position would fall outside the
    table of model.max_seq_len rows: positions= (explicit) outside [0, max_seq_len), or, by
    default, the slots cache_start .. cache_start + T - 1 past it. Eager, reads values."""
    if positions is not None:
        expected = (
            f"positions must be in [0, model.max_seq_len={cfg.max_seq_len}) with learned positions"
        )
        check_range(positions, cfg.max_seq_len, expected)
    elif cache_start is not None and can_read_values(cache_start):
        end = int(cache_start) + tokens.shape[1]
        if end > cfg.max_seq_len:
            raise ValueError(
                f"cache_start={int(cache_start)} + T={tokens.shape[1]} tokens exceed "
                f"model.max_seq_len={cfg.max_seq_len} (learned positions): pass positions= "
                "within the table, or a larger max_seq_len"
            )


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
