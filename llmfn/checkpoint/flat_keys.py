"""A TensorDict as the flat {"a.b.c": tensor} map that a safetensors file stores."""

from __future__ import annotations

import torch
from tensordict import TensorDict


def _leaf_name(key: str | tuple[str, ...]) -> str:
    parts = (key,) if isinstance(key, str) else key
    for part in parts:
        if "." in part or not part:
            raise ValueError(
                f"tensor key {'/'.join(parts)!r}: names must be non-empty and contain no '.'"
            )
    return ".".join(parts)


def flat_tensors(tree: TensorDict) -> dict[str, torch.Tensor]:
    """{"a.b.c": tensor} for every leaf of `tree`, in the tree's order."""
    flat = {}
    for key, leaf in tree.items(include_nested=True, leaves_only=True):
        name = _leaf_name(key)
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"tensor key {name!r} holds a {type(leaf).__name__}: checkpoints store tensors only"
            )
        flat[name] = leaf
    return flat
