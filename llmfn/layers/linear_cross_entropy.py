"""The LM head and its cross-entropy fused over row chunks: no [N, V] logits are kept.

`cross_entropy(linear(h, weight), targets)` keeps the logits (and a float32 log-softmax of
them) for the backward, which then makes their gradient: [N, V] buffers, 3.2 GB apiece in
bf16 for Llama-135M's 49k vocabulary at B16 x T2048, for most models the largest activations
of the step. Here the forward runs `chunk_size` rows at a time: a chunk's logits, their
log-sum-exp and loss and, at once, the chunk's gradients (softmax - one-hot, through the head
matmul to its rows of h and to the weight); then the chunk's logits are dropped. The backward
only scales the two gradients the forward kept ([N, D] and [V, D]). Liger's fused linear
cross-entropy and torchtune's chunked loss do the same; the FLOPs are the unfused head's.

Works under plain autograd, `torch.func.grad`, `vmap(grad)` and `torch.compile`; without a
gradient (evaluation) it is the plain head and cross-entropy. First-order only, since the
gradients are taken in the forward: a gradient of a gradient or forward-mode AD through it
raises.
"""

import torch
import torch.nn.functional as F

from llmfn.layers.linear import linear
from llmfn.layers.recomputed_input import any_requires_grad, first_order_only, own_backward_ok

IGNORE_INDEX = -100


def chunk_loss_and_grads(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h: [n, D], weight: [V, D], targets: [n] -> (summed loss over the rows whose target is
    not IGNORE_INDEX, d loss/d h [n, D], d loss/d weight [V, D] in float32, or float64 for a
    float64 head). The logits and their gradient in the head matmul's dtype (autocast's, or
    h's), the softmax in at least float32."""
    logits = F.linear(h, weight)  # [n, V]
    compute = logits.dtype
    logits = logits.to(torch.promote_types(compute, torch.float32))
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, 0)
    log_z = torch.logsumexp(logits, dim=-1)  # [n]
    target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1)
    loss = torch.where(valid, log_z - target_logits, 0.0).sum()
    probs = torch.exp(logits - log_z[:, None])
    is_target = safe_targets[:, None] == torch.arange(logits.shape[-1], device=logits.device)
    grad_logits = (torch.where(is_target, probs - 1, probs) * valid[:, None]).to(compute)
    grad_h = (grad_logits @ weight.to(compute)).to(h.dtype)
    grad_weight = grad_logits.t() @ h.to(compute)
    grad_weight = grad_weight.to(torch.promote_types(grad_weight.dtype, torch.float32))
    return loss, grad_h, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(chunk_size, targets, h, weight):
        rows, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        losses, grad_rows, grad_weight = [], [], torch.zeros_like(weight, dtype=accumulate)
        for start in range(0, rows.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            loss, grad_h, grad_w = chunk_loss_and_grads(rows[chunk], weight, targets[chunk])
            losses.append(loss)
            grad_rows.append(grad_h)
            grad_weight = grad_weight + grad_w
        grad_h = torch.cat(grad_rows).reshape(h.shape)
        return torch.stack(losses).sum(), grad_h, grad_weight.to(weight.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grads = output[1:]
        ctx.mark_non_differentiable(*grads)
        ctx.save_for_backward(*grads)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        return (None, None, *(grad_loss * grad for grad in ctx.saved_tensors))


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Summed cross-entropy of the logits linear(h, weight) [..., V] against targets [...]
    (rows whose target is IGNORE_INDEX add nothing), computed `chunk_size` rows at a time.
    h: [..., D], weight: [V, D]."""
    if not first_order_only():
        raise NotImplementedError(
            "the chunked cross-entropy (model.loss_chunk_size > 0) gives first-order gradients "
            "only: for a gradient of a gradient (hessian, jacrev(grad(...))) or forward-mode AD "
            "(jvp) use model.loss_chunk_size=0"
        )
    if not any_requires_grad(h, weight) or not own_backward_ok():  # (compiled vmap: plain)
        logits = linear(h, weight).flatten(0, -2)
        return F.cross_entropy(
            logits.to(torch.promote_types(logits.dtype, torch.float32)),
            targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    return _LinearCrossEntropy.apply(chunk_size, targets, h, weight)[0]
