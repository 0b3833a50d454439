"""EarlyStopping: end training after `patience` evals in a row without improvement.

An eval improves when its value is finite and below `best - min_delta`. After `patience`
non-improving evals in a row it sets `run.stop_requested`; the driver then stops. The final
eval of a run that reached max_steps stops nothing (the run ended anyway), so a resume with a
larger max_steps trains on; its bad evals still count there. It runs on
every rank (eval metrics are identical across ranks), so all ranks stop at the same step; only
rank 0 prints. Its counters are in `state_dict()`, so a resumed run keeps counting.
"""

from __future__ import annotations

import math
from typing import TextIO

from llmfn.callbacks.base import Callback, RunInfo
from llmfn.callbacks.output import write_line
from llmfn.callbacks.scalars import to_floats


class EarlyStopping(Callback):
    """Stops after `patience` evals whose `monitor` did not drop below best - min_delta."""

    def __init__(
        self,
        patience: int,
        min_delta: float = 0.0,
        monitor: str = "val_loss",
        console: TextIO | None = None,
    ):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(
                f"EarlyStopping patience={patience!r} is invalid: expected an int >= 1 (train.early_stopping_patience)"
            )
        if not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(
                f"EarlyStopping min_delta={min_delta!r} is invalid: expected a finite float >= 0 (train.early_stopping_min_delta)"
            )
        self.patience = patience
        self.min_delta = float(min_delta)
        self.monitor = monitor
        self.console = console
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.stopped_step: int | None = None

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return self.best is None or value < self.best - self.min_delta

    def on_eval(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        values = to_floats(metrics)
        if self.monitor not in values:
            raise KeyError(
                f"EarlyStopping monitors '{self.monitor}', but the eval metrics have only {sorted(values)}"
            )
        value = values[self.monitor]
        if self.improves(value):
            self.best, self.best_step, self.bad_evals = value, step, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience and step < run.max_steps:  # not a run that ended
            run.stop_requested = True
            self.stopped_step = step
            if run.is_main:
                best = (
                    f"{self.best:.4f} at step {self.best_step}"
                    if self.best is not None
                    else "none (no finite value)"
                )
                write_line(
                    f"early stopping at step {step}: {self.monitor} has not improved by more than "
                    f"{self.min_delta:g} for {self.bad_evals} evals (best {best})",
                    self.console,
                )

    def state_dict(self) -> dict:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "stopped_step": self.stopped_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best = None if state.get("best") is None else float(state["best"])
        self.best_step = state.get("best_step")
        self.bad_evals = int(state.get("bad_evals", 0))
        self.stopped_step = state.get("stopped_step")


def stopped_early(callback_states: dict, patience: int | None) -> bool:
    """Whether a checkpoint's EarlyStopping (callback_states: its train_state's "callbacks")
    stopped its run and, with `patience` (train.early_stopping_patience), would stop it again
    at once: a resumed run then has nothing to train. None = no early stopping."""
    state = callback_states.get(EarlyStopping.__name__, {})
    return (
        patience is not None
        and state.get("stopped_step") is not None
        and int(state.get("bad_evals", 0)) >= patience
    )
