"""Position encodings: RoPE (with linear / dynamic-NTK / llama3 scaling), ALiBi, learned and
sinusoidal absolute embeddings."""

import math

import torch
from tensordict import TensorDict

from llmfn.layers.init import normal
from llmfn.model_config import ModelConfig


# --- RoPE -------------------------------------------------------------------------------------
def rope_angles(
    positions: torch.Tensor, cfg: ModelConfig, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [B, T] int -> (cos, sin), each [B, 1, T, head_dim] in float32, or in `dtype`
    where it is wider (float64 for a float64 model)."""
    pos, inv_freq = rope_frequencies(positions, cfg, dtype)
    angles = pos[..., None] * inv_freq  # [B, T, hd/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, hd]
    return cos_sin(angles)


def rope_frequencies(
    positions: torch.Tensor, cfg: ModelConfig, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The configured RoPE scaling, all in this one place: positions [B, T] int -> (scaled
    positions [B, T], inverse frequencies [head_dim/2]), both float32 (or `dtype` where it is
    wider), whose products are the rotary angles.

    None: theta^(-2i/hd). "linear": the positions divided by the factor. "llama3": the
    frequency bands of `llama3_inv_freq`. "dynamic": the grown base of `dynamic_ntk_inv_freq`.
    """
    dtype = torch.promote_types(dtype, torch.float32)
    pos = positions.to(dtype)
    if cfg.rope_scaling == "dynamic":
        return pos, dynamic_ntk_inv_freq(positions, cfg, dtype)
    inv_freq = rope_inv_freq(cfg.rope_theta, cfg.head_dim)
    if cfg.rope_scaling == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, cfg)
    elif cfg.rope_scaling == "linear":
        pos = pos / cfg.rope_scaling_factor
    return pos, inv_freq.to(dtype).to(positions.device)


def rope_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """[dim/2] float64 inverse frequencies theta^(-2i/dim), on CPU.

    Written with exp rather than pow: inductor keeps a reused value computed with exp, and
    recomputes one made of pow in each consumer (every layer's RoPE kernels, see
    docs/performance.md)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    return torch.exp(-math.log(theta) * exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3's band scaling of inv_freq [hd/2]: wavelengths longer than original /
    low_freq_factor are stretched by the factor, shorter than original / high_freq_factor kept,
    and those between interpolated smoothly."""
    factor = cfg.rope_scaling_factor
    original = cfg.rope_original_max_seq_len or cfg.max_seq_len
    low_wavelen = original / cfg.rope_low_freq_factor
    high_wavelen = original / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
    )
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, inv_freq)


def dynamic_ntk_inv_freq(
    positions: torch.Tensor, cfg: ModelConfig, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dynamic NTK: [hd/2] inverse frequencies of `dtype` (float32 or float64), on positions'
    device, of a base grown once the sequence (positions [B, T]) outruns the original context.

    The base depends on the positions, so it is computed here in `dtype`, and with HF's pow
    (`base ** exponents`), which matches HF's dynamic RoPE bit for bit where exp would not."""
    original = cfg.rope_original_max_seq_len or cfg.max_seq_len
    seq_len = torch.clamp(positions.max().to(dtype) + 1, min=original)
    dim = cfg.head_dim
    scale = cfg.rope_scaling_factor * seq_len / original - (cfg.rope_scaling_factor - 1)
    base = cfg.rope_theta * scale ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, device=positions.device, dtype=dtype) / dim
    return 1.0 / base**exponents


def cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(angles.cos(), angles.sin()); compiled on CPU, as one opaque op (`llmfn::cos_sin`).

    Inductor inlines a cheap pointwise value into each of its consumers, so every layer's q and
    k RoPE kernels, forward and backward, would compute cos and sin per element of q and k
    (vectorized sin/cos are dear on CPU: 4% of the 15M train step, bench/train_throughput.py).
    An op's outputs are buffers, computed once per step. GPU graphs keep plain cos and sin:
    there such elementwise kernels wait on memory rather than arithmetic (not measured).
    """
    if torch.compiler.is_compiling() and angles.device.type == "cpu" and not angles.requires_grad:
        return torch.ops.llmfn.cos_sin.default(angles)
    return _cos_sin(angles)


def _cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return angles.cos(), angles.sin()


torch.library.define("llmfn::cos_sin", "(Tensor angles) -> (Tensor, Tensor)")
torch.library.impl("llmfn::cos_sin", "default", _cos_sin)


@torch.library.register_fake("llmfn::cos_sin")
def _(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(angles), torch.empty_like(angles)


@torch.library.register_vmap("llmfn::cos_sin")
def _(info, in_dims: tuple, angles: torch.Tensor):
    return torch.ops.llmfn.cos_sin.default(angles), (in_dims[0], in_dims[0])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd], cos and sin: [B, 1, T, hd] (`rope_angles`) -> x rotated, [B, H, T, hd]
    in x's dtype (computed in at least float32). Rotate-half convention: dim i pairs with
    i + hd/2, as in HF."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    compute = torch.promote_types(x.dtype, torch.float32)
    return (x.to(compute) * cos + rotated.to(compute) * sin).to(x.dtype)


# --- ALiBi ------------------------------------------------------------------------------------
def alibi_slopes(num_heads: int) -> torch.Tensor:
    """[H] head slopes of Press et al. (geometric; interleaved for non-powers of two)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < num_heads:
        extra = 2.0 ** (-4.0 / closest)
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(q_pos: torch.Tensor, k_pos: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q_pos: [B, Tq], k_pos: [B, Tk] -> additive bias [B, H, Tq, Tk] = -slope · (q - k)."""
    slopes = alibi_slopes(num_heads).to(q_pos.device)
    distance = (q_pos[:, None, :, None] - k_pos[:, None, None, :]).float()
    return -slopes[None, :, None, None] * distance


# --- Absolute embeddings ----------------------------------------------------------------------
def init_learned_positions(cfg: ModelConfig, gen: torch.Generator) -> TensorDict:
    return TensorDict({"weight": normal((cfg.max_seq_len, cfg.hidden_size), cfg.init_std, gen)}, [])


def sinusoidal_table(
    positions: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """positions: [B, T] -> [B, T, dim] of Vaswani et al.'s sin/cos embeddings, in float32 (or
    `dtype` where it is wider: float64 for a float64 model)."""
    dtype = torch.promote_types(dtype, torch.float32)
    exponents = torch.arange(0, dim, 2, device=positions.device, dtype=dtype) / dim
    angles = positions.to(dtype)[..., None] / (10000.0**exponents)
    table = torch.stack([angles.sin(), angles.cos()], dim=-1)  # interleave sin, cos
    return table.flatten(-2)[..., :dim]
