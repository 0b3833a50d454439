"""Tokens per second and MFU from the wall time between two logged steps, and on a GPU the
run's peak memory so far.

The clock runs from one measurement to the next, so each number is the throughput of the steps
in between. The caller syncs the device first (`.item()` on a metric), so queued GPU work is
included. `restart` after an eval, sample or checkpoint keeps their time out of the next number;
`TimedCallback` does that for the callbacks that report throughput.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from llmfn.callbacks.base import Callback, RunInfo


def model_flops_utilization(run: RunInfo, tokens_per_second: float) -> float | None:
    """flops_per_token * tok/s / (peak_flops * world_size), as a fraction; None if unknown."""
    if not run.peak_flops or run.flops_per_token <= 0:
        return None
    return run.flops_per_token * tokens_per_second / (run.peak_flops * run.world_size)


def peak_memory_gib(device: torch.device | None) -> float | None:
    """The most memory tensors have held on a CUDA device since the run started, in GiB (what
    decides whether a larger batch fits); None elsewhere. Never reset, so every callback that
    asks reads the same number."""
    if device is None or device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


class Throughput:
    """Measures step rate between calls: `restart(step)` once, then `measure(run, step)`."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.last_time: float | None = None
        self.last_step: int | None = None

    def restart(self, step: int) -> None:
        self.last_time = self.clock()
        self.last_step = step

    def measure(self, run: RunInfo, step: int) -> dict[str, float]:
        """{"step_time_s", "tok_per_s" (if tokens are counted), "mfu" (if peak is known),
        "peak_mem_gib" (on CUDA)} for the steps since the last call; {} (and a restart) if there
        is nothing to measure."""
        now = self.clock()
        last_time, last_step = self.last_time, self.last_step
        self.last_time, self.last_step = now, step
        if last_time is None or last_step is None or step <= last_step or now <= last_time:
            return {}
        seconds, steps = now - last_time, step - last_step
        rates = {"step_time_s": seconds / steps}
        if run.tokens_per_step > 0:
            rates["tok_per_s"] = steps * run.tokens_per_step / seconds
            mfu = model_flops_utilization(run, rates["tok_per_s"])
            if mfu is not None:
                rates["mfu"] = mfu
        memory = peak_memory_gib(run.device)
        if memory is not None:
            rates["peak_mem_gib"] = memory
        return rates


class TimedCallback(Callback):
    """A callback that reports `self.throughput.measure(run, step)` in `on_step_end`.

    The clock starts with training and restarts after each eval and checkpoint, so their time is
    not counted as training. A subclass that overrides one of these hooks does its own printing
    or writing first and calls `super()` last, so that time is not counted either.
    """

    def __init__(self):
        self.throughput = Throughput()

    def on_train_start(self, run: RunInfo) -> None:
        self.throughput.restart(run.start_step)

    def on_eval(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        self.throughput.restart(step)

    def on_checkpoint(self, run: RunInfo, step: int, path: Path) -> None:
        self.throughput.restart(step)
