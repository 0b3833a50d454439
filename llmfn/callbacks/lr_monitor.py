"""LRMonitor: makes the learning rate explicit in the logs; rank 0.

At the start it prints the schedule the config asks for; every `every` steps it appends the lr
the step actually used (the `lr` metric) to `run_dir/lr.csv` (`step,lr`), so the schedule can be
checked against what ran. It warns once if the step reports no `lr`, or a negative or non-finite one.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TextIO

import torch

from llmfn.callbacks.base import FileCallback, RunInfo
from llmfn.callbacks.output import write_line
from llmfn.callbacks.scalars import to_floats
from llmfn.schedule import lr_schedule_from_config

FILE_NAME = "lr.csv"
HEADER = "step,lr\n"


def describe_schedule(optim, max_steps: int | None = None) -> str:
    """One line for an OptimConfig: peak, warmup, shape and floor of the lr schedule; with the
    run's `max_steps`, a warning when the run ends inside the warmup."""
    warmup = f"linear warmup over {optim.warmup_steps} steps to " if optim.warmup_steps > 0 else ""
    peak = f"{optim.lr:.2e}"
    if optim.schedule == "constant":
        line = f"lr schedule: {warmup}{peak}, then constant"
    elif optim.schedule == "wsd":
        tail = f"stable, then decay over the last {optim.decay_fraction:.0%} of steps to {optim.min_lr:.2e}"
        line = f"lr schedule: wsd, {warmup}{peak}, {tail}"
    else:
        line = f"lr schedule: {optim.schedule}, {warmup}{peak}, decaying to {optim.min_lr:.2e}"
    if max_steps is not None and optim.warmup_steps >= max_steps:
        last = float(lr_schedule_from_config(optim, max_steps)(torch.tensor(max_steps - 1)))
        line += (
            f"\nwarning: the run's {max_steps} steps end inside optim.warmup_steps="
            f"{optim.warmup_steps}: the lr never exceeds {last:.2e} (lower optim.warmup_steps)"
        )
    return line


def keep_rows_up_to(path: Path, last_step: int) -> None:
    """Rewrite lr.csv keeping the header and rows with step <= last_step (resume)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        step, _, _ = line.partition(",")
        if step.isdigit() and int(step) <= last_step:
            rows.append(line + "\n")
    path.write_text(HEADER + "".join(rows), encoding="utf-8")


class LRMonitor(FileCallback):
    """Prints the schedule at the start and writes `step,lr` every `every` steps to lr.csv."""

    def __init__(
        self,
        every: int = 10,
        file_name: str = FILE_NAME,
        print_schedule: bool = True,
        console: TextIO | None = None,
    ):
        self.every = every
        self.file_name = file_name
        self.print_schedule = print_schedule
        self.console = console
        self.file: TextIO | None = None
        self.warned = False

    def on_train_start(self, run: RunInfo) -> None:
        if not run.is_main:
            return
        if self.print_schedule:
            write_line(describe_schedule(run.config.optim, run.max_steps), self.console)
        path = Path(run.run_dir) / self.file_name
        if run.start_step > 0 and path.exists():
            keep_rows_up_to(path, run.start_step)
            self.file = path.open("a", encoding="utf-8")
        else:
            self.file = path.open("w", encoding="utf-8")
            self.file.write(HEADER)

    def warn_once(self, message: str) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(f"LRMonitor: {message}", stacklevel=3)

    def on_step_end(self, run: RunInfo, step: int, metrics: dict[str, torch.Tensor]) -> None:
        if self.file is None:
            return
        if "lr" not in metrics:
            self.warn_once(
                f"the train step reports no 'lr' metric (got {sorted(metrics)}); nothing to monitor"
            )
            return
        lr = to_floats({"lr": metrics["lr"]}).get("lr", math.nan)
        if not math.isfinite(lr) or lr < 0:
            self.warn_once(f"lr={lr} at step {step} is not a finite non-negative number")
        self.file.write(f"{step},{lr!r}\n")
        self.file.flush()
