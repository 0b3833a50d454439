"""The training driver: composes config, data module, task, the compiled step, callbacks and
checkpoints into one loop that runs on one process or many (torchrun).

    result = train(load_config("configs/tiny.yaml", ["train.max_steps=100"]))
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tensordict import TensorDict

from llmfn import checkpoint as ckpt
from llmfn.allocator import keep_freed_memory
from llmfn.callbacks import CallbackList, RunInfo, default_callbacks
from llmfn.callbacks.tensorboard_logger import check_tensorboard_installed
from llmfn.config import HOLDS_OUT, Config, to_yaml
from llmfn.data import build_data_module
from llmfn.data.data_module import DataModule
from llmfn.devices import is_out_of_memory, set_determinism
from llmfn.distributed import (
    GradientAllReduce,
    ProcessInfo,
    RankZeroFailed,
    barrier,
    init_process,
    log,
    on_rank_zero_first,
    shutdown,
)
from llmfn.evaluation import batch_to, evaluate, make_sample_fn
from llmfn.memory_estimate import cpu_memory_warning
from llmfn.model import count_params, flops_per_token
from llmfn.optim import build_optimizer
from llmfn.resume import (
    CheckpointNotShared,
    batch_layout,
    nothing_to_train,
    resumed_state,
    start_from_weights,
)
from llmfn.run_folders import (
    check_output_folders,
    naming_the_run_folder,
    owning_run,
    run_folder,
    write_run_files,
)
from llmfn.schedule import lr_schedule_from_config
from llmfn.step import init_train_state, make_eval_step, make_train_step
from llmfn.stopping import SignalCheck, StopSignal, TrainingHalted, nonfinite_report
from llmfn.tasks import get_task
from llmfn.tasks.base import Task
from llmfn.warning_format import prints_for_every_rank

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float | None
    stopped_by: str  # "max_steps" | "early_stopping" | "SIGINT" | "SIGTERM"


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


# --- setup ------------------------------------------------------------------------------------
def slow_precision_warning(precision: str, device: torch.device) -> str | None:
    """A warning when the precision will run far below the hardware's speed: autocast to a
    16-bit float on a CPU without AVX512/AMX (oneDNN has no bf16/fp16 matmul there and a
    reference kernel runs instead, ~160x slower than float32 for a 2048x512x2048 matmul on an
    AVX2 CPU), or full float32 on a GPU (its matmuls without tensor cores: torch's default
    float32 matmul precision is "highest", no TF32)."""
    if device.type == "cuda" and precision == "fp32":
        if torch.get_float32_matmul_precision() != "highest":
            return None  # the user's process already allows TF32
        return (
            "warning: train.precision=fp32 on a GPU runs float32 matmuls without tensor cores; "
            "train.precision=bf16 (autocast, params and optimizer state stay float32) is many "
            "times faster"
        )
    if device.type != "cpu" or precision == "fp32":
        return None
    supported = {
        "bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported,
        "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported,
    }[precision]()
    if supported:
        return None
    return (
        f"warning: train.precision={precision} on a CPU without {precision} matmul support "
        f"({torch.backends.cpu.get_cpu_capability()}): steps will be many times slower than "
        "train.precision=fp32"
    )


def fit_vocab_to_tokenizer(config: Config, data, proc: ProcessInfo) -> Config:
    """Grow model.vocab_size to the tokenizer's when it is smaller (a larger one is padding)."""
    vocab = getattr(data, "vocab_size", None)
    if vocab is None or config.model.vocab_size >= vocab:
        return config
    log(
        proc, f"model.vocab_size: {config.model.vocab_size} -> {vocab} (the tokenizer's vocabulary)"
    )
    return config.replace(model=config.model.replace(vocab_size=vocab))


