"""TensorBoardLogger: scalars under `run_dir/tensorboard/` (needs the `tensorboard` extra); rank 0.

Tags: `train/<metric>` every `every` steps (loss, grad_norm, lr, ...), `perf/tok_per_s`,
`perf/mfu`, `perf/step_time_s`, and `val/<metric>` at each eval (`val_loss` -> `val/loss`).
View with `tensorboard --logdir runs/`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmfn.callbacks.base import RunInfo
from llmfn.callbacks.scalars import to_floats
from llmfn.callbacks.throughput import TimedCallback

MISSING_MESSAGE = (
    "logging.tensorboard=true needs the tensorboard package, which is not installed: "
    "`pip install 'llmfn[tensorboard]'` (or `pip install tensorboard`), or set logging.tensorboard=false"
)


def summary_writer_class():
    """torch's SummaryWriter; an ImportError that says how to install it if it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(MISSING_MESSAGE) from err
    return SummaryWriter


def check_tensorboard_installed() -> None:
    """ValueError with the install command when tensorboard cannot be imported: the driver
    calls it for logging.tensorboard=true before it prepares data or writes any file."""
    try:
        summary_writer_class()
    except ImportError as err:
        raise ValueError(MISSING_MESSAGE) from err


def val_tag(name: str) -> str:
    """`val_loss` -> `val/loss`; other eval metrics go under `val/` as they are."""
    return "val/" + name.removeprefix("val_")


class TensorBoardLogger(TimedCallback):
    """Writes scalars to an event file in run_dir/<subdir>; fails at construction, with the
    install command, if tensorboard is not installed."""

    def __init__(self, every: int = 10, subdir: str = "tensorboard"):
        super().__init__()
        self.every = every
        self.subdir = subdir
        self.writer_class = summary_writer_class()
        self.writer = None

    def on_train_start(self, run: RunInfo) -> None:
        if run.is_main:
            # purge_step drops events after the resume point left by an interrupted run.
            purge_step = run.start_step + 1 if run.start_step > 0 else None
            self.writer = self.writer_class(
                log_dir=str(Path(run.run_dir) / self.subdir), purge_step=purge_step
            )
        super().on_train_start(run)

    def on_step_end(self, run: RunInfo, step: int, metrics: dict[str, torch.Tensor]) -> None:
        if self.writer is None:
            return
        for name, value in to_floats(metrics).items():
            self.writer.add_scalar(f"train/{name}", value, step)
        for name, value in self.throughput.measure(run, step).items():
            self.writer.add_scalar(f"perf/{name}", value, step)

    def on_eval(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in to_floats(metrics).items():
                self.writer.add_scalar(val_tag(name), value, step)
            self.writer.flush()
        super().on_eval(run, step, metrics)

    def on_checkpoint(self, run: RunInfo, step: int, path: Path) -> None:
        if self.writer is not None:
            self.writer.flush()
        super().on_checkpoint(run, step, path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
