"""Dropout from an explicit integer key, JAX style.

The mask is a hash of (key, salt, element index), so it is a pure function of its inputs: the
same under eager, `torch.compile`, `vmap` and after a resume, with no global RNG state.
"""

import torch

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """An avalanche hash of int64 values in [0, 2³²); constants < 2³¹ so products fit in int64."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x346CA68B) & _MASK32
    return x ^ (x >> 16)


def fold_in(key: torch.Tensor, salt: int | torch.Tensor) -> torch.Tensor:
    """A new 0-d int64 key derived from `key` and `salt` (like `jax.random.fold_in`)."""
    return _hash32(_hash32(key) + salt * 0x9E3779B1)


def uniform(key: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Floats in [0, 1) of `shape`, a pure function of the 0-d int64 `key`."""
    numel = 1
    for size in shape:
        numel *= size
    index = torch.arange(numel, device=key.device, dtype=torch.int64)
    bits = _hash32(_hash32(index + key * 0x632BE5AB))
    return (bits >> 8).float().mul(1.0 / (1 << 24)).view(shape)


def dropout(x: torch.Tensor, p: float, key: torch.Tensor | None) -> torch.Tensor:
    """Inverted dropout of `x` with probability `p`; identity when `key` is None or p == 0."""
    if key is None or p == 0.0:
        return x
    keep = uniform(key, x.shape) >= p
    return torch.where(keep, x / (1.0 - p), torch.zeros((), dtype=x.dtype, device=x.device))
