"""Dropout from an explicit integer key, JAX style.

The mask is a hash of (key, element index), so it is a pure function of its inputs: the same
under eager, `torch.compile`, `vmap` and after a resume, with no global RNG state. The key
enters between two rounds of the hash, so the streams of two keys are unrelated (a key added
to the index would make every stream a shifted copy of the others).

Every op here is inlined into each kernel that reads a mask (torch.compile recomputes masks
rather than storing them), so keys are derived with as few rounds as will do: one round per
`fold_in`, and a multiply, not a hash, to fold a key's upper 32 bits in. Nested hashes here
cost minutes of inductor codegen per compile.
"""

import math

import torch

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor | int) -> torch.Tensor | int:
    """An avalanche hash of int64 values (tensors or ints) read as 32 bits; constants < 2³¹
    so products fit in int64."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x346CA68B) & _MASK32
    return x ^ (x >> 16)


def _key32(key: torch.Tensor) -> torch.Tensor:
    """32 bits of int64 keys that depend on all 64 (seeds s and s + 2³² differ)."""
    return (key ^ ((key >> 32) * 0x9E3779B1)) & _MASK32


def fold_in(key: torch.Tensor, salt: int | torch.Tensor) -> torch.Tensor:
    """A new int64 key derived from `key` and `salt` (like `jax.random.fold_in`); elementwise
    over tensors of keys and salts. One key's children are distinct for distinct salts in
    [0, 2³²)."""
    return _hash32(_key32(key) ^ _hash32(salt))


def uniform(key: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Floats in [0, 1) of `shape`, a pure function of the int64 `key`.

    key: 0-d (one stream for the whole tensor) or of shape `shape[:k]`: one stream per leading
    index, each the floats a 0-d key would give for `shape[k:]`.
    """
    inner = shape[key.ndim :]
    index = torch.arange(math.prod(inner), device=key.device, dtype=torch.int64).view(inner)
    stream = _key32(key).view(*key.shape, *(1 for _ in inner))
    bits = _hash32(_hash32(index) ^ stream)
    return (bits >> 8).float().mul(1.0 / (1 << 24))


def dropout(x: torch.Tensor, p: float, key: torch.Tensor | None) -> torch.Tensor:
    """Inverted dropout of `x` with probability `p`; identity when `key` is None or p == 0."""
    if key is None or p == 0.0:
        return x
    keep = uniform(key, x.shape) >= p
    return torch.where(keep, x / (1.0 - p), torch.zeros((), dtype=x.dtype, device=x.device))
