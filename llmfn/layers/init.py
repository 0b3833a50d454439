"""Weight initialisers shared by the layers: plain tensors drawn from one CPU generator."""

import math

import torch

from llmfn.model_config import ModelConfig


def normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    """N(0, std²) of `shape`, drawn on CPU so that a seed gives the same weights on any device."""
    return torch.randn(shape, generator=gen) * std


def residual_std(cfg: ModelConfig) -> float:
    """The init std of a projection into the residual stream (attention wo, MLP w2):
    init_std / √(2·num_layers), so the stream's variance stays put with depth (GPT-2)."""
    return cfg.init_std / math.sqrt(2 * cfg.num_layers)


def zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


def ones(*shape: int) -> torch.Tensor:
    return torch.ones(shape)
