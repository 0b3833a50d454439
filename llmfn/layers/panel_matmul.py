"""The CPU decode matmul over column panels: `llmfn/kernels/panel_matmul.c` (compiled on first
use, see `llmfn.kernels.build`), called through the torch op `llmfn::panel_matmul` under
torch.compile (one opaque kernel), directly in eager.

A decode step multiplies every weight once by a few rows, which makes it a stream through
memory: the kernel reads each panel [in, 8] once as a sequential block while the rows
accumulate in registers (bench/decode_throughput.py measures it against MKL).

Where the kernel cannot serve (gradients to compute, vmap, not float32, not on CPU) torch.matmul
computes the same product; where it cannot be built (no C compiler, a CPU without AVX2/FMA or
NEON) `kernel_available()` is False and `llmfn.cached_decode.decode_weights` keeps column-major
weights instead.
"""

import ctypes

import torch

from llmfn.kernels.build import load_function
from llmfn.kernels.dispatch import call_kernel, data_pointers

PANEL_WIDTH = 8  # output columns per panel: one 8-float vector register


def panel_weight(weight: torch.Tensor, width: int = PANEL_WIDTH) -> torch.Tensor:
    """[out, in] -> [out // width, in, width] contiguous panels of `width` output columns."""
    out_features, in_features = weight.shape
    if out_features % width:
        raise ValueError(f"panel width {width} does not divide the {out_features} output rows")
    panels = weight.t().reshape(in_features, out_features // width, width)
    return panels.transpose(0, 1).contiguous()


def unpanel(panels: torch.Tensor) -> torch.Tensor:
    """[P, in, width] panels -> the [in, P · width] matrix they hold (Wᵀ)."""
    num_panels, in_features, width = panels.shape
    return panels.transpose(0, 1).reshape(in_features, num_panels * width)


ARGTYPES = (ctypes.c_void_p,) * 3 + (ctypes.c_int64,) * 4  # x, panels, y, rows, K, P, threads


def load_kernel():
    """The C function `panel_matmul`, or None where the kernel cannot be built here."""
    return load_function("panel_matmul", ARGTYPES)


def kernel_available() -> bool:
    """Whether this machine runs the panel kernel (builds it on the first call)."""
    return load_kernel() is not None


# --- The op -----------------------------------------------------------------------------------
def panel_matmul(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """x [rows, in] @ panels [P, in, width] -> [rows, P · width].

    The kernel where it serves, torch.matmul over the panels' matrix elsewhere and where
    gradients are to be computed (`llmfn.kernels.dispatch.call_kernel`)."""
    return call_kernel(torch.ops.llmfn.panel_matmul.default, kernel_matmul, torch_matmul, x, panels)


def torch_matmul(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """The same product through torch.matmul over the panels' matrix (the fallback)."""
    return x @ unpanel(panels)


def kernel_matmul(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """The C kernel where it serves (float32 on CPU, width-8 panels), torch.matmul elsewhere:
    the op's eager implementation."""
    num_panels, in_features, width = panels.shape
    kernel = load_kernel() if x.device.type == "cpu" else None
    if kernel is None or width != PANEL_WIDTH or not x.dtype == panels.dtype == torch.float32:
        return torch_matmul(x, panels)
    x, panels = x.contiguous(), panels.contiguous()
    pointers = data_pointers(x, panels)
    if pointers is None:
        return torch_matmul(x, panels)
    y = x.new_empty(x.shape[0], num_panels * width)
    rows, threads = x.shape[0], torch.get_num_threads()
    kernel(*pointers, y.data_ptr(), rows, in_features, num_panels, threads)
    return y


torch.library.define("llmfn::panel_matmul", "(Tensor x, Tensor panels) -> Tensor")
torch.library.impl("llmfn::panel_matmul", "default", kernel_matmul)


@torch.library.register_fake("llmfn::panel_matmul")
def _(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], panels.shape[0] * panels.shape[2])
