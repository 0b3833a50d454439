"""JsonlLogger: `run_dir/metrics.jsonl`, one JSON object per logged step and per eval; rank 0.

    {"kind": "train", "step": 10, "loss": 3.41, "grad_norm": 0.8, "lr": 0.0003, "tokens": 16384.0,
     "step_time_s": 0.21, "tok_per_s": 78019.0, "tokens_seen": 163840, "time": 1717171717.2,
     "elapsed_s": 2.1}
    {"kind": "eval", "step": 100, "val_loss": 3.2, "val_ppl": 24.5, "tokens_seen": 1638400,
     "time": 1717171736.1, "elapsed_s": 21.0}

Values are floats, but `tokens_seen` (the tokens trained on so far, an exact int; absent when
the driver does not count them) and `step`; `time` is the wall clock (unix seconds) and
`elapsed_s` the seconds since the run started, summed over its resumes. NaN and inf are written
as null (strict JSON). Each line is flushed as it is written. On resume the lines after
`start_step` (from the interrupted run) are dropped first, so the file reads as one
uninterrupted run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TextIO

import torch

from llmfn.callbacks.base import FileCallback, RunInfo
from llmfn.callbacks.scalars import finite_or_none, to_floats
from llmfn.callbacks.throughput import TimedCallback

FILE_NAME = "metrics.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (a torn last line from a crash is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def keep_records_up_to(path: Path, last_step: int) -> None:
    """Rewrite `path` keeping only records with step <= last_step (resume after a crash)."""
    kept = [
        r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= last_step
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def last_elapsed(path: Path) -> float:
    """The `elapsed_s` of the last record of `path` (0.0 when there is none)."""
    elapsed = [r["elapsed_s"] for r in read_jsonl(path) if isinstance(r.get("elapsed_s"), float)]
    return elapsed[-1] if elapsed else 0.0


def record(kind: str, step: int, *parts: dict[str, float]) -> dict:
    """{"kind", "step", **parts}; `kind` and the int `step` win over same-named metrics."""
    out: dict = {"kind": kind, "step": step}
    for part in parts:
        out.update({name: value for name, value in part.items() if name not in ("kind", "step")})
    return out


class JsonlLogger(TimedCallback, FileCallback):
    """Appends one JSON line every `every` steps and one per eval to run_dir/metrics.jsonl."""

    def __init__(self, every: int = 10, file_name: str = FILE_NAME):
        super().__init__()
        self.every = every
        self.file_name = file_name
        self.file: TextIO | None = None
        self.start_time = time.perf_counter()

    def on_train_start(self, run: RunInfo) -> None:
        self.start_time = time.perf_counter()
        if run.is_main:
            self.open_file(run)
        super().on_train_start(run)

    def open_file(self, run: RunInfo) -> None:
        """Open run_dir/<file_name>: appended to on resume (after dropping the records past
        `start_step`; `elapsed_s` goes on from the last one kept), truncated otherwise."""
        path = Path(run.run_dir) / self.file_name
        if run.start_step > 0 and path.exists():
            keep_records_up_to(path, run.start_step)
            self.start_time -= last_elapsed(path)
        self.file = path.open("a" if run.start_step > 0 else "w", encoding="utf-8")

    def write(self, run: RunInfo, record: dict) -> None:
        if self.file is None:
            return
        if run.tokens_seen is not None:
            record["tokens_seen"] = int(run.tokens_seen)
        record["time"] = time.time()
        record["elapsed_s"] = time.perf_counter() - self.start_time
        cleaned = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in record.items()}
        self.file.write(json.dumps(cleaned) + "\n")
        self.file.flush()

    def on_step_end(self, run: RunInfo, step: int, metrics: dict[str, torch.Tensor]) -> None:
        if self.file is None:
            return
        values = to_floats(metrics)
        rates = self.throughput.measure(run, step)
        self.write(run, record("train", step, values, rates))

    def on_eval(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        self.write(run, record("eval", step, to_floats(metrics)))
        super().on_eval(run, step, metrics)
