"""ProgressBar: a tqdm bar over optimizer steps with loss, tok/s, MFU (GPU) and ETA; rank 0."""

from __future__ import annotations

import sys
from typing import TextIO

import torch
from tqdm import tqdm

from llmfn.callbacks.base import RunInfo
from llmfn.callbacks.scalars import to_floats
from llmfn.callbacks.throughput import TimedCallback


def bar_postfix(values: dict[str, float], rates: dict[str, float]) -> dict[str, str]:
    """The fields shown right of the bar: loss, val_loss (if seen), tok/s, MFU."""
    postfix = {}
    if "loss" in values:
        postfix["loss"] = f"{values['loss']:.4f}"
    if "val_loss" in values:
        postfix["val_loss"] = f"{values['val_loss']:.4f}"
    if "tok_per_s" in rates:
        postfix["tok/s"] = f"{rates['tok_per_s']:,.0f}"
    if "mfu" in rates:
        postfix["MFU"] = f"{100 * rates['mfu']:.1f}%"
    if "peak_mem_gib" in rates:
        postfix["mem"] = f"{rates['peak_mem_gib']:.1f}G"
    return postfix


class ProgressBar(TimedCallback):
    """Advances every step (no device sync), refreshes loss/tok/s/MFU every `log_every` steps.

    The bar starts at `run.start_step` on resume, so its ETA counts only the steps left.
    MFU appears only when `run.peak_flops` is known (GPU). Without a `console` it draws on stderr
    when that is a terminal, and not at all when output goes to a log file or a pipe (its
    carriage-return redraws would interleave with the console logger's lines there).
    """

    every = 1

    def __init__(self, log_every: int = 10, console: TextIO | None = None):
        if log_every <= 0:
            raise ValueError(
                f"ProgressBar.log_every={log_every!r} is invalid: expected a positive int"
            )
        super().__init__()
        self.log_every = log_every
        self.console = console
        self.bar: tqdm | None = None
        self.shown: dict[str, float] = {}
        self.rates: dict[str, float] = {}

    def on_train_start(self, run: RunInfo) -> None:
        if run.is_main and (self.console is not None or sys.stderr.isatty()):
            self.bar = tqdm(
                total=run.max_steps,
                initial=run.start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=self.console,
            )
        super().on_train_start(run)

    def on_step_end(self, run: RunInfo, step: int, metrics: dict[str, torch.Tensor]) -> None:
        if self.bar is None:
            return
        if step % self.log_every == 0:
            self.shown.update(to_floats(metrics))
            self.rates = self.throughput.measure(run, step)
            self.bar.set_postfix(bar_postfix(self.shown, self.rates), refresh=False)
        self.bar.update(max(0, step - self.bar.n))

    def on_eval(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.shown.update(to_floats(metrics))
            self.bar.set_postfix(bar_postfix(self.shown, self.rates))
        super().on_eval(run, step, metrics)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
