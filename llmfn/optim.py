"""Functional optimizers over TensorDict trees, weight-decay masks and gradient clipping.

    optimizer = adamw(weight_decay=0.1)              # decays matrices, not embeddings/norms/biases
    opt_state = optimizer.init(params)               # {"exp_avg": tree, "exp_avg_sq": tree}
    params, opt_state = optimizer.update(params, grads, opt_state, lr=lr, step=step)
    grads, grad_norm = clip_by_global_norm(grads, max_norm=1.0)

    # the same update over lists of leaves (what the train step calls; see llmfn.tree):
    new_p, new_moments = optimizer.update_leaves(paths, p, g, moments, lr=lr, step=step)

`lr` is a 0-d float tensor and `step` a 0-d long tensor (the 1-based count of this update), so
one `torch.compile(..., fullgraph=True)` graph serves every step without recompiling. Updates are
pure: they return new trees and never write into their inputs. The math runs on lists of leaves
with `torch._foreach_*` ops (TensorDict operators break inside compile); under compile inductor
fuses all leaves' updates into one kernel that reads p, g and the moments once and writes the
new ones once, the same memory traffic as torch's fused AdamW. What purity costs is the fresh
output trees (allocation, and page faults on CPU): a compiled step that copies the results back
into its inputs inside the graph (donation) runs in place; see bench/optim_update.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import torch
from tensordict import TensorDict

from llmfn.tree import Path, TreeDef, leaves_at, paths_and_leaves, tree_def, tree_like

DecayMask = dict[Path | str, bool] | Callable[[Path, torch.Tensor], bool] | None

EMBEDDING_ROOTS = ("embed", "pos")
_BIAS_NAME = re.compile(r"bias|.*_bias|b(qkv|q|k|v|o|13|1|2|3)?")


Leaves = list[torch.Tensor]


class Optimizer(NamedTuple):
    """A pure optimizer: three functions.

    init(params) -> opt_state: {moment name: tree mirroring params}
    update(params, grads, opt_state, *, lr, step) -> (params, opt_state): over trees
    update_leaves(paths, params, grads, moments, *, lr, step, batch_dims=0) -> (params, moments):
        the same update over lists of leaves at `paths` (moments: {moment name: leaves});
        batch_dims: the leading dims of a stacked tree (the default decay mask skips them)
    """

    init: Callable[[TensorDict], TensorDict]
    update: Callable[..., tuple[TensorDict, TensorDict]]
    update_leaves: Callable[..., tuple[Leaves, dict[str, Leaves]]]


def optimizer_from_leaves(
    init: Callable[[TensorDict], TensorDict], update_leaves: Callable
) -> Optimizer:
    """An Optimizer whose tree `update` reads the trees' leaves, runs `update_leaves` on them
    and builds the new trees. The moments are the trees `init` puts in opt_state."""

    def update(params, grads, opt_state, *, lr, step=None):
        paths, p = paths_and_leaves(params)
        g = leaves_at(grads, paths, name="grads")
        moments = moment_leaves(opt_state, paths)
        new_p, new_moments = update_leaves(
            paths, p, g, moments, lr=lr, step=step, batch_dims=params.batch_dims
        )
        treedef = tree_def(params)
        return tree_like(treedef, paths, new_p), opt_state_like(
            opt_state, treedef, paths, new_moments
        )

    return Optimizer(init, update, update_leaves)


# --- trees ---------------------------------------------------------------------------------------
def zeros_tree(params: TensorDict) -> TensorDict:
    return params.apply(torch.zeros_like)


def state_tree(params: TensorDict, **trees: TensorDict) -> TensorDict:
    return TensorDict(trees, batch_size=params.batch_size, device=params.device)


def moment_leaves(opt_state: TensorDict, paths: list[Path]) -> dict[str, Leaves]:
    """{moment name: its tree's leaves at `paths`} for every tree in opt_state."""
    return {
        name: leaves_at(tree, paths, name=f"opt_state/{name}") for name, tree in opt_state.items()
    }


def opt_state_like(
    opt_state: TensorDict, treedef: TreeDef, paths: list[Path], moments: dict[str, Leaves]
) -> TensorDict:
    """A new opt_state with `opt_state`'s moment names, each a tree of `treedef` (the params')."""
    return state_tree(
        opt_state,
        **{name: tree_like(treedef, paths, moments[name]) for name in list(opt_state.keys())},
    )


# --- weight-decay masks -------------------------------------------------------------------------
def default_decay_mask(params: TensorDict, *, decay_embeddings: bool = False) -> dict[Path, bool]:
    """{path: decay?}: matrices (>= 2-D per tree element) decay; norms and biases never do;
    embeddings (`embed`, `pos`) only with `decay_embeddings`. `lm_head` decays.

    Stacked trees (a TensorDict with batch dims, e.g. an ensemble) count dims per element."""
    paths, leaves = paths_and_leaves(params)
    return {
        path: decays_by_default(path, leaf.ndim - params.batch_dims, decay_embeddings)
        for path, leaf in zip(paths, leaves, strict=True)
    }


def decays_by_default(path: Path, element_dims: int, decay_embeddings: bool = False) -> bool:
    """default_decay_mask's rule for one leaf of `element_dims` dims (per tree element)."""
    is_norm = any("norm" in part for part in path)
    is_bias = _BIAS_NAME.fullmatch(path[-1]) is not None
    is_embedding = path[0] in EMBEDDING_ROOTS
    return (
        element_dims >= 2 and not is_norm and not is_bias and (decay_embeddings or not is_embedding)
    )


def _mask_key(key: Path | str) -> Path:
    return tuple(key.split(".")) if isinstance(key, str) else tuple(key)


def resolve_decay_mask(
    paths: list[Path], leaves: Leaves, decay_mask: DecayMask, *, batch_dims: int = 0
) -> list[bool]:
    """One bool per path. `decay_mask`: None (the default_decay_mask rule), a dict
    {path or "a.b.c": bool} covering every leaf, or a callable (path, leaf) -> bool."""
    if decay_mask is None:
        return [
            decays_by_default(path, leaf.ndim - batch_dims)
            for path, leaf in zip(paths, leaves, strict=True)
        ]
    if callable(decay_mask):
        return [bool(decay_mask(path, leaf)) for path, leaf in zip(paths, leaves, strict=True)]
    if not isinstance(decay_mask, dict):
        raise TypeError(
            f"decay_mask must be None, a dict path->bool or a callable, got {type(decay_mask).__name__}"
        )
    table = {_mask_key(key): bool(value) for key, value in decay_mask.items()}
    missing = [path for path in paths if path not in table]
    if missing:
        shown = ", ".join("/".join(path) for path in missing[:5])
        raise KeyError(f"decay_mask has no entry for {len(missing)} param leaves: {shown}")
    return [table[path] for path in paths]


def split_by_mask(items: list, mask: list[bool]) -> tuple[list, list]:
    """(items where mask, items where not mask), each in order."""
    yes = [x for x, m in zip(items, mask, strict=True) if m]
    no = [x for x, m in zip(items, mask, strict=True) if not m]
    return yes, no


def merge_by_mask(yes: list, no: list, mask: list[bool]) -> list:
    yes_iter, no_iter = iter(yes), iter(no)
    return [next(yes_iter) if m else next(no_iter) for m in mask]


# --- shared pieces ------------------------------------------------------------------------------
def as_scalar(value, like: torch.Tensor) -> torch.Tensor:
    """A 0-d float32 tensor on `like`'s device (Python numbers are accepted, but recompile)."""
    return torch.as_tensor(value, dtype=torch.float32, device=like.device)


def decay_and_apply(
    p: list,
    decay: list[bool],
    decay_factor,
    foreach_op_: Callable,
    foreach_op: Callable,
    *operands: list,
) -> list:
    """New leaves: foreach_op_(p * decay_factor, *operands) on decayed leaves (in place on the
    fresh product), foreach_op(p, *operands) out of place elsewhere: a foreach op pair such as
    `torch._foreach_add_` / `torch._foreach_add`. decay_factor (1 - lr·wd, 0-d) None = no decay
    anywhere."""
    if decay_factor is None:
        decay = [False] * len(p)
    p_decay, p_keep = split_by_mask(p, decay)
    split_operands = [split_by_mask(operand, decay) for operand in operands]
    decayed, kept = [], []
    if p_decay:
        decayed = torch._foreach_mul(p_decay, decay_factor)
        foreach_op_(decayed, *(yes for yes, _ in split_operands))
    if p_keep:
        kept = foreach_op(p_keep, *(no for _, no in split_operands))
    return merge_by_mask(decayed, kept, decay)


def adam_coefficients(
    lr: torch.Tensor, step, beta1: float, beta2: float, weight_decay: float
) -> torch.Tensor:
    """[3]: -lr / (1 - β1^t), 1 / sqrt(1 - β2^t), 1 - lr·wd.

    One small tensor on purpose: inductor realizes the stack once per step, where 0-d scalars
    would be inlined and pow/sqrt recomputed for every 8 elements of every leaf (measured 2x on
    CPU for a 15M-param update)."""
    t = torch.as_tensor(step, device=lr.device).to(torch.float32)
    return torch.stack([-lr / (1 - beta1**t), torch.rsqrt(1 - beta2**t), 1 - lr * weight_decay])


# --- optimizers ---------------------------------------------------------------------------------
def moments_named(moments: dict[str, Leaves], names: tuple[str, ...]) -> list[Leaves]:
    """The leaves of each moment in `names`; a missing one is a KeyError saying how to build it."""
    for name in names:
        if name not in moments:
            raise KeyError(
                f"opt_state has no '{name}' tree (got {list(moments)}); build it with init(params)"
            )
    return [moments[name] for name in names]


def adamw(
    *,
    beta1: float = 0.9,
    beta2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    decay_mask: DecayMask = None,
) -> Optimizer:
    """AdamW (Loshchilov & Hutter) as torch.optim.AdamW: p *= 1 - lr·wd on masked leaves, then
    p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps). State: {"exp_avg", "exp_avg_sq"}, each
    mirroring params (same dtype). `decay_mask` None = default_decay_mask(params)."""

    def init(params: TensorDict) -> TensorDict:
        return state_tree(params, exp_avg=zeros_tree(params), exp_avg_sq=zeros_tree(params))

    def update_leaves(paths, p, g, moments, *, lr, step, batch_dims=0):
        if step is None:
            raise ValueError(
                "adamw update needs step= (the 1-based number of this update, for its bias "
                "corrections; a 0-d tensor, so that a compiled update does not recompile)"
            )
        exp_avg, exp_avg_sq = moments_named(moments, ("exp_avg", "exp_avg_sq"))
        lr = as_scalar(lr, p[0])
        neg_step_size, inv_sqrt_bc2, decay_factor = adam_coefficients(
            lr, step, beta1, beta2, weight_decay
        )
        exp_avg = torch._foreach_lerp(exp_avg, g, 1 - beta1)
        exp_avg_sq = torch._foreach_mul(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, g, g, value=1 - beta2)
        # p·decay + exp_avg / denom, denom = -(sqrt(v / bc2) + eps) / step_size: one temporary.
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_mul_(denom, inv_sqrt_bc2)
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(denom, neg_step_size)
        decay = resolve_decay_mask(paths, p, decay_mask, batch_dims=batch_dims)
        new_p = decay_and_apply(
            p,
            decay,
            decay_factor if weight_decay else None,
            torch._foreach_addcdiv_,
            torch._foreach_addcdiv,
            exp_avg,
            denom,
        )
        return new_p, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    return optimizer_from_leaves(init, update_leaves)


def sgd(
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    decay_mask: DecayMask = None,
) -> Optimizer:
    """SGD as torch.optim.SGD (dampening 0): g += wd·p (L2, coupled, on masked leaves);
    buf = momentum·buf + g; p -= lr · (g + momentum·buf if nesterov else buf).
    State: {"momentum": tree} (empty when momentum == 0)."""
    if nesterov and momentum <= 0:
        raise ValueError(f"sgd: nesterov=True needs momentum > 0, got momentum={momentum}")

    def init(params: TensorDict) -> TensorDict:
        return state_tree(params, momentum=zeros_tree(params)) if momentum else state_tree(params)

    def update_leaves(paths, p, g, moments, *, lr, step=None, batch_dims=0):
        lr = as_scalar(lr, p[0])
        decay = (
            resolve_decay_mask(paths, p, decay_mask, batch_dims=batch_dims) if weight_decay else []
        )
        if any(decay):
            g_decay, g_keep = split_by_mask(g, decay)
            g_decay = torch._foreach_add(g_decay, split_by_mask(p, decay)[0], alpha=weight_decay)
            g = merge_by_mask(g_decay, g_keep, decay)
        new_moments = {}
        if momentum:
            (buf,) = moments_named(moments, ("momentum",))
            buf = torch._foreach_mul(buf, momentum)
            torch._foreach_add_(buf, g)
            g = torch._foreach_add(g, buf, alpha=momentum) if nesterov else buf
            new_moments["momentum"] = buf
        step_update = torch._foreach_mul(g, lr)
        return torch._foreach_sub(p, step_update), new_moments

    return optimizer_from_leaves(init, update_leaves)


def lion(
    *,
    beta1: float = 0.9,
    beta2: float = 0.99,
    weight_decay: float = 0.0,
    decay_mask: DecayMask = None,
) -> Optimizer:
    """Lion (Chen et al. 2023): p *= 1 - lr·wd (masked); p -= lr · sign(β1·m + (1-β1)·g);
    m = β2·m + (1-β2)·g. State: {"exp_avg": tree}. Use a 3-10x smaller lr than AdamW."""

    def init(params: TensorDict) -> TensorDict:
        return state_tree(params, exp_avg=zeros_tree(params))

    def update_leaves(paths, p, g, moments, *, lr, step=None, batch_dims=0):
        (exp_avg,) = moments_named(moments, ("exp_avg",))
        lr = as_scalar(lr, p[0])
        direction = torch._foreach_lerp(exp_avg, g, 1 - beta1)
        torch._foreach_sign_(direction)
        torch._foreach_mul_(direction, lr)
        exp_avg = torch._foreach_lerp(exp_avg, g, 1 - beta2)
        decay = resolve_decay_mask(paths, p, decay_mask, batch_dims=batch_dims)
        decay_factor = 1 - lr * weight_decay if weight_decay else None
        new_p = decay_and_apply(
            p, decay, decay_factor, torch._foreach_sub_, torch._foreach_sub, direction
        )
        return new_p, {"exp_avg": exp_avg}

    return optimizer_from_leaves(init, update_leaves)


def build_optimizer(optim_cfg, params: TensorDict) -> Optimizer:
    """The optimizer an `llmfn.config.OptimConfig` names, with default_decay_mask(params)."""
    mask = default_decay_mask(params, decay_embeddings=optim_cfg.decay_embeddings)
    if optim_cfg.name == "adamw":
        return adamw(
            beta1=optim_cfg.beta1,
            beta2=optim_cfg.beta2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
            decay_mask=mask,
        )
    if optim_cfg.name == "sgd":
        return sgd(
            momentum=optim_cfg.momentum,
            nesterov=optim_cfg.nesterov,
            weight_decay=optim_cfg.weight_decay,
            decay_mask=mask,
        )
    if optim_cfg.name == "lion":
        return lion(
            beta1=optim_cfg.beta1,
            beta2=optim_cfg.beta2,
            weight_decay=optim_cfg.weight_decay,
            decay_mask=mask,
        )
    raise ValueError(f"optim.name={optim_cfg.name!r} is invalid: expected one of adamw, sgd, lion")


# --- gradient norm and clipping -----------------------------------------------------------------
def global_norm(grads: TensorDict) -> torch.Tensor:
    """The L2 norm of all leaves together (as torch.nn.utils.clip_grad_norm_), float32: 0-d,
    or one per member [*batch_size] for a stacked tree (an ensemble)."""
    leaves = list(grads.values(include_nested=True, leaves_only=True))
    return leaves_global_norm(leaves, batch_dims=grads.batch_dims)


def leaves_global_norm(leaves: list[torch.Tensor], *, batch_dims: int = 0) -> torch.Tensor:
    """global_norm over a list of leaves: 0-d, or with batch_dims > 0 (the leading dims of a
    stacked tree's leaves, [*members, ...]) one norm per member, [*members], each computed as
    for that member's leaves alone."""
    if not leaves:
        raise ValueError("global_norm: the grads tree has no leaves")
    if batch_dims:
        members = leaves[0].shape[:batch_dims]
        flat = [leaf.reshape(-1, *leaf.shape[batch_dims:]) for leaf in leaves]  # [M, ...]
        norms = [leaves_global_norm([leaf[m] for leaf in flat]) for m in range(members.numel())]
        return torch.stack(norms).reshape(members)
    norms = torch._foreach_norm(leaves, 2)
    device = leaves[0].device
    return torch.linalg.vector_norm(
        torch.stack([n.to(device=device, dtype=torch.float32) for n in norms])
    )


def clip_by_global_norm(
    grads: TensorDict, max_norm: float | None
) -> tuple[TensorDict, torch.Tensor]:
    """(grads scaled by min(1, max_norm / (norm + 1e-6)), norm before clipping). max_norm None:
    the grads are returned unchanged (the norm is still computed, for logging). A stacked tree
    (batch_size [*members]) is clipped per member: norm [*members]."""
    paths, leaves = paths_and_leaves(grads)
    clipped, norm = clip_leaves_by_global_norm(leaves, max_norm, batch_dims=grads.batch_dims)
    return (grads if max_norm is None else tree_like(grads, paths, clipped)), norm


def clip_leaves_by_global_norm(
    leaves: list[torch.Tensor], max_norm: float | None, *, batch_dims: int = 0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """clip_by_global_norm over a list of gradient leaves; batch_dims as in
    `leaves_global_norm` (each member clipped by its own norm)."""
    norm = leaves_global_norm(leaves, batch_dims=batch_dims)
    if max_norm is None:
        return leaves, norm
    if max_norm <= 0:
        raise ValueError(
            f"clip_by_global_norm: max_norm={max_norm} is invalid: expected a positive number or None"
        )
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    if not batch_dims:
        return torch._foreach_mul(leaves, scale), norm
    per_member = [scale.reshape(scale.shape + (1,) * (leaf.ndim - batch_dims)) for leaf in leaves]
    return [(leaf * s).to(leaf.dtype) for leaf, s in zip(leaves, per_member, strict=True)], norm
