"""Profiler: a `torch.profiler` trace of a few steady-state training steps; rank 0.

It starts the profiler at the end of step `profile_at` and stops it at the end of step
`profile_at + profile_steps`, so steps a = profile_at + 1 .. b = profile_at + profile_steps are
recorded (each marked `train step <N>` in the trace). Then it writes

    run_dir/profile/trace_steps_<a>-<b>.json    Chrome trace: open in https://ui.perfetto.dev
                                                or chrome://tracing
    run_dir/profile/top_ops_steps_<a>-<b>.txt   the 30 ops with the most self time: CUDA time
                                                on a GPU, CPU time otherwise (the step ranges
                                                are left out: their self time is Python's)

and prints one line naming both. On CUDA it records GPU kernels too and synchronizes before
starting and before stopping, so the window holds the device work of exactly those steps.

If training ends or raises inside the window, what was recorded so far is written (b is then the
last step). A run resumed at or after `profile_at` does not profile, and says so in one line.
Profiling slows the recorded steps, and writing the files takes time at the end of the last one,
so the loggers' tok/s and MFU for the logged steps that overlap the window are low (the profiler's
one-time setup, seconds, is done in `on_train_start`, before the loggers start their clocks).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from llmfn.callbacks.base import Callback, RunInfo
from llmfn.callbacks.output import write_line

FOLDER = "profile"
TOP_OPS_ROWS = 30
KINETO_QUIET = "6"  # above its ERROR level: nothing printed
STEP_MARKER = "train step "  # + N: the trace's range for each recorded step (not an op)


def _is_cuda(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda"


def _activities(device: torch.device | None) -> list[ProfilerActivity]:
    """CPU ops, and CUDA kernels when training runs on a GPU."""
    return (
        [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        if _is_cuda(device)
        else [ProfilerActivity.CPU]
    )


class Profiler(Callback):
    """Records steps `profile_at + 1 .. profile_at + profile_steps` with `torch.profiler`.

    `record_shapes` (input shapes per op) and `with_stack` (Python stacks per op) make the trace
    more detailed and the recorded steps slower; both are off by default.
    """

    every = 1  # it must see the end of every step in its window

    def __init__(
        self,
        profile_at: int,
        profile_steps: int = 3,
        *,
        record_shapes: bool = False,
        with_stack: bool = False,
        console: TextIO | None = None,
    ):
        for key, value in (("profile_at", profile_at), ("profile_steps", profile_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"Profiler {key}={value!r} is invalid: expected a positive int (logging.{key})"
                )
        self.profile_at = profile_at
        self.profile_steps = profile_steps
        self.record_shapes = record_shapes
        self.with_stack = with_stack
        self.console = console
        self.profiler: profile | None = None  # set while recording
        self.step_marker: record_function | None = None  # the open `train step <N>` range
        self.first_step = profile_at + 1
        self.last_step = profile_at + profile_steps
        self.steps_ended = profile_at  # the last step whose end the profiler saw
        self.run_dir: Path | None = None
        self.device: torch.device | None = None

    @property
    def recording(self) -> bool:
        return self.profiler is not None

    def on_train_start(self, run: RunInfo) -> None:
        if not run.is_main:
            return
        if run.start_step >= self.profile_at:
            write_line(
                f"profiler: not profiling: this run resumed at step {run.start_step}, "
                f"at or after logging.profile_at={self.profile_at}",
                self.console,
            )
        elif self.profile_at >= run.max_steps:
            write_line(
                f"profiler: not profiling: logging.profile_at={self.profile_at} is not before "
                f"the last step ({run.max_steps})",
                self.console,
            )
        else:
            self.warm_up(run)

    def warm_up(self, run: RunInfo) -> None:
        """Start and stop an empty profile: the first start in a process sets the profiler up
        (seconds), which done here, before the loggers start their clocks, is not timed as
        training. Off CUDA, the profiler's C++ side (kineto) is told to keep quiet unless the
        user set KINETO_LOG_LEVEL: it prints start/stop lines and a failed GPU count to stderr,
        which mean nothing on a CPU (on a GPU its messages, e.g. about CUPTI, stay)."""
        if not _is_cuda(run.device):
            os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_QUIET)
        with profile(activities=_activities(run.device)):
            pass

    def on_step_end(self, run: RunInfo, step: int, metrics: dict[str, torch.Tensor]) -> None:
        if not run.is_main:
            return
        if not self.recording:
            if step == self.profile_at and step < run.max_steps:
                self.start(run)
            return
        self.end_step_marker()
        self.steps_ended = step
        if step >= self.last_step:
            self.finish(step)
        else:
            self.begin_step_marker(step + 1)

    def on_train_end(self, run: RunInfo, step: int) -> None:
        self.finish(step)

    def on_exception(self, run: RunInfo, step: int, error: BaseException) -> None:
        # `step` was running when it raised: its recorded part is kept. No device sync: after a
        # CUDA error it would raise again, and the trace would be lost.
        self.finish(step, synchronize=False)

    def close(self) -> None:
        self.finish(self.steps_ended)

    def start(self, run: RunInfo) -> None:
        """Start recording at the end of step `profile_at`."""
        self.run_dir, self.device = Path(run.run_dir), run.device
        if _is_cuda(run.device):
            torch.cuda.synchronize(run.device)  # earlier steps' kernels stay out of the window
        self.profiler = profile(
            activities=_activities(run.device),
            record_shapes=self.record_shapes,
            with_stack=self.with_stack,
        )
        self.profiler.start()
        self.steps_ended = self.profile_at
        self.begin_step_marker(self.first_step)

    def begin_step_marker(self, step: int) -> None:
        self.step_marker = record_function(f"{STEP_MARKER}{step}")
        self.step_marker.__enter__()

    def end_step_marker(self) -> None:
        if self.step_marker is not None:
            self.step_marker.__exit__(None, None, None)
            self.step_marker = None

    def finish(self, last_step: int, synchronize: bool = True) -> None:
        """Stop recording and write steps `first_step .. last_step`; nothing if none ran."""
        if not self.recording:
            return
        profiler, self.profiler = self.profiler, None
        self.end_step_marker()
        if synchronize and _is_cuda(self.device):
            torch.cuda.synchronize(self.device)  # the window's queued kernels finish inside it
        profiler.stop()
        if last_step < self.first_step:  # training ended at step profile_at itself
            return
        self.write(profiler, min(last_step, self.last_step))

    def write(self, profiler: profile, last_step: int) -> None:
        folder = self.run_dir / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        steps = f"steps_{self.first_step}-{last_step}"
        trace, top_ops = folder / f"trace_{steps}.json", folder / f"top_ops_{steps}.txt"
        profiler.export_chrome_trace(str(trace))
        sort_by = "self_device_time_total" if _is_cuda(self.device) else "self_cpu_time_total"
        averages = profiler.key_averages()  # per op name, over the window
        averages[:] = [op for op in averages if not op.key.startswith(STEP_MARKER)]
        table = averages.table(sort_by=sort_by, row_limit=TOP_OPS_ROWS)
        top_ops.write_text(table + "\n", encoding="utf-8")
        write_line(
            f"profiler: steps {self.first_step}-{last_step} recorded: trace {trace} "
            f"(open in https://ui.perfetto.dev or chrome://tracing), top ops {top_ops}",
            self.console,
        )
