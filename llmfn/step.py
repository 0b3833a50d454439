"""The train state tree and the one compiled `train_step(state, batch) -> (state, metrics)`.

The state is one TensorDict:
    params      the model parameters
    opt_state   the optimizer's moments (a tree mirroring params)
    step        0-d long: steps done, skipped ones included (drives the lr schedule, data, dropout)
    updates     0-d long: updates applied, skipped steps not counted (optax's Adam `count`):
                the 1-based step= of the optimizer's bias correction is updates + 1
    rng         0-d long: the run's dropout key (folded with the step, so never updated)
    loss_scale  0-d float: fp16 dynamic loss scale (1.0 otherwise)
    good_steps  0-d long: finite steps since the loss scale last changed
    nonfinite_streak  0-d long: failed (non-finite) steps in a row; at the limit (1 for
                train.nonfinite=halt, else train.max_nonfinite) the state freezes and the driver
                stops. An fp16 loss-scale overflow (`is_scale_overflow`) is no failure and
                leaves the streak as it is.

Everything that changes from step to step is a tensor in the state, so one compiled graph
serves the whole run (a Python float learning rate would recompile at every new value).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDict

from llmfn.distributed import GradientAllReduce
from llmfn.layers.dropout import fold_in
from llmfn.optim import Optimizer, clip_leaves_by_global_norm, moment_leaves, opt_state_like
from llmfn.tree import paths_and_leaves, tree_def, tree_like

FP16_INITIAL_SCALE = 2.0**16
FP16_GROWTH_INTERVAL = 2000
STATE_SCALARS = ("step", "updates", "rng", "loss_scale", "good_steps", "nonfinite_streak")
# State keys added after checkpoints were first written -> the stored key that holds their value
# in an older checkpoint (`load_checkpoint(..., missing_from=...)`): `updates` equals `step`
# when no step was skipped (and older versions counted skipped steps in the bias correction).
KEYS_ADDED_SINCE = {"updates": "step"}


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_autocast(device_type: str, precision: str) -> torch.autocast:
    """The autocast context of a train.precision (disabled for fp32)."""
    amp_dtype = autocast_dtype(precision)
    return torch.autocast(
        device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    )


def init_train_state(
    params: TensorDict, optimizer: Optimizer, *, seed: int, precision: str
) -> TensorDict:
    """A fresh state around `params` (already on their device)."""
    device = next(iter(params.values(include_nested=True, leaves_only=True))).device
    scalar = lambda value, dtype: torch.tensor(value, dtype=dtype, device=device)  # noqa: E731
    return TensorDict(
        {
            "params": params,
            "opt_state": optimizer.init(params),
            "step": scalar(0, torch.long),
            "updates": scalar(0, torch.long),
            "rng": scalar(seed, torch.long),
            "loss_scale": scalar(initial_loss_scale(precision), torch.float32),
            "good_steps": scalar(0, torch.long),
            "nonfinite_streak": scalar(0, torch.long),
        },
        batch_size=[],
    )


def initial_loss_scale(precision: str) -> float:
    return FP16_INITIAL_SCALE if precision == "fp16" else 1.0


def with_fresh_loss_scale(state: TensorDict, precision: str) -> TensorDict:
    """state with the loss scale (and its count of good steps) a fresh run at `precision` starts
    with: for a checkpoint resumed at another precision (an fp32 run's scale 1 would let fp16
    gradients underflow)."""
    state = state.clone(recurse=False)
    state["loss_scale"] = torch.full_like(state["loss_scale"], initial_loss_scale(precision))
    state["good_steps"] = torch.zeros_like(state["good_steps"])
    return state


def where_leaves(condition: torch.Tensor, if_true: list, if_false: list) -> list:
    """Leafwise torch.where with a 0-d condition."""
    return [torch.where(condition, a, b) for a, b in zip(if_true, if_false, strict=True)]


def micro_batch(batch: dict, index: int) -> dict:
    return {key: value[index] for key, value in batch.items()}


def next_loss_scale(scale: torch.Tensor, good_steps: torch.Tensor, finite: torch.Tensor):
    """fp16 dynamic loss scaling: halve on overflow, double after a run of finite steps."""
    grown = good_steps + 1 >= FP16_GROWTH_INTERVAL
    new_scale = torch.where(finite, torch.where(grown, scale * 2, scale), scale / 2)
    new_good = torch.where(finite & ~grown, good_steps + 1, torch.zeros_like(good_steps))
    return new_scale, new_good


def is_scale_overflow(
    loss: torch.Tensor, grad_norm: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """0-d bool: an fp16 loss-scale event, not a failure: the loss is finite but the scaled
    gradients overflowed while the scale is above 1 (so backing it off can help). At a scale
    <= 1 the unscaled gradients themselves overflow, and a non-finite loss is no scale's doing."""
    return torch.isfinite(loss) & ~torch.isfinite(grad_norm) & (scale > 1)


