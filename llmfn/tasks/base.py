"""A task is a handful of pure functions the driver composes; registering one is one line."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tensordict import TensorDict

# (params, batch, config, *, training, rng) -> (loss 0-d, metrics {name: tensor})
LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Task:
    """What the driver needs to know about a training objective.

    init_params(config, seed) -> TensorDict: a fresh parameter tree.
    loss(params, batch, config, *, training, rng) -> (loss, metrics): differentiable in params;
        metrics are detached tensors and must include "tokens" (what one example counts as).
    batch_keys: the tensors a batch must hold (checked once at start).
    generates_text: whether samples can be drawn (the lm-style tasks).
    perplexity: whether the loss is a mean token negative log-likelihood, so that validation
        reports exp(val_loss) as val_ppl (not for a regression's squared error).
    Validation reports metrics["ce_loss"] as val_loss where the task has it (the loss without
    auxiliary terms such as MoE's, comparable across models), the loss otherwise.
    """

    name: str
    init_params: Callable[..., TensorDict]
    loss: LossFn
    batch_keys: tuple[str, ...]
    generates_text: bool = False
    perplexity: bool = False
