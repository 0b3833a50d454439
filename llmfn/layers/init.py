"""Weight initialisers shared by the layers: plain tensors drawn from one CPU generator."""

import torch


def normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    """N(0, std²) of `shape`, drawn on CPU so that a seed gives the same weights on any device."""
    return torch.randn(shape, generator=gen) * std


def zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


def ones(*shape: int) -> torch.Tensor:
    return torch.ones(shape)
