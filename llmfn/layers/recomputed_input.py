"""`linear(pre(*inputs), weight, bias)` whose backward recomputes `pre(*inputs)` instead of
keeping it: selective activation recomputation for the cheap elementwise work in front of a
matmul (a norm before a projection, SwiGLU's `act(gate) * up` before the down projection).

A matmul's weight gradient needs its input, so autograd keeps every projection's input alive
from the forward to the backward. Inside the compiled train step the gradient comes from
`torch.func.grad_and_value`, and the whole step is one graph without AOTAutograd's
forward/backward partitioner, which would otherwise choose to recompute such inputs: the
graph kept the normed inputs of the q/k/v and gate/up projections and SwiGLU's hidden
activation, 2·D + I values a token a layer (16 MB a layer at B8 x T256 on the 15M bench model,
~26% of a Llama layer's saved activations; docs/performance.md). Here the backward keeps
`inputs` (the residual stream, which the backward needs anyway, or the gate/up projection) and
recomputes `pre` from them under the forward's autocast state.

Works under plain autograd, `torch.func.grad`, `vmap(grad)` and `torch.compile`; where no
gradient is taken (generation, evaluation), or a higher-order or forward-mode one is
(`first_order_only`: `hessian`, `jacrev(grad)`, `jvp`), or torch.compile traces a vmap
(`own_backward_ok`: `torch.compile(vmap(grad(loss)))`), it is `linear(pre(*inputs), weight,
bias)`.
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from llmfn.layers.linear import linear

_plain_depth = 0  # > 0 inside `plain_linears()`


class _RecomputedInputLinear(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(spec, *tensors):
        pre, num_inputs = spec
        inputs, (weight, *bias) = tensors[:num_inputs], tensors[num_inputs:]
        return F.linear(pre(*inputs), weight, *bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (pre, num_inputs), *tensors = inputs
        ctx.pre = pre
        ctx.bias_dtype = tensors[-1].dtype if len(tensors) > num_inputs + 1 else None
        device_type = tensors[0].device.type
        ctx.autocast = (
            device_type,
            torch.get_autocast_dtype(device_type),
            torch.is_autocast_enabled(device_type),
        )
        ctx.save_for_backward(*tensors[: num_inputs + 1])

    @staticmethod
    def backward(ctx, grad_out):
        *inputs, weight = ctx.saved_tensors
        device_type, dtype, enabled = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            x, pre_vjp = torch.func.vjp(ctx.pre, *inputs)
        compute = grad_out.dtype  # the matmul's dtype in the forward (autocast's, or x's)
        rows = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out]
        grad_x = (grad_out @ weight.to(compute)).to(x.dtype)
        grad_weight = (rows.t() @ x.reshape(-1, x.shape[-1]).to(compute)).to(weight.dtype)
        grad_bias = [] if ctx.bias_dtype is None else [rows.sum(0).to(ctx.bias_dtype)]
        return (None, *pre_vjp(grad_x), grad_weight, *grad_bias)


def recomputed_input_linear(
    pre: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """linear(pre(*inputs), weight, bias): [..., in] -> [..., out], pre's output recomputed in
    the backward. pre: elementwise work (cheap to redo) of float tensors, reading no tensor
    but `inputs` (a captured tensor would break vmap of the backward)."""
    tail = (weight,) if bias is None else (weight, bias)
    if (
        _plain_depth
        or weight.dim() != 2
        or not any_requires_grad(*inputs, *tail)
        or not own_backward_ok()
    ):
        return linear(pre(*inputs), weight, bias)
    return _RecomputedInputLinear.apply((pre, len(inputs)), *inputs, *tail)


def any_requires_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on these tensors now. An autograd.Function is applied
    only then: dynamo (torch 2.13) traces one whose forward takes *args wrongly when none of
    its inputs requires grad (it passes the context object as the first argument), as under a
    compiled forward of params without requires_grad. Under torch.func.grad, grad's own inputs
    can look that way to dynamo; the plain linear then runs, with the same gradients."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def first_order_only() -> bool:
    """Whether the torch.func transforms around this call take at most one reverse-mode
    gradient and no forward-mode one (vmap is fine). Only then do the autograd.Functions that
    do their own backward (here, `llmfn.layers.remat`, `llmfn.layers.linear_cross_entropy`)
    run: they have no jvp, so under `hessian`, `jacrev(grad)` or `jvp` their callers compute
    plainly (or raise). Always True under torch.compile: compiled code keeps its first-order
    path (the stack inside a remat backward under grad can hold two grads, which would send
    its recomputation to SDPA's math backend); `own_backward_ok` reads the stack there."""
    if torch.compiler.is_compiling():
        return True
    keys = transform_stack()
    return keys.count("Grad") <= 1 and "Jvp" not in keys


def own_backward_ok() -> bool:
    """Whether `_RecomputedInputLinear` may run here: `first_order_only()` in eager; under
    torch.compile, no vmap, no jvp and at most one grad around the call. Dynamo cannot vmap an
    autograd.Function ("You tried to vmap over ApplyTemplate", pytorch#129845), so
    `torch.compile(vmap(grad(loss)))` (per-example gradients, ensembles) takes the plain
    linear, with the same values."""
    if not torch.compiler.is_compiling():
        return first_order_only()
    keys = transform_stack()
    return "Vmap" not in keys and keys.count("Grad") <= 1 and "Jvp" not in keys


@torch.compiler.assume_constant_result
def transform_stack() -> tuple[str, ...]:
    """The torch.func transforms around this call, outermost first: ("Vmap", "Grad") inside
    vmap(grad(f)); names of `TransformType` ("Grad", "Jvp", "Vmap", "Functionalize").

    Under torch.compile dynamo pushes the levels of the transforms it traces, so this reads
    the stack at trace time, as a constant of the graph (no graph break, no guard: the
    compiled frame's own code fixes the levels it adds, and dynamo guards on the ones it was
    called under)."""
    return tuple(interpreter.key().name for interpreter in retrieve_all_functorch_interpreters())


@contextlib.contextmanager
def plain_linears() -> Iterator[None]:
    """Within it, `recomputed_input_linear` is a plain linear: for code that recomputes a whole
    forward in its own backward (`llmfn.layers.remat`), where a nested recomputation gains
    nothing, and a torch.func.vjp inside it fails ("level <= current_level INTERNAL ASSERT
    FAILED ... escaped?", torch 2.13)."""
    global _plain_depth
    _plain_depth += 1
    try:
        yield
    finally:
        _plain_depth -= 1
