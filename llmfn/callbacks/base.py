"""The callback contract: what the training driver calls, and what a callback may read.

The driver builds one `RunInfo` and one `CallbackList`, then calls the hooks in this order:

    on_train_start(run)
    for each optimizer step:  on_step_end(run, step, metrics)     # if step % every == 0
        at eval time:         on_eval(run, step, {"val_loss", "val_ppl", ...})
        after a save:         on_checkpoint(run, step, path)
    on_train_end(run, step)   # or on_exception(run, step, error) if training raised

The step a run ends at (max_steps, early stopping, a stop signal) also reaches the callbacks its
`every` skipped (`CallbackList.on_last_step_end`), so the last step is always logged, once.
`metrics` in `on_step_end` are tensors straight out of the compiled step; `.item()` is the host
sync, so call it only there, which runs only every `every` steps.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch

if TYPE_CHECKING:
    from llmfn.config import Config


@dataclass
class RunInfo:
    """What callbacks may read about the run; built by the driver, shared by all callbacks."""

    config: Config
    run_dir: Path  # the run folder (exists; rank 0 writes there)
    is_main: bool  # rank 0: callbacks that write or print do nothing otherwise
    max_steps: int
    start_step: int  # > 0 after a resume
    tokens_per_step: int  # global tokens per optimizer step (0 for regression)
    flops_per_token: int  # 0 if unknown
    peak_flops: float | None  # per-device peak FLOP/s (None on CPU -> no MFU shown)
    world_size: int
    sample_fn: Callable[[str, int], str] | None  # (prompt, max_new_tokens) -> text, lm only
    device: torch.device | None = None  # where the step runs (cuda: peak memory is reported)
    stop_requested: bool = False  # a callback sets this to end training (early stopping)
    stop_signal: str | None = None  # "SIGINT" / "SIGTERM" when a signal ended the run
    # The driver's running count of tokens trained on (a 0-d int64 tensor on the device, updated
    # in place each step; reading it is a host sync, so read it only when logging).
    tokens_seen: torch.Tensor | None = None


class Callback:
    """A no-op base: subclasses override the hooks they need.

    `every`: `on_step_end` runs only when `step % every == 0` (other hooks always run).
    `state_dict()` must be JSON-able; it is saved in checkpoints and restored on resume.
    `close()` releases what the callback holds (a file, a progress bar); the default
    `on_train_end` and `on_exception` call it.
    """

    every: int = 1

    @property
    def name(self) -> str:
        """The key of this callback's state in `CallbackList.state_dict()`."""
        return type(self).__name__

    def on_train_start(self, run: RunInfo) -> None:
        pass

    def on_step_end(self, run: RunInfo, step: int, metrics: dict[str, torch.Tensor]) -> None:
        pass

    def on_eval(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, run: RunInfo, step: int, path: Path) -> None:
        pass

    def on_train_end(self, run: RunInfo, step: int) -> None:
        self.close()

    def on_exception(self, run: RunInfo, step: int, error: BaseException) -> None:
        self.close()

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FileCallback(Callback):
    """A callback that writes one file in the run folder: subclasses open `self.file` in
    `on_train_start` (main process only); it is closed at the end of training or on an error."""

    file: TextIO | None = None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _check_every(callback: Callback) -> None:
    every = callback.every
    if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
        raise ValueError(f"{callback.name}.every={every!r} is invalid: expected a positive int")


def _failed(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"failed: {error!r}"


def _unique_names(callbacks: list[Callback]) -> list[str]:
    """Class names, with `_1`, `_2`, ... appended to repeats, in list order."""
    seen: dict[str, int] = {}
    names = []
    for callback in callbacks:
        count = seen.get(callback.name, 0)
        seen[callback.name] = count + 1
        names.append(callback.name if count == 0 else f"{callback.name}_{count}")
    return names


class CallbackList(Callback):
    """Dispatches each hook to every callback, in list order, respecting each one's `every`."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks: list[Callback] = []
        for callback in callbacks:
            self.append(callback)

    def append(self, callback: Callback) -> None:
        if not isinstance(callback, Callback):
            raise TypeError(f"CallbackList takes Callback instances, got {type(callback).__name__}")
        _check_every(callback)
        self.callbacks.append(callback)

    def __iter__(self) -> Iterator[Callback]:
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def __getitem__(self, index: int) -> Callback:
        return self.callbacks[index]

    def on_train_start(self, run: RunInfo) -> None:
        for callback in self.callbacks:
            callback.on_train_start(run)

    def on_step_end(self, run: RunInfo, step: int, metrics: dict[str, torch.Tensor]) -> None:
        for callback in self.callbacks:
            if step % callback.every == 0:
                callback.on_step_end(run, step, metrics)

    def on_last_step_end(self, run: RunInfo, step: int, metrics: dict[str, torch.Tensor]) -> None:
        """on_step_end for the callbacks whose `every` skipped `step`: the driver calls it on
        the step the run ends at, so that step is logged, and no step twice."""
        for callback in self.callbacks:
            if step % callback.every != 0:
                callback.on_step_end(run, step, metrics)

    def on_eval(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_eval(run, step, metrics)

    def on_checkpoint(self, run: RunInfo, step: int, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(run, step, path)

    def on_train_end(self, run: RunInfo, step: int) -> None:
        """Every callback ends, even after one failed or was interrupted (Ctrl-C during the
        final sample): each failure is reported on stderr, then the first is raised."""
        failures = []
        for callback in self.callbacks:
            try:
                callback.on_train_end(run, step)
            except BaseException as error:  # raised again below, once the rest have ended
                print(f"{callback.name}.on_train_end {_failed(error)}", file=sys.stderr)
                failures.append(error)
        if failures:
            raise failures[0]

    def on_exception(self, run: RunInfo, step: int, error: BaseException) -> None:
        """Every callback gets the error; one that fails here must not hide it, so its own
        error is reported on stderr and the next callback still runs."""
        for callback in self.callbacks:
            try:
                callback.on_exception(run, step, error)
            except Exception as own_error:  # the driver re-raises `error` itself
                print(f"{callback.name}.on_exception failed: {own_error!r}", file=sys.stderr)

    def state_dict(self) -> dict:
        """{name: state} for every callback (name = class name, `_1`... for repeats)."""
        names = _unique_names(self.callbacks)
        return {
            name: callback.state_dict()
            for name, callback in zip(names, self.callbacks, strict=True)
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore each callback whose name is in `state`; names not in this list are ignored
        (the callback set may change between runs), callbacks not in `state` keep their
        fresh state."""
        if not isinstance(state, dict):
            raise TypeError(
                f"CallbackList.load_state_dict expects a dict of {{name: state}}, got {type(state).__name__}"
            )
        names = _unique_names(self.callbacks)
        for name, callback in zip(names, self.callbacks, strict=True):
            if name in state:
                callback.load_state_dict(state[name])