def resolve_max_steps(config: Config, data) -> int:
    if config.train.epochs is None:
        return config.train.max_steps
    per_epoch = data.steps_per_epoch
    if not per_epoch:
        raise ValueError(
            f"train.epochs={config.train.epochs} needs a finite dataset; data.module={config.data.module!r} has no epochs (use train.max_steps)"
        )
    return max(1, config.train.epochs * per_epoch // config.train.grad_accum_steps)


def no_validation_note(config: Config) -> str:
    """Said once when an eval finds no val batches: why, and what the config then does not do."""
    data = config.data
    if data.module in HOLDS_OUT:
        why = f"data.val_fraction={data.val_fraction}"
    else:
        why = f"data.module={data.module} yields none"
    idle = "no val_loss is logged" + (
        " and checkpoint.save_best keeps no best/" if config.checkpoint.save_best else ""
    )
    return f"note: no validation batches ({why}): {idle}"


def check_batch_keys(task, batch: dict) -> None:
    missing = [key for key in task.batch_keys if key not in batch]
    if missing:
        raise ValueError(
            f"train.task={task.name!r} needs batches with {list(task.batch_keys)}, but the data module gives "
            f"{sorted(batch)}: choose a data.module that fits the task"
        )


def stacked_train_batch(data, step: int, accum: int, device: torch.device) -> dict:
    """The micro-batches of `step`, stacked as [A, B, ...]."""
    micro = [data.train_batch(step * accum + i) for i in range(accum)]
    return batch_to({k: torch.stack([m[k] for m in micro]) for k in micro[0]}, device)


# --- the loop ---------------------------------------------------------------------------------
def train(config: Config, *, callbacks: list | None = None) -> TrainResult:
    """Train as `config` says; `callbacks` (Callback objects) run after the default ones."""
    proc = init_process(
        config.train.device, config.distributed.backend, config.distributed.timeout_s
    )
    try:
        return _train(config, proc, callbacks or [])
    finally:
        shutdown()


def _train(config: Config, proc: ProcessInfo, extra_callbacks: list) -> TrainResult:
    torch.manual_seed(config.train.seed)
    set_determinism(config.train.deterministic, proc.device)
    task = get_task(config.train.task)  # an unknown name fails before the data is prepared
    check_output_folders(config)
    if config.logging.tensorboard:
        check_tensorboard_installed()  # before the data is prepared or any file is written
    warning = slow_precision_warning(config.train.precision, proc.device)
    if warning:
        log(proc, warning)

    data = build_data_module(config.data, seq_len=config.model.max_seq_len, seed=config.train.seed)
    on_rank_zero_first(data.prepare, proc, "preparing the data")
    data.setup(rank=proc.rank, world_size=proc.world_size)
    config = fit_vocab_to_tokenizer(config, data, proc)
    check_batch_keys(task, data.train_batch(0))
    max_steps = resolve_max_steps(config, data)

    params = task.init_params(config, config.train.seed).to(proc.device)
    if task.generates_text and (
        warning := cpu_memory_warning(config, count_params(params), proc.device)
    ):
        log(proc, warning)
    optimizer = build_optimizer(config.optim, params)
    state = init_train_state(
        params, optimizer, seed=config.train.seed, precision=config.train.precision
    )
    state, train_state, resume_from = resumed_state(
        config, state, proc, getattr(data, "tokenizer", None)
    )
    if resume_from is None and config.checkpoint.init_from is not None:
        start_from_weights(config, state, proc, getattr(data, "tokenizer", None))
    if resume_from is not None and (
        done := nothing_to_train(config, resume_from, state, train_state, max_steps)
    ):
        message, stopped_by = done
        log(proc, message)
        run_dir = owning_run(resume_from) or resume_from
        return TrainResult(run_dir, int(state["step"]), None, stopped_by)
    run_dir = run_folder(config, resume_from)
    barrier()  # every rank has looked at the folder before rank 0 writes into it
    if config.train.run_name not in (None, run_dir.name):
        log(proc, f"note: train.run_name={config.train.run_name!r} unused: continuing {run_dir}")
    config = naming_the_run_folder(config, run_dir)
    tokenizer = getattr(data, "tokenizer", None)
    continues_in_place = resume_from is not None and owning_run(resume_from) == run_dir
    resumed_at = int(state["step"]) if continues_in_place else None
    on_rank_zero_first(
        lambda: write_run_files(config, tokenizer, run_dir, resumed_at),
        proc,
        "writing the run's config",
    )

    training = Training(
        config=config,
        proc=proc,
        task=task,
        data=data,
        step_fn=build_train_step(config, task, optimizer, max_steps, proc),
        eval_fn=make_eval_step(
            task, config, device_type=proc.device.type, compile=config.train.compile
        ),
        state=state,
        run=run_info(config, task, proc, run_dir, max_steps, start_step=int(state["step"])),
        callbacks=default_callbacks(config, is_main=proc.is_main),
        tokenizer_dir=run_dir / "tokenizer" if tokenizer is not None else None,
        tokens_seen=torch.tensor(
            int(train_state.get("tokens_seen", 0)), dtype=torch.int64, device=proc.device
        ),
        best_val=train_state.get("best_val_loss"),
    )
    training.run.tokens_seen = training.tokens_seen  # the same tensor, updated in place
    if task.generates_text:
        training.run.sample_fn = make_sample_fn(config, data, lambda: training.state["params"])
    for callback in extra_callbacks:
        training.callbacks.append(callback)
    training.callbacks.load_state_dict(train_state.get("callbacks", {}))
    return training.run_to_end()


def build_train_step(config: Config, task, optimizer, max_steps: int, proc: ProcessInfo):
    """The driver's train step: compiled per `train.compile`, all-reduced over ranks, donating."""
    device = proc.device
    return make_train_step(
        task,
        config,
        optimizer,
        lr_schedule_from_config(config.optim, max_steps),
        device_type=device.type,
        all_reduce=GradientAllReduce(proc.world_size) if proc.world_size > 1 else None,
        rank=proc.rank,
        compile=config.train.compile,
        # In place: 3x the params' memory less at the update (the peak on GPU when activations
        # are checkpointed). On CPU only with glibc keeping freed memory: otherwise it then
        # returns and re-faults the activations each step, slower (docs/performance.md).
        donate=device.type == "cuda" or (device.type == "cpu" and keep_freed_memory()),
    )


def run_info(
    config: Config, task, proc: ProcessInfo, run_dir: Path, max_steps: int, *, start_step: int
) -> RunInfo:
    """What the callbacks read about this run (`sample_fn` is set once the loop's state exists)."""
    counts_tokens = task.name != "regression"
    global_rows = config.train.grad_accum_steps * proc.world_size * config.data.batch_size
    return RunInfo(
        config=config,
        run_dir=run_dir,
        is_main=proc.is_main,
        max_steps=max_steps,
        start_step=start_step,
        tokens_per_step=global_rows * config.model.max_seq_len if counts_tokens else 0,
        flops_per_token=flops_per_token(config.model, config.model.max_seq_len)
        if counts_tokens
        else 0,
        peak_flops=peak_flops(proc.device),
        world_size=proc.world_size,
        device=proc.device,
        sample_fn=None,
    )


@dataclass
class Training:
    """One run's loop and what it carries from step to step: the state tree, the tokens seen,
    the best validation loss and the steps already saved. Rank 0 writes; every rank computes."""

    config: Config
    proc: ProcessInfo
    task: Task
    data: DataModule
    step_fn: Callable
    eval_fn: Callable
    state: TensorDict
    run: RunInfo
    callbacks: CallbackList
    tokenizer_dir: Path | None
    tokens_seen: torch.Tensor  # 0-d int64 on the device (exact): no host sync per step
    best_val: float | None
    step: int = 0
    saved: dict[int, Path | None] = field(default_factory=dict)
    said_no_val: bool = False
    signal_check: SignalCheck = field(default_factory=SignalCheck)

    @property
    def checkpoint_root(self) -> Path:
        return self.run.run_dir / "checkpoints"

    def batch(self, step: int) -> dict:
        """Step `step`'s micro-batches, stacked [A, B, ...] on the device."""
        accum = self.config.train.grad_accum_steps
        return stacked_train_batch(self.data, step - 1, accum, self.proc.device)

    def run_to_end(self) -> TrainResult:
        """The loop with its callbacks, under the stop-signal handlers."""
        self.step = self.run.start_step
        self.signal_check = SignalCheck(last_step=self.step)  # its clock starts with the loop
        # The handlers go in before the callbacks start, so a signal that comes once they have
        # made the run's files (metrics.jsonl...) is a clean stop, never a kill; and they stay
        # until the callbacks have ended.
        with StopSignal() as stop:
            try:
                self.callbacks.on_train_start(self.run)
                stopped_by, val = self.loop(stop)
            except BaseException as error:
                self.callbacks.on_exception(self.run, self.step, error)
                raise
            stopped_by = self.end_callbacks(stop, stopped_by)
        return TrainResult(self.run.run_dir, self.step, val.get("val_loss"), stopped_by)

    def end_callbacks(self, stop: StopSignal, stopped_by: str) -> str:
        """on_train_end for every callback. Training is over and saved, so a stop signal now
        cuts the callback it comes in short (the final sample) and the rest still end; the run
        then counts as stopped by that signal. -> stopped_by."""
        stop.interrupt_at_once = True
        try:
            self.callbacks.on_train_end(self.run, self.step)
        except KeyboardInterrupt:
            if stop.received is None:
                raise
            log(
                self.proc,
                f"received {stop.received} after training ended at step {self.step} (saved as "
                "checkpoint.save_at_end says): the end-of-run callbacks were cut short",
            )
            return stop.received
        return stopped_by

    def loop(self, stop: StopSignal) -> tuple[str, dict[str, float]]:
        """Steps to max_steps or a stop; then the final eval and save. -> (stopped_by, val)."""
        train, every, max_steps = (
            self.config.train,
            self.config.checkpoint.every,
            self.run.max_steps,
        )
        stopped_by, val, evaluated_at = "max_steps", {}, None
        for step in range(self.run.start_step + 1, max_steps + 1):
            self.step = step
            self.state, metrics = self.step_fn(self.state, self.batch(step))
            self.tokens_seen += metrics["tokens"].to(torch.int64)
            self.callbacks.on_step_end(self.run, step, metrics)
            if step == max_steps:
                self.callbacks.on_last_step_end(self.run, step, metrics)
            if step % self.config.logging.log_every == 0 or step == max_steps:
                self.check_nonfinite(step)
            if step % train.eval_every == 0 and step < max_steps:
                val, evaluated_at = self.evaluate(step), step
            if every and step % every == 0 and step < max_steps:
                self.save(step)
            if self.stopped_by_signal(step, stop):
                stopped_by = self.run.stop_signal
            elif self.run.stop_requested:  # EarlyStopping runs on every rank and agrees
                stopped_by = "early_stopping"
            else:
                continue
            if step < max_steps:  # (max_steps reached the skipped callbacks above)
                self.callbacks.on_last_step_end(self.run, step, metrics)
            break
        if not self.run.stop_signal:
            if evaluated_at != self.step:  # (early stopping stops right after an eval)
                val = self.evaluate(self.step) or val
            if self.config.checkpoint.save_at_end:
                self.save(self.step)
        return stopped_by, val

    def stopped_by_signal(self, step: int, stop: StopSignal) -> bool:
        """After SIGINT/SIGTERM on any rank: save, say how to continue, and end the loop. A
        single process checks every step; several agree every few seconds (`SignalCheck`)."""
        if self.proc.world_size == 1:
            if stop.received is None:
                return False
        elif step < self.signal_check.next_step or not self.signal_check.agree(
            step, stop.received is not None, self.proc.device
        ):
            return False
        self.save(step)
        log(
            self.proc,
            f"received {stop.received or 'a stop signal'}: saved a checkpoint at step {step} "
            f"in {self.checkpoint_root}; continue with train.resume=auto",
        )
        self.run.stop_signal = stop.received or "SIGTERM"
        return True

    def save(self, step: int, *, name: str | None = None) -> Path | None:
        """Checkpoint the state at `step` (once per step; rank 0 writes, every rank waits). A
        regular checkpoint (no `name`) of a state frozen by non-finite steps halts instead: a
        resume from it could never train."""
        if name is None and step in self.saved:
            return self.saved[step]
        if name is None:
            self.halt_if_frozen(step)
        written: list[Path | None] = [None]

        def write() -> None:
            written[0] = self.write_checkpoint(step, name)
            self.callbacks.on_checkpoint(self.run, step, written[0])

        # A failure on rank 0 (a full disk) makes the other ranks raise RankZeroFailed naming
        # the step, rather than fail in the transport when rank 0 exits.
        on_rank_zero_first(write, self.proc, f"saving checkpoint step {step}")
        if name is None:
            self.saved[step] = written[0]
        return written[0]

    def write_checkpoint(self, step: int, name: str | None) -> Path:
        """Rank 0's save; an OSError (ENOSPC...) becomes a CheckpointError naming the folder."""
        info = {
            "step": step,
            "tokens_seen": int(self.tokens_seen),
            "callbacks": self.callbacks.state_dict(),
            "best_val_loss": self.best_val,
            **batch_layout(self.config, self.proc.world_size),
        }
        try:
            return ckpt.save_checkpoint(
                self.checkpoint_root,
                step,
                self.state,
                config_yaml=to_yaml(self.config),
                train_state=info,
                tokenizer_dir=self.tokenizer_dir,
                keep_last_n=self.config.checkpoint.keep_last_n,
                name=name,
            )
        except OSError as err:
            folder = self.checkpoint_root / (name or ckpt.step_dir_name(step))
            raise ckpt.CheckpointError(f"saving checkpoint {folder}: {err}") from err

    def evaluate(self, step: int) -> dict[str, float]:
        """Validation metrics (none without val data); a new best is saved and marked."""
        metrics = evaluate(
            self.eval_fn,
            self.state["params"],
            self.data,
            self.proc,
            perplexity=self.task.perplexity,
        )
        if not metrics:
            if not self.said_no_val:
                self.said_no_val = True
                log(self.proc, no_validation_note(self.config))
            return metrics
        self.callbacks.on_eval(self.run, step, metrics)
        is_best = self.best_val is None or metrics["val_loss"] < self.best_val
        if self.config.checkpoint.save_best and is_best:
            self.best_val = metrics["val_loss"]
            path = self.save(step)
            keep_last_n = self.config.checkpoint.keep_last_n
            if self.proc.is_main:
                ckpt.mark_best(self.checkpoint_root, path)
                if keep_last_n is not None:  # the former best, kept by the save, may go now
                    ckpt.prune_checkpoints(self.checkpoint_root, keep_last_n)
        return metrics

    @property
    def nonfinite_limit(self) -> int:
        train = self.config.train
        return 1 if train.nonfinite == "halt" else train.max_nonfinite

    def check_nonfinite(self, step: int) -> None:
        """Stop on non-finite steps: at once (halt) or after max_nonfinite in a row (skip)."""
        streak = int(self.state["nonfinite_streak"])
        if 0 < streak < self.nonfinite_limit:
            log(self.proc, f"step {step}: {streak} non-finite step(s) in a row, updates skipped")
        self.halt_if_frozen(step)

    def halt_if_frozen(self, step: int) -> None:
        """When the non-finite streak has reached its limit (the state froze): write the
        diagnostic checkpoint and raise TrainingHalted."""
        streak, limit = int(self.state["nonfinite_streak"]), self.nonfinite_limit
        if streak < limit:
            return
        train = self.config.train
        first = step - streak + 1
        where = nonfinite_report(self.task, self.config, self.state, self.batch(first))
        name = f"nonfinite_step_{first:06d}"
        self.save(step, name=name)  # rank 0 writes it
        raise TrainingHalted(
            f"non-finite loss or gradients from step {first} (train.nonfinite={train.nonfinite}, "
            f"limit {limit} in a row): {where}. Diagnostic checkpoint (last good values): "
            f"{self.checkpoint_root / name}"
        )


def out_of_memory_message(config: Config, err: BaseException) -> str:
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    model, data = config.model, config.data
    return (
        f"error: out of memory ({first_line[:200]}) with model.hidden_size={model.hidden_size}, "
        f"model.num_layers={model.num_layers}, model.vocab_size={model.vocab_size}, "
        f"model.max_seq_len={model.max_seq_len}, data.batch_size={data.batch_size}: make the "
        "step smaller (docs/troubleshooting.md#out-of-memory)\n"
        "(set LLMFN_DEBUG=1 for the full traceback)"
    )


def main_entry(config: Config) -> int:
    """Run `train` and turn expected failures into one clear line and an exit code."""
    try:
        result = train(config)
    except TrainingHalted as err:  # every rank halts at the same step, alike
        if prints_for_every_rank():
            print(f"error: {err}", file=sys.stderr)
        return 3
    # RankZeroFailed: rank 0 prints its own error; CheckpointNotShared: every rank alike
    except (RankZeroFailed, CheckpointNotShared) as err:
        if prints_for_every_rank():
            print(f"error: {err}", file=sys.stderr)
        return 2
    except (ckpt.CheckpointError, ValueError, OSError) as err:
        if os.environ.get("LLMFN_DEBUG"):
            raise
        print(f"error: {err}\n(set LLMFN_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        if os.environ.get("LLMFN_DEBUG") or not is_out_of_memory(err):
            raise
        print(out_of_memory_message(config, err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop (data, compile)
        if os.environ.get("LLMFN_DEBUG"):
            raise
        print("interrupted (no checkpoint saved since the last one)", file=sys.stderr)
        return 130
    if result.stopped_by in ("SIGINT", "SIGTERM"):  # saved, but not done: say so to scripts
        return 128 + signal.Signals[result.stopped_by].value
    return 0


__all__ = ["TrainResult", "TrainingHalted", "main_entry", "train"]
