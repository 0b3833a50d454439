"""ConsoleLogger: one line per logged step, one per eval, on rank 0.

step   120/1000 | loss 3.4512 | grad_norm 0.812 | lr 3.00e-04 | 12,345 tok/s | MFU 35.2% | mem 14.2 GiB
eval   100/1000 | val_loss 3.2100 | val_ppl 24.78
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TextIO

import torch

from llmfn.callbacks.base import RunInfo
from llmfn.callbacks.output import write_line
from llmfn.callbacks.scalars import to_floats
from llmfn.callbacks.throughput import TimedCallback

MAIN_METRICS = ("loss", "grad_norm", "lr")
NOT_PRINTED = (
    "tokens",
    "step",
    "nonfinite",
    "skipped",
)  # bookkeeping; the driver reports non-finite steps


def format_value(name: str, value: float) -> str:
    """`lr` in scientific notation, counts without decimals, the rest with 4 significant digits."""
    if not math.isfinite(value):
        return str(value)
    if name == "lr":
        return f"{value:.2e}"
    if name in ("loss", "val_loss"):
        return f"{value:.4f}"
    if value == int(value) and abs(value) >= 1:
        return f"{int(value):,}"
    return f"{value:.4g}"


def format_rates(rates: dict[str, float]) -> list[str]:
    """tok/s (else s/step), MFU and peak memory (GPU), as console fields."""
    fields = []
    if "tok_per_s" in rates:
        fields.append(f"{rates['tok_per_s']:,.0f} tok/s")
    elif "step_time_s" in rates:
        fields.append(f"{rates['step_time_s']:.3g} s/step")
    if "mfu" in rates:
        fields.append(f"MFU {100 * rates['mfu']:.1f}%")
    if "peak_mem_gib" in rates:
        fields.append(f"mem {rates['peak_mem_gib']:.1f} GiB")
    return fields


def format_step_line(
    run: RunInfo, step: int, values: dict[str, float], rates: dict[str, float]
) -> str:
    """`step  s/max | loss .. | grad_norm .. | lr .. | <other metrics> | tok/s | MFU | mem`."""
    width = len(str(run.max_steps))
    names = [n for n in MAIN_METRICS if n in values]
    names += [n for n in values if n not in MAIN_METRICS and n not in NOT_PRINTED]
    fields = [f"step {step:>{width}}/{run.max_steps}"]
    fields += [f"{name} {format_value(name, values[name])}" for name in names]
    return " | ".join(fields + format_rates(rates))


def format_eval_line(run: RunInfo, step: int, values: dict[str, float]) -> str:
    width = len(str(run.max_steps))
    fields = [f"eval {step:>{width}}/{run.max_steps}"]
    fields += [f"{name} {format_value(name, value)}" for name, value in values.items()]
    return " | ".join(fields)


class ConsoleLogger(TimedCallback):
    """Prints step lines every `every` steps and eval lines, on rank 0 only.

    tok/s and MFU are the throughput of the steps since the previous logged line; the clock
    restarts after each eval and checkpoint so their time is not counted as training time.
    """

    def __init__(self, every: int = 10, console: TextIO | None = None):
        super().__init__()
        self.every = every
        self.console = console

    def print(self, run: RunInfo, text: str) -> None:
        if run.is_main:
            write_line(text, self.console)

    def on_train_start(self, run: RunInfo) -> None:
        resumed = f" (resumed at step {run.start_step})" if run.start_step > 0 else ""
        tokens = f", {run.tokens_per_step:,} tokens/step" if run.tokens_per_step > 0 else ""
        self.print(
            run,
            f"training to step {run.max_steps}{resumed}{tokens}, {run.world_size} process(es), logs in {run.run_dir}",
        )
        super().on_train_start(run)

    def on_step_end(self, run: RunInfo, step: int, metrics: dict[str, torch.Tensor]) -> None:
        if not run.is_main:
            return
        values = to_floats(metrics)
        rates = self.throughput.measure(run, step)
        self.print(run, format_step_line(run, step, values, rates))

    def on_eval(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        self.print(run, format_eval_line(run, step, to_floats(metrics)))
        super().on_eval(run, step, metrics)

    def on_checkpoint(self, run: RunInfo, step: int, path: Path) -> None:
        self.print(run, f"saved checkpoint at step {step}: {path}")
        super().on_checkpoint(run, step, path)

    def on_train_end(self, run: RunInfo, step: int) -> None:
        if run.stop_signal:
            self.print(run, f"training stopped at step {step} by {run.stop_signal}")
            return
        stopped = " (stop requested)" if run.stop_requested else ""
        self.print(run, f"training finished at step {step}{stopped}")

    def on_exception(self, run: RunInfo, step: int, error: BaseException) -> None:
        self.print(run, f"training stopped at step {step} by {type(error).__name__}: {error}")
