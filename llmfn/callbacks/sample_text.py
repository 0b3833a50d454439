"""SampleText: prints a generated sample at eval time and at the end of training; rank 0.

It calls `run.sample_fn(prompt, max_new_tokens)` (set by the driver for language models) at the
first eval in each `sample_every`-step window (0 = only at the end) and once at the end. Samples
are also appended to `run_dir/samples.txt`. Does nothing if `run.sample_fn` is None.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from llmfn.callbacks.base import Callback, RunInfo
from llmfn.callbacks.output import write_line

FILE_NAME = "samples.txt"


class SampleText(Callback):
    """Samples `max_new_tokens` tokens after `prompt` every `sample_every` steps (at evals) and at the end."""

    def __init__(
        self,
        sample_every: int = 0,
        prompt: str = "",
        max_new_tokens: int = 128,
        console: TextIO | None = None,
        file_name: str | None = FILE_NAME,
    ):
        if sample_every < 0:
            raise ValueError(
                f"SampleText sample_every={sample_every!r} is invalid: expected >= 0 (train.sample_every; 0 = only at the end)"
            )
        if max_new_tokens <= 0:
            raise ValueError(
                f"SampleText max_new_tokens={max_new_tokens!r} is invalid: expected > 0 (train.sample_tokens)"
            )
        self.sample_every = sample_every
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.console = console
        self.file_name = file_name
        self.window_step = 0  # the last step sampled, or the start step: windows count from it
        self.sampled_at: int | None = None

    def sample(self, run: RunInfo, step: int) -> None:
        if not run.is_main or run.sample_fn is None:
            return
        text = run.sample_fn(self.prompt, self.max_new_tokens)
        self.window_step = self.sampled_at = step
        block = f"--- sample at step {step} (prompt {self.prompt!r}) ---\n{text}\n---"
        write_line(block, self.console)
        if self.file_name is not None:
            with (Path(run.run_dir) / self.file_name).open("a", encoding="utf-8") as out:
                out.write(block + "\n")

    def due(self, step: int) -> bool:
        """True at the first eval in a new `sample_every` window (steps need not line up with evals)."""
        if self.sample_every == 0:
            return False
        return step // self.sample_every > self.window_step // self.sample_every

    def on_train_start(self, run: RunInfo) -> None:
        self.window_step = run.start_step
        self.sampled_at = None

    def on_eval(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        if self.due(step):
            self.sample(run, step)

    def on_train_end(self, run: RunInfo, step: int) -> None:
        if self.sampled_at != step and not run.stop_signal:  # a signal asks to stop quickly
            self.sample(run, step)
