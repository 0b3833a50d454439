"""Attention of one query per row over the KV cache, for CPU decode:
`llmfn/kernels/decode_attention.c` (compiled on first use, see `llmfn.kernels.build`), called
through the torch op `llmfn::decode_attention` under torch.compile, directly in eager.

SDPA's CPU kernel is built for blocks of queries: for one query it pays its setup per (row,
head), which at decode sizes costs several times the work (bench/decode_throughput.py). Where
the kernel cannot serve (gradients to compute, no C compiler, not float32) SDPA computes the
same attention.
"""

import ctypes
import math

import torch
import torch.nn.functional as F

from llmfn.kernels.build import load_function
from llmfn.kernels.dispatch import call_kernel, data_pointers

# q, k, v, visible, out; B, H, KV, n, hd, kv_batch, kv_head, visible_batch; scale; threads
ARGTYPES = (ctypes.c_void_p,) * 5 + (ctypes.c_int64,) * 8 + (ctypes.c_float, ctypes.c_int64)


def load_kernel():
    """The C function `decode_attention`, or None where the kernel cannot be built here."""
    return load_function("decode_attention", ARGTYPES, ctypes.c_int)


def kernel_serves(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `decode_attention` runs the kernel for these inputs (shapes and dtypes only, so
    torch.compile decides it once): one float32 query per row on CPU, a boolean mask, a head
    size the kernel's 8-float vectors divide."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and q.shape[2] == 1
        and q.shape[3] % 8 == 0
        and mask is not None
        and mask.dtype == torch.bool
        and mask.shape[1:3] == (1, 1)
    )


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """q [B, H, 1, hd], k and v [B, KV, n, hd], visible [B or 1, 1, 1, n] bool -> [B, H, 1, hd]:
    softmax(q · kᵀ / √hd over the visible keys) · v, as F.scaled_dot_product_attention: the
    kernel where it serves, SDPA elsewhere and where gradients are to be computed."""
    op = torch.ops.llmfn.decode_attention.default
    return call_kernel(op, kernel_attention, sdpa, q, k, v, visible)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor):
    """The same attention through torch's F.scaled_dot_product_attention (the fallback)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=visible, enable_gqa=k.shape[1] != q.shape[1]
    )


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor):
    """The C kernel where it can be built (SDPA elsewhere): the op's eager implementation."""
    kernel = load_kernel()
    if kernel is None:
        return sdpa(q, k, v, visible)
    B, H, _, hd = q.shape
    n = k.shape[2]
    if k.stride()[2:] != (hd, 1) or v.stride() != k.stride():
        k, v = k.contiguous(), v.contiguous()
    q, visible = q.contiguous(), visible.contiguous()
    pointers = data_pointers(q, k, v, visible)
    if pointers is None:
        return sdpa(q, k, v, visible)
    out = torch.empty_like(q)
    failed = kernel(
        *pointers, out.data_ptr(), B, H, k.shape[1], n, hd, k.stride(0), k.stride(1),
        visible.stride(0) if visible.shape[0] > 1 else 0, 1 / math.sqrt(hd),
        torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError(f"decode_attention: no memory for {n} attention scores per thread")
    return out


torch.library.define(
    "llmfn::decode_attention", "(Tensor q, Tensor k, Tensor v, Tensor visible) -> Tensor"
)
torch.library.impl("llmfn::decode_attention", "default", kernel_attention)


@torch.library.register_fake("llmfn::decode_attention")
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)
