"""y = x · Wᵀ + b, for the two layouts a weight of llmfn's params may have.

- [out, in] with any strides: training's row-major weights, or `decode_weights`'s column-major
  copies (F.linear).
- Column panels [out // width, in, width] (`panel_weight`): panel p holds output columns
  p·width .. (p + 1)·width - 1 as one contiguous block. A batched decode step multiplies every
  weight once by a few rows, which makes it a stream through memory; contiguous panels keep
  the CPU's prefetcher ahead where MKL's kernels over a [in, out] matrix stall
  (bench/decode_throughput.py has the numbers).

Layers call `linear`, never F.linear, so any params tree runs in either layout.
"""

import torch
import torch.nn.functional as F


def panel_weight(weight: torch.Tensor, width: int) -> torch.Tensor:
    """[out, in] -> [out // width, in, width] contiguous panels of `width` output columns."""
    out_features, in_features = weight.shape
    if out_features % width:
        raise ValueError(f"panel width {width} does not divide the {out_features} output rows")
    panels = weight.t().reshape(in_features, out_features // width, width)
    return panels.transpose(0, 1).contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> [..., out], weight [out, in] or panels [out // width, in, width]."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    num_panels, in_features, width = weight.shape
    rows = x.reshape(1, -1, in_features).expand(num_panels, -1, -1)  # no copy
    y = torch.bmm(rows, weight)  # [P, rows, width]
    y = y.transpose(0, 1).reshape(*x.shape[:-1], num_panels * width)
    return y if bias is None else y + bias