def mean_over_ranks(all_reduce: GradientAllReduce, grads: list, loss, tokens, extra: dict):
    """grads, loss and the task's metrics (each rank's mean over its tokens) -> their mean over
    every rank's tokens, and the tokens summed, in one all-reduce: ranks whose batches hold
    different numbers of loss tokens (SFT's masked prompts) weigh as one process would."""
    weight = tokens.float()
    means = [loss, *extra.values()]
    reduced = all_reduce(
        [
            *torch._foreach_mul(grads, weight),
            *(m.float().reshape(1) * weight for m in means),
            weight,
        ]
    )
    *reduced, total = reduced
    per_token = 1 / total.clamp(min=1)
    grads = torch._foreach_mul(reduced[: len(grads)], per_token)
    loss, *rest = (r[0] * per_token for r in reduced[len(grads) :])
    return grads, loss, total.long(), dict(zip(extra, rest, strict=True))


def select_update(take: torch.Tensor, new: tuple, old: tuple, *, donate: bool) -> tuple:
    """(params, moments) of the update where `take` (0-d bool), else the old ones. donate: the
    result is written into the old tensors and returned as them (in place when compiled)."""
    (new_params, new_moments), (params, moments) = new, old
    new_params = where_leaves(take, new_params, params)
    new_moments = {name: where_leaves(take, new_moments[name], moments[name]) for name in moments}
    if not donate:
        return new_params, new_moments
    torch._foreach_copy_(params, new_params)
    for name in moments:
        torch._foreach_copy_(moments[name], new_moments[name])
    return params, moments


