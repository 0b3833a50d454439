"""Metric tensors from the train step as plain Python floats (the host sync happens here)."""

from __future__ import annotations

import math
from numbers import Real

import torch


def to_floats(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """{name: float} for every one-element tensor or real number in `metrics`, in order.

    Multi-element tensors (e.g. per-expert loads) and non-numbers are left out. Each `.item()`
    waits for the device, so call this only on steps that are logged.
    """
    floats = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() == 1:
                floats[name] = float(value.detach().reshape(()).item())
        elif isinstance(value, Real) and not isinstance(value, bool):
            floats[name] = float(value)
    return floats


def finite_or_none(value: float) -> float | None:
    """`value`, or None for NaN/inf (strict JSON has no NaN)."""
    return value if math.isfinite(value) else None
