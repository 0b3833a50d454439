"""Learning-rate schedules as pure functions of a step *tensor* (compile-safe, no recompiles).

    lr = learning_rate(step, schedule="cosine", peak_lr=3e-4, min_lr=3e-5,
                       warmup_steps=100, total_steps=1000)

`step` counts the updates already taken (0 for the first update). Every schedule warms up
linearly, peak·(step+1)/(warmup_steps+1), reaching peak_lr at step == warmup_steps, then:
    constant  flat at peak_lr
    linear    peak_lr -> min_lr linearly, reaching min_lr at step == total_steps
    cosine    peak_lr -> min_lr along half a cosine, reaching min_lr at step == total_steps
    wsd       flat at peak_lr, then linear to min_lr over the last decay_fraction·total_steps
              steps (warmup-stable-decay)
and stays at min_lr past total_steps. The hyperparameters are Python numbers fixed for a run;
only the step is a tensor, so the schedule is one piece of graph for every step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import NoReturn

import torch

SCHEDULES = ("constant", "linear", "cosine", "wsd")
CONFIG_KEYS = {  # learning_rate argument -> the OptimConfig key that sets it
    "schedule": "optim.schedule",
    "peak_lr": "optim.lr",
    "min_lr": "optim.min_lr",
    "warmup_steps": "optim.warmup_steps",
    "decay_fraction": "optim.decay_fraction",
}


def check_schedule(
    *,
    schedule: str,
    peak_lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    decay_fraction: float,
    names: Mapping[str, str] | None = None,
) -> None:
    """Raise ValueError naming the first bad argument, as `names` calls it if it has it
    (`CONFIG_KEYS`: the config key), else by its own name."""
    names = names or {}

    def fail(argument: str, value, expected: str) -> NoReturn:
        raise ValueError(f"{names.get(argument, argument)}={value} is invalid: expected {expected}")

    if schedule not in SCHEDULES:
        fail("schedule", repr(schedule), f"one of {', '.join(SCHEDULES)}")
    if not peak_lr > 0:
        fail("peak_lr", peak_lr, "a positive number")
    if not 0 <= min_lr <= peak_lr:
        fail("min_lr", min_lr, f"0 <= min_lr <= peak_lr={peak_lr}")
    if warmup_steps < 0:
        fail("warmup_steps", warmup_steps, ">= 0")
    if total_steps <= 0:
        fail("total_steps", total_steps, "a positive number")
    if not 0 < decay_fraction <= 1:
        fail("decay_fraction", decay_fraction, "a float in (0, 1]")


def decay_start(schedule: str, warmup_steps: int, total_steps: int, decay_fraction: float) -> float:
    """The step where the decay begins: after warmup, or (wsd) the last decay_fraction of the run."""
    if schedule == "wsd":
        return max(float(warmup_steps), total_steps - decay_fraction * total_steps)
    return float(warmup_steps)


def decay_progress(step: torch.Tensor, start: float, total_steps: int) -> torch.Tensor:
    """0 before `start`, rising linearly to exactly 1 at `total_steps`, 1 after."""
    span = max(total_steps - start, 1e-6)  # warmup_steps >= total_steps: straight to the floor
    return 1 - ((total_steps - step) / span).clamp(0.0, 1.0)


def learning_rate(
    step: torch.Tensor,
    *,
    schedule: str,
    peak_lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    decay_fraction: float = 0.2,
) -> torch.Tensor:
    """step: any-shape int or float tensor (0-d in a train step) -> float32 lr of the same shape."""
    check_schedule(
        schedule=schedule,
        peak_lr=peak_lr,
        min_lr=min_lr,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        decay_fraction=decay_fraction,
    )
    step = torch.as_tensor(step).to(torch.float32)
    warmup = peak_lr * ((step + 1) / (warmup_steps + 1)).clamp(max=1.0)
    if schedule == "constant":
        return warmup
    progress = decay_progress(
        step, decay_start(schedule, warmup_steps, total_steps, decay_fraction), total_steps
    )
    if schedule == "cosine":
        shape = 0.5 * (1 + torch.cos(math.pi * progress))
    else:  # linear, wsd
        shape = 1 - progress
    decayed = min_lr + (peak_lr - min_lr) * shape
    return torch.where(step < warmup_steps, warmup, decayed)


def lr_schedule_from_config(optim_cfg, total_steps: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """step -> lr for an `llmfn.config.OptimConfig` over a run of `total_steps` updates."""
    settings = {
        "schedule": optim_cfg.schedule,
        "peak_lr": optim_cfg.lr,
        "min_lr": optim_cfg.min_lr,
        "warmup_steps": optim_cfg.warmup_steps,
        "total_steps": total_steps,
        "decay_fraction": optim_cfg.decay_fraction,
    }
    check_schedule(**settings, names=CONFIG_KEYS)
    return functools.partial(learning_rate, **settings)
