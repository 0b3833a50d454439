"""Multi-head attention with MHA / GQA / MQA through SDPA: causal, padding mask, sliding window,
RoPE or ALiBi, and a preallocated KV cache.

params: {"wqkv": [(H + 2·KV)·hd, D], "wo": [D, H·hd]} (+ "bqkv" [(H + 2·KV)·hd] with
attention_bias True or "qkv", "bo" [D] with attention_bias True).
The fused q/k/v weight is one matmul (DESIGN.md §3); `llmfn.hf` splits and joins it.
"""

import contextlib

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmfn.layers.decode_attention import decode_attention, kernel_serves
from llmfn.layers.init import normal, residual_std, zeros
from llmfn.layers.linear import linear
from llmfn.layers.norm import normed_linear
from llmfn.layers.positions import alibi_bias, apply_rope, rope_angles
from llmfn.layers.recomputed_input import first_order_only
from llmfn.model_config import ModelConfig


def init_attention(cfg: ModelConfig, gen: torch.Generator) -> TensorDict:
    qkv_out = (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim
    leaves = {
        "wqkv": normal((qkv_out, cfg.hidden_size), cfg.init_std, gen),
        "wo": normal((cfg.hidden_size, cfg.num_heads * cfg.head_dim), residual_std(cfg), gen),
    }
    if cfg.qkv_bias:
        leaves["bqkv"] = zeros(qkv_out)
    if cfg.output_bias:
        leaves["bo"] = zeros(cfg.hidden_size)
    return TensorDict(leaves, batch_size=[])


def attention_mask(
    q_slots: torch.Tensor, num_keys: int, key_valid: torch.Tensor | None, window: int | None
) -> torch.Tensor:
    """Which keys each query may see: [B or 1, 1, Tq, Tk] bool.

    q_slots: [Tq] cache slots of the queries; key j is visible when j <= q (causal), q - j <
    window (sliding), and key_valid[:, j] (padding). A query always sees itself, so a padding
    query never has an empty row (which would make SDPA return NaN).
    """
    k_slots = torch.arange(num_keys, device=q_slots.device)
    q = q_slots[:, None]
    allowed = k_slots[None, :] <= q
    if window is not None:
        allowed = allowed & (q - k_slots[None, :] < window)
    allowed = allowed[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :].bool()
    return allowed | (k_slots[None, :] == q)[None, None]


def split_heads(
    qkv: torch.Tensor, cfg: ModelConfig, *, copy_v: bool = False
) -> tuple[torch.Tensor, ...]:
    """qkv: [B, T, (H + 2·KV)·hd] -> q [B, H, T, hd], k and v [B, KV, T, hd]: views of qkv,
    v a copy with copy_v (what SDPA keeps for its backward then keeps only v's values, not
    all of qkv's, when q and k are fresh tensors: RoPE's)."""
    B, T, _ = qkv.shape
    hd = cfg.head_dim
    q, k, v = qkv.split([cfg.num_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd], dim=-1)
    v = v.view(B, T, cfg.kv_heads, hd)
    return (
        q.view(B, T, cfg.num_heads, hd).transpose(1, 2),
        k.view(B, T, cfg.kv_heads, hd).transpose(1, 2),
        (v.contiguous() if copy_v else v).transpose(1, 2),
    )


def written_slots(
    k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, end: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """On CPU, the cache k, v [B, KV, max_len, hd] and key_valid [B, max_len] cut to the slots
    written so far (0..end-1, end a 0-d tensor): the later ones are masked for every query, so
    attention then costs the tokens so far rather than the preallocated length. Elsewhere the
    whole cache: on other devices reading `end` would sync with the host, and under
    torch.compile it needs `capture_scalar_outputs` (llmfn's compiled decode sets it; a
    graph compiled without it keeps the full cache rather than break)."""
    if k.device.type != "cpu" or (
        torch.compiler.is_compiling() and not torch._dynamo.config.capture_scalar_outputs
    ):
        return k, v, key_valid
    n = int(end)
    torch._check(n >= 1)
    torch._check(n <= k.shape[2])
    key_valid = None if key_valid is None else key_valid[:, :n]
    return k[:, :, :n], v[:, :, :n], key_valid


def write_cache(
    cache: TensorDict, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> TensorDict:
    """The cache {"k", "v"}, each [B, KV, max_len, hd], with k and v [B, KV, T, hd] written at
    slots [T] (in the cache's dtype)."""
    return TensorDict(
        {
            "k": cache["k"].index_copy(2, slots, k.to(cache["k"].dtype)),
            "v": cache["v"].index_copy(2, slots, v.to(cache["v"].dtype)),
        },
        batch_size=cache.batch_size,
    )


def attention_bias(
    q_slots: torch.Tensor,
    num_keys: int,
    key_valid: torch.Tensor | None,
    cfg: ModelConfig,
    *,
    cached: bool,
    batch_size: int,
    dtype: torch.dtype,
    positions: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """What SDPA's attn_mask gets for queries at cache slots q_slots [Tq] over keys 0 .. Tk - 1
    (Tk = num_keys; key_valid: [B, Tk] bool or None, False at padding):

    - None for plain causal attention over the call's own tokens (no cache, padding or sliding
      window): SDPA's is_causal does it without a mask;
    - else the bool mask [B or 1, 1, Tq, Tk] of `attention_mask`, True where a query sees a key;
    - with ALiBi, an additive float bias [B, H, Tq, Tk] of `dtype` (B = batch_size):
      -slope · (q - k) where the query sees the key, -inf elsewhere. q and k are the tokens'
      positions [B, T] without a cache (keys are the call's own tokens), so a `positions`
      option moves ALiBi as it moves RoPE; with a cache they are slots, as the cache keeps no
      key positions: the same distances for the default positions (and left padding), but
      custom positions change nothing there.

    A cache always needs the explicit mask: its queries sit at slots past the first key, which
    is_causal (aligned to the top left) does not know.
    """
    if cfg.position == "alibi":
        visible = attention_mask(q_slots, num_keys, key_valid, cfg.sliding_window)
        if cached or positions is None:
            q_pos = q_slots[None].expand(batch_size, q_slots.shape[0])
            k_pos = torch.arange(num_keys, device=q_slots.device)[None].expand(batch_size, -1)
        else:
            q_pos = k_pos = positions
        bias = alibi_bias(q_pos, k_pos, cfg.num_heads)
        return bias.to(dtype).masked_fill(~visible, float("-inf"))
    if not cached and key_valid is None and cfg.sliding_window is None:
        return None
    return attention_mask(q_slots, num_keys, key_valid, cfg.sliding_window)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: ModelConfig,
    *,
    cached: bool,
) -> torch.Tensor:
    """q [B, H, Tq, hd], k and v [B, KV, Tk, hd], bias from `attention_bias` -> [B, H, Tq, hd].

    The CPU decode kernel (`llmfn.layers.decode_attention`) for cached steps it serves, SDPA
    (causal when bias is None) everywhere else: on its math backend under `hessian`,
    `jacrev(grad)` or `jvp`, as the fused kernels have no second or forward-mode derivative.
    Plain autograd's second derivatives (`torch.autograd.grad(..., create_graph=True)`,
    `torch.autograd.functional.hvp`) cannot be seen from the forward: run them (forward and
    gradient calls) under `sdpa_kernel(SDPBackend.MATH)`, or take them with torch.func."""
    if cached and kernel_serves(q, bias):
        return decode_attention(q, k, v, bias)
    backends = contextlib.nullcontext() if first_order_only() else sdpa_kernel(SDPBackend.MATH)
    with backends:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias,
            is_causal=bias is None,
            enable_gqa=cfg.kv_heads != cfg.num_heads,
        )


def attention(
    params: TensorDict,
    x: torch.Tensor,
    cfg: ModelConfig,
    *,
    positions: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    key_valid: torch.Tensor | None = None,
    cache: TensorDict | None = None,
    cache_start: torch.Tensor | None = None,
    input_norm: TensorDict | None = None,
) -> tuple[torch.Tensor, TensorDict | None]:
    """x: [B, T, D] -> ([B, T, D], updated cache or None).

    positions: [B, T] token positions (RoPE; ALiBi's distances without a cache). rope: `rope_angles(positions, cfg)` when the
    caller has them (a model computes them once for all its layers). key_valid: [B, Tk] bool,
    False at padding (Tk = T without a cache, the cache length with one). cache: {"k", "v"} each
    [B, KV, max_len, hd]; this call writes slots cache_start .. cache_start + T - 1.
    input_norm: the params of a norm to apply to x first (a pre-norm block's); its output is
    recomputed in the backward rather than kept (`llmfn.layers.recomputed_input`).
    """
    B, T, _ = x.shape
    qkv = normed_linear(input_norm, x, params["wqkv"], params.get("bqkv"), cfg)
    rope_training = cfg.position == "rope" and cache is None and torch.is_grad_enabled()
    q, k, v = split_heads(qkv, cfg, copy_v=rope_training)
    if cfg.position == "rope":
        cos, sin = rope_angles(positions, cfg, x.dtype) if rope is None else rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    start = (
        torch.zeros((), dtype=torch.long, device=x.device) if cache_start is None else cache_start
    )
    q_slots = start + torch.arange(T, device=x.device)
    if cache is not None:
        cache = write_cache(cache, q_slots, k, v)
        k, v, key_valid = written_slots(cache["k"], cache["v"], key_valid, start + T)

    bias = attention_bias(
        q_slots,
        k.shape[2],
        key_valid,
        cfg,
        cached=cache is not None,
        batch_size=B,
        dtype=q.dtype,
        positions=positions,
    )
    out = attend(q, k.to(q.dtype), v.to(q.dtype), bias, cfg, cached=cache is not None)
    out = out.transpose(1, 2).reshape(B, T, cfg.num_heads * cfg.head_dim)
    return linear(out, params["wo"], params.get("bo")), cache
