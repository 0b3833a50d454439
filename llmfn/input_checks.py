"""The model's input checks: misfit params, tokens, masks, positions, caches and dropout keys
raise one ValueError naming the argument and what was expected (`check_inputs`, which
`llmfn.model.decoder` runs first).

Shape and dtype checks read static metadata, so torch.compile traces them away; checks that
read values (token ids, mask values, cache slots) run in eager on CPU only (`can_read_values`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tensordict import TensorDict, TensorDictBase
from torch._subclasses.fake_tensor import is_fake

from llmfn.model_config import ModelConfig
from llmfn.model_params import param_shapes


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
