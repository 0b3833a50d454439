"""How torch code calls a C kernel: one rule for both CPU decode kernels.

y = call_kernel(torch.ops.llmfn.panel_matmul.default, kernel_matmul, torch_matmul, x, panels)
"""

import torch


def call_kernel(op, run, fallback, *tensors: torch.Tensor) -> torch.Tensor:
    """fallback(*tensors) where gradients are to be computed (the kernels have no backward);
    under torch.compile the op (one opaque call in the graph); in eager run(*tensors) directly
    (the dispatcher would cost a fifth of a small multiply)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return fallback(*tensors)
    if torch.compiler.is_compiling():
        return op(*tensors)
    return run(*tensors)


def data_pointers(*tensors: torch.Tensor) -> tuple[int, ...] | None:
    """The tensors' data addresses, or None for tensors of torch.func's transforms (vmap),
    which have no storage of their own: the caller then runs torch instead."""
    try:
        return tuple(t.data_ptr() for t in tensors)
    except RuntimeError:
        return None
