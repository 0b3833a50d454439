"""y = x · Wᵀ + b, for the two layouts a weight of llmfn's params may have.

- [out, in] with any strides: training's row-major weights, or `decode_weights`'s column-major
  copies (F.linear).
- Column panels [out // 8, in, 8] (`panel_weight`): panel p holds output columns 8p .. 8p + 7
  as one contiguous block, which the CPU decode kernel streams (`llmfn.layers.panel_matmul`).

Layers call `linear`, never F.linear, so any params tree runs in either layout.
"""

import torch
import torch.nn.functional as F

from llmfn.layers.panel_matmul import panel_matmul


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> [..., out], weight [out, in] or panels [out // width, in, width]."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    num_panels, in_features, width = weight.shape
    y = panel_matmul(x.reshape(-1, in_features), weight)
    y = y.reshape(*x.shape[:-1], num_panels * width)
    return y if bias is None else y + bias
