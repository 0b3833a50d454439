"""LossCurvePlot: `run_dir/loss_curve.png`, train and val loss against step; rank 0.

It keeps the train loss of every logged step and the val loss of every eval it sees (and keeps
them in `state_dict()`, so a resumed run plots the whole run), and draws them at the end of
training, or when training raises. Uses matplotlib's Agg canvas directly (no pyplot, no display);
if matplotlib is missing it says so once at the start and skips the plot.
matplotlib is imported when the callback is built, so the import is not timed as training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TextIO

import torch

from llmfn.callbacks.base import Callback, RunInfo
from llmfn.callbacks.output import write_line
from llmfn.callbacks.scalars import to_floats

FILE_NAME = "loss_curve.png"
MISSING_MESSAGE = (
    "LossCurvePlot: matplotlib is not installed, so {path} will not be written "
    "(`pip install 'llmfn[plot]'`, or set logging.plot=false to silence this)"
)


def matplotlib_available() -> bool:
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


def draw_loss_curve(
    path: Path, train: list[list[float]], val: list[list[float]], title: str
) -> None:
    """Write a PNG with `train` ([step, loss] pairs) as a line and `val` as a line with markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if val:
        axes.plot(*zip(*val, strict=True), label="val loss", marker="o", markersize=4)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")


class LossCurvePlot(Callback):
    """Records loss every `every` steps and val_loss at each eval; plots them at the end."""

    def __init__(self, every: int = 10, file_name: str = FILE_NAME, console: TextIO | None = None):
        self.every = every
        self.file_name = file_name
        self.console = console
        self.train: list[list[float]] = []  # [step, loss]
        self.val: list[list[float]] = []  # [step, val_loss]
        self.have_matplotlib = matplotlib_available()  # imported here, not in the timed loop
        self.enabled = self.have_matplotlib

    def on_train_start(self, run: RunInfo) -> None:
        # Points past the resume step belong to the interrupted run; drop them.
        self.train = [p for p in self.train if p[0] <= run.start_step]
        self.val = [p for p in self.val if p[0] <= run.start_step]
        self.enabled = run.is_main and self.have_matplotlib
        if run.is_main and not self.have_matplotlib:
            write_line(
                MISSING_MESSAGE.format(path=Path(run.run_dir) / self.file_name), self.console
            )

    def on_step_end(self, run: RunInfo, step: int, metrics: dict[str, torch.Tensor]) -> None:
        if self.enabled and "loss" in metrics:
            loss = to_floats({"loss": metrics["loss"]}).get("loss")
            if loss is not None and math.isfinite(loss):
                self.train.append([step, loss])

    def on_eval(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        value = to_floats(metrics).get("val_loss")
        if self.enabled and value is not None and math.isfinite(value):
            self.val.append([step, value])

    def plot(self, run: RunInfo) -> None:
        if not self.enabled or not (self.train or self.val):
            return
        path = Path(run.run_dir) / self.file_name
        draw_loss_curve(path, self.train, self.val, title=Path(run.run_dir).name)
        write_line(f"loss curve: {path}", self.console)

    def on_train_end(self, run: RunInfo, step: int) -> None:
        self.plot(run)

    def on_exception(self, run: RunInfo, step: int, error: BaseException) -> None:
        self.plot(run)

    def state_dict(self) -> dict:
        return {"train": self.train, "val": self.val}

    def load_state_dict(self, state: dict) -> None:
        self.train = [[int(s), float(v)] for s, v in state.get("train", [])]
        self.val = [[int(s), float(v)] for s, v in state.get("val", [])]