def make_train_step(
    task,
    config,
    optimizer: Optimizer,
    learning_rate: Callable[[torch.Tensor], torch.Tensor],
    *,
    device_type: str = "cpu",
    all_reduce: GradientAllReduce | None = None,
    rank: int = 0,
    compile: bool = False,
    donate: bool = False,
) -> Callable[[TensorDict, dict], tuple[TensorDict, dict[str, torch.Tensor]]]:
    """Build the pure step. `batch` holds [A, B, ...] tensors: A micro-batches of gradient
    accumulation. `all_reduce` (multi-process) sums a list of tensors over ranks; `rank`: this
    process's. Row b of micro-batch a on rank r is row (a·N + r)·B + b of the step's global
    batch on N ranks (as `llmfn.data.sampling` lays rows out), and its dropout key is that
    row's: however a global batch is split over ranks and micro-batches, each row drops the
    same units. The gradients are those of the mean loss over every loss token of the global
    batch (micro-batches and ranks with fewer tokens weigh less), as one process with the whole
    batch in one piece computes.

    compile: run the step's arithmetic, the all-reduce included, as one `torch.compile`d graph
    (`fullgraph=True`). The state tree is split into lists of leaves before that function and joined after
    it, as `jax.jit` flattens pytrees outside its trace: dynamo would otherwise trace TensorDict's
    Python leaf by leaf (30.5 s against 14.6 s to trace a 30-layer model's step).
    `torch.compile(train_step)` works too and runs the same graph; it only takes longer to trace.

    donate: the step writes the new params and moments into the input state's tensors and
    returns a state made of them (JAX's `donate_argnums`), so the caller must not use the input
    state afterwards. Compiled, the update then runs in place: no fresh params and moments each
    step (3x the params' size; on CPU also their page faults). Values are the same either way.
    """
    precision = config.train.precision
    world_size = 1 if all_reduce is None else all_reduce.world_size
    max_norm = config.optim.grad_clip
    nonfinite_limit = 1 if config.train.nonfinite == "halt" else config.train.max_nonfinite

    def loss_of(leaves, paths, treedef, batch, rng, scale):
        params = tree_like(treedef, paths, leaves)
        with precision_autocast(device_type, precision):
            value, metrics = task.loss(params, batch, config, training=True, rng=rng)
        return value * scale, (value.detach(), metrics)

    # Gradients with respect to the list of leaves, not the tree: dynamo traces functorch's
    # wrapping of every input and output leaf, and through TensorDict's pytree functions that
    # took 4x longer (68 s against 16 s to trace a 30-layer model's gradient).
    grad_and_value = torch.func.grad_and_value(loss_of, has_aux=True)

    def gradients(paths, treedef, params, batch, step_key, scale):
        """The gradients of the mean loss over all the loss tokens of the batch's A micro-batches,
        each micro-batch weighing by its count of tokens (as the task counts them) -> (grads
        [leaves], loss, tokens, the task's other metrics). Each row's dropout key is (step, its
        row in the step's global batch)."""
        num_micro, rows = next(iter(batch.values())).shape[:2]
        local_rows = torch.arange(rows, device=step_key.device)
        grads, losses, task_metrics, weights = None, [], [], []
        for i in range(num_micro):
            row_keys = fold_in(step_key, (i * world_size + rank) * rows + local_rows)
            g, (_, (value, metrics)) = grad_and_value(
                params, paths, treedef, micro_batch(batch, i), row_keys, scale
            )
            count = metrics["tokens"].float()
            if i == 0:  # weights relative to the first count: equal counts weigh exactly 1.0
                unit = count.clamp(min=1)
            weights.append(count / unit)
            g = torch._foreach_mul(g, weights[-1])
            grads = g if grads is None else torch._foreach_add(grads, g)
            losses.append(value)
            task_metrics.append(metrics)
        weights = torch.stack(weights)
        total_weight = weights.sum().clamp(min=torch.finfo(torch.float32).tiny)

        def weighted_mean(values: list[torch.Tensor]) -> torch.Tensor:
            return (torch.stack(values).float() * weights).sum() / total_weight

        extra = {
            k: weighted_mean([m[k] for m in task_metrics]) for k in task_metrics[0] if k != "tokens"
        }
        tokens = torch.stack([m["tokens"] for m in task_metrics]).sum()
        grads = torch._foreach_div(grads, scale * total_weight)
        return grads, weighted_mean(losses), tokens, extra

    def step_leaves(paths, treedef, params, moments, scalars, batch):
        """The step over lists of leaves: params [leaves at paths], moments {name: leaves},
        scalars {name: 0-d tensor} (STATE_SCALARS) -> (params, moments, scalars, metrics).
        `paths` and `treedef` (the params tree's TreeDef) are Python constants: compiled, a
        state of another structure recompiles rather than being misread."""
        step, scale, streak = scalars["step"], scalars["loss_scale"], scalars["nonfinite_streak"]
        step_key = fold_in(scalars["rng"], step)
        grads, loss, tokens, extra = gradients(paths, treedef, params, batch, step_key, scale)
        if all_reduce is not None:
            grads, loss, tokens, extra = mean_over_ranks(all_reduce, grads, loss, tokens, extra)
        grads, grad_norm = clip_leaves_by_global_norm(grads, max_norm)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        # Once the streak reaches the limit the state freezes until the driver stops, so the
        # diagnostic checkpoint holds the last good values and the step of the first failure.
        frozen = streak >= nonfinite_limit
        take_update = finite & ~frozen
        failed = ~finite
        if precision == "fp16":
            failed = failed & ~is_scale_overflow(loss, grad_norm, scale)
        lr = learning_rate(step)
        updates = scalars["updates"]
        new_params, new_moments = optimizer.update_leaves(
            paths,
            params,
            grads,
            moments,
            lr=lr,
            step=updates + 1,
            batch_dims=len(treedef.batch_size),
        )
        new_params, new_moments = select_update(
            take_update, (new_params, new_moments), (params, moments), donate=donate
        )
        new_scale, new_good = scale, scalars["good_steps"]
        if precision == "fp16":
            new_scale, new_good = next_loss_scale(scale, new_good, finite)
        new_scalars = {
            "step": step + 1,
            "updates": updates + take_update.long(),
            "rng": scalars["rng"],
            "loss_scale": new_scale,
            "good_steps": new_good,
            # an fp16 loss-scale overflow neither fails nor succeeds: the streak stays
            "nonfinite_streak": torch.where(
                failed | frozen, streak + 1, torch.where(take_update, 0, streak)
            ),
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": tokens,
            "nonfinite": failed.float(),  # counts toward train.max_nonfinite
            "skipped": (~take_update).float(),  # no update applied (also an fp16 overflow)
            **extra,
        }
        if precision == "fp16":
            metrics["loss_scale"] = scale
        return new_params, new_moments, new_scalars, metrics

    if compile:
        step_leaves = torch.compile(step_leaves, fullgraph=True)

    def train_step(state: TensorDict, batch: dict) -> tuple[TensorDict, dict[str, torch.Tensor]]:
        params, opt_state = state["params"], state["opt_state"]
        paths, param_leaves = paths_and_leaves(params)
        moments = moment_leaves(opt_state, paths)
        scalars = {name: state[name] for name in STATE_SCALARS}
        treedef = tree_def(params)
        new_params, new_moments, new_scalars, metrics = step_leaves(
            paths, treedef, param_leaves, moments, scalars, batch
        )
        new_state = TensorDict(
            {
                "params": tree_like(treedef, paths, new_params),
                "opt_state": opt_state_like(opt_state, treedef, paths, new_moments),
                **new_scalars,
            },
            batch_size=[],
        )
        return new_state, metrics

    return train_step


def make_eval_step(task, config, *, device_type: str = "cpu", compile: bool = False):
    """(params, batch) -> {"loss": mean loss, "tokens": count}; no gradients. The loss is the
    task's "ce_loss" metric where it has one (without auxiliary terms), its loss otherwise.

    compile: run it as a `torch.compile`d function over the params' leaves, the tree split
    outside it as in `make_train_step`."""

    def eval_leaves(paths, treedef, leaves, batch):
        params = tree_like(treedef, paths, leaves)
        with torch.no_grad(), precision_autocast(device_type, config.train.precision):
            value, metrics = task.loss(params, batch, config, training=False)
        return {"loss": metrics.get("ce_loss", value).float(), "tokens": metrics["tokens"]}

    if compile:
        eval_leaves = torch.compile(eval_leaves)

    def eval_step(params: TensorDict, batch: dict) -> dict[str, torch.Tensor]:
        paths, leaves = paths_and_leaves(params)
        return eval_leaves(paths, tree_def(params), leaves, batch)

    return eval_step
