"""The training driver: composes config, data module, task, the compiled step, callbacks and
checkpoints into one loop that runs on one process or many (torchrun).

    result = train(load_config("configs/tiny.yaml", ["train.max_steps=100"]))
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tensordict import TensorDict

from llmfn import checkpoint as ckpt
from llmfn.allocator import keep_freed_memory
from llmfn.callbacks import RunInfo, default_callbacks
from llmfn.config import Config, to_yaml
from llmfn.data import build_data_module
from llmfn.distributed import (
    GradientAllReduce,
    ProcessInfo,
    any_rank,
    barrier,
    init_process,
    shutdown,
)
from llmfn.model import flops_per_token
from llmfn.optim import build_optimizer
from llmfn.schedule import lr_schedule_from_config
from llmfn.step import init_train_state, make_eval_step, make_train_step
from llmfn.tasks import get_task

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


class TrainingHalted(RuntimeError):
    """Training stopped on purpose (non-finite values); the message says why and where."""


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


def log(proc: ProcessInfo, message: str) -> None:
    if proc.is_main:
        print(message, flush=True)


# --- setup ------------------------------------------------------------------------------------
def slow_precision_warning(precision: str, device: torch.device) -> str | None:
    """A warning when autocast to a 16-bit float will run without hardware support: on a CPU
    without AVX512/AMX, oneDNN has no bf16/fp16 matmul and a reference kernel runs instead
    (~160x slower than float32 for a 2048x512x2048 matmul on an AVX2 CPU)."""
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


def shared_run_name(config: Config) -> str:
    """The run folder's name, the same on every rank."""
    name = [config.train.run_name or time.strftime("%Y%m%d-%H%M%S")]
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    return name[0]


def find_run_to_resume(config: Config) -> Path | None:
    """resume=auto: the named run, else the newest run folder under run_dir with a checkpoint."""
    root = Path(config.train.run_dir)
    candidates = (
        [root / config.train.run_name]
        if config.train.run_name
        else sorted(
            (p for p in root.glob("*") if (p / "checkpoints").is_dir()),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
    )
    for run in candidates:
        found = ckpt.find_resume_checkpoint(run / "checkpoints")
        if found is not None:
            return found
    return None


def run_folder(config: Config, resume_from: Path | None) -> Path:
    """Where this run writes. A resumed run continues in its folder when the checkpoint sits in
    one (<run>/checkpoints/step_N); otherwise a new folder under train.run_dir, which must not
    hold another run's checkpoints (they would be overwritten)."""
    if resume_from is not None and resume_from.parent.name == "checkpoints":
        return resume_from.parent.parent
    run_dir = Path(config.train.run_dir) / shared_run_name(config)
    existing = ckpt.list_checkpoints(run_dir / "checkpoints")
    if existing:
        why = (
            "none of them passed verification (see the warnings above): inspect or move them"
            if config.train.resume == "auto"
            else f"continue that run with train.resume=auto or train.resume={run_dir}"
        )
        raise ValueError(
            f"run folder {run_dir} already holds checkpoints ({existing[-1].name}, ...): {why}, "
            "or choose another train.run_name"
        )
    return run_dir


def check_output_folders(config: Config) -> None:
    """train.run_dir and data.cache_dir are folders (or not there yet), before any work."""
    for key, path in (
        ("train.run_dir", config.train.run_dir),
        ("data.cache_dir", config.data.cache_dir),
    ):
        if Path(path).exists() and not Path(path).is_dir():
            raise ValueError(f"{key}={path!r} is a file: expected a folder (created if missing)")


def check_batch_keys(task, batch: dict) -> None:
    missing = [key for key in task.batch_keys if key not in batch]
    if missing:
        raise ValueError(
            f"train.task={task.name!r} needs batches with {list(task.batch_keys)}, but the data module gives "
            f"{sorted(batch)}: choose a data.module that fits the task"
        )


def batch_to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def stacked_train_batch(data, step: int, accum: int, device: torch.device) -> dict:
    """The micro-batches of `step`, stacked as [A, B, ...]."""
    micro = [data.train_batch(step * accum + i) for i in range(accum)]
    return batch_to({k: torch.stack([m[k] for m in micro]) for k in micro[0]}, device)


def evaluate(
    eval_step, params: TensorDict, data, device: torch.device, *, perplexity: bool
) -> dict[str, float]:
    """Token-weighted validation loss over the data module's val batches, and its perplexity
    where the loss is a token negative log-likelihood (`Task.perplexity`)."""
    total, count = 0.0, 0.0
    for batch in data.val_batches():
        out = eval_step(params, batch_to(batch, device))
        tokens = float(out["tokens"])
        total += float(out["loss"]) * tokens
        count += tokens
    if count == 0:
        return {}
    val_loss = total / count
    if not perplexity:
        return {"val_loss": val_loss}
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def make_sample_fn(config: Config, data, current_params):
    """(prompt, max_new_tokens) -> text from the latest params (`current_params()`), or None."""
    tokenizer = getattr(data, "tokenizer", None)
    if tokenizer is None:
        return None
    from llmfn.generate import generate

    def sample(prompt: str, max_new_tokens: int) -> str:
        ids = (
            tokenizer.encode(prompt)
            if prompt
            else [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
        )
        ids = (
            ids[-(config.model.max_seq_len - max_new_tokens) :]
            if max_new_tokens < config.model.max_seq_len
            else ids[-1:]
        )
        new = generate(
            current_params(),
            config.model,
            [ids],
            max_new_tokens=min(max_new_tokens, config.model.max_seq_len - len(ids)),
            temperature=0.8,
            top_k=40,
            seed=config.train.seed,
            vocab_limit=tokenizer.vocab_size,  # never a padded vocabulary's extra rows
        )
        return prompt + tokenizer.decode(new[0])

    return sample


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop saves and exits at the next step boundary. A second
    SIGINT (Ctrl-C twice) interrupts at once."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def nonfinite_report(task, config: Config, state: TensorDict, batch: dict) -> str:
    """Names of parameters or gradients that are not finite, recomputed eagerly on `batch`."""
    params = state["params"]
    bad = [
        ".".join(k)
        for k, v in params.items(include_nested=True, leaves_only=True)
        if not torch.isfinite(v).all()
    ]
    first = {k: v[0] for k, v in batch.items()}
    grads = torch.func.grad(lambda p: task.loss(p, first, config, training=False)[0])(params)
    bad += [
        "grad:" + ".".join(k)
        for k, v in grads.items(include_nested=True, leaves_only=True)
        if not torch.isfinite(v).all()
    ]
    return (
        ", ".join(bad[:20]) + (" ..." if len(bad) > 20 else "")
        if bad
        else "loss only (all parameters and gradients finite)"
    )


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
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = proc.device
    task = get_task(config.train.task)  # an unknown name fails before the data is prepared
    check_output_folders(config)
    warning = slow_precision_warning(config.train.precision, device)
    if warning:
        log(proc, warning)

    data = build_data_module(config.data, seq_len=config.model.max_seq_len, seed=config.train.seed)
    if proc.is_main:
        data.prepare()
    barrier()
    data.setup(rank=proc.rank, world_size=proc.world_size)
    config = fit_vocab_to_tokenizer(config, data, proc)
    check_batch_keys(task, data.train_batch(0))
    max_steps = resolve_max_steps(config, data)
    accum = config.train.grad_accum_steps

    params = task.init_params(config, config.train.seed).to(device)
    optimizer = build_optimizer(config.optim, params)
    state = init_train_state(
        params, optimizer, seed=config.train.seed, precision=config.train.precision
    )
    train_state: dict = {}

    resume_from = None
    if config.train.resume == "auto":
        resume_from = find_run_to_resume(config)
        if resume_from is None:
            log(proc, "train.resume=auto: no checkpoint found, starting fresh")
    elif config.train.resume:
        resume_from = ckpt.resolve_checkpoint(config.train.resume)
    if resume_from is not None:
        state, train_state = ckpt.load_checkpoint(
            resume_from, state, expected_model=config.model.to_dict()
        )
        log(proc, f"resumed from {resume_from} at step {int(state['step'])}")
    run_dir = run_folder(config, resume_from)
    checkpoint_root = run_dir / "checkpoints"
    if proc.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(config))
        print("resolved config:\n" + to_yaml(config), flush=True)
        tokenizer = getattr(data, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save(run_dir / "tokenizer")
    tokenizer_dir = run_dir / "tokenizer" if getattr(data, "tokenizer", None) is not None else None

    all_reduce = GradientAllReduce(proc.world_size) if proc.world_size > 1 else None
    lr_fn = lr_schedule_from_config(config.optim, max_steps)
    step_fn = make_train_step(
        task,
        config,
        optimizer,
        lr_fn,
        device_type=device.type,
        all_reduce=all_reduce,
        compile=config.train.compile,
        # In place: 3x the params' memory less at the update (the peak on GPU when activations
        # are checkpointed). On CPU only with glibc keeping freed memory: otherwise it then
        # returns and re-faults the activations each step, slower (docs/performance.md).
        donate=device.type == "cuda" or (device.type == "cpu" and keep_freed_memory()),
    )
    eval_fn = make_eval_step(task, config, device_type=device.type, compile=config.train.compile)

    start_step = int(state["step"])
    tokens_per_step = accum * proc.world_size * config.data.batch_size * config.model.max_seq_len
    run = RunInfo(
        config=config,
        run_dir=run_dir,
        is_main=proc.is_main,
        max_steps=max_steps,
        start_step=start_step,
        tokens_per_step=0 if task.name == "regression" else tokens_per_step,
        flops_per_token=0
        if task.name == "regression"
        else flops_per_token(config.model, config.model.max_seq_len),
        peak_flops=peak_flops(device),
        world_size=proc.world_size,
        sample_fn=make_sample_fn(config, data, lambda: state["params"])
        if task.generates_text
        else None,
    )
    callbacks = default_callbacks(config, is_main=proc.is_main)
    for callback in extra_callbacks:
        callbacks.append(callback)
    callbacks.load_state_dict(train_state.get("callbacks", {}))
    tokens_seen = torch.tensor(float(train_state.get("tokens_seen", 0)), device=device)
    best_val = train_state.get("best_val_loss")

    saved: dict[int, Path | None] = {}

    def save(step: int, *, name: str | None = None) -> Path | None:
        """Checkpoint the state at `step` (once per step; rank 0 writes, every rank waits)."""
        if name is None and step in saved:
            return saved[step]
        path = None
        if proc.is_main:
            info = {
                "step": step,
                "tokens_seen": float(tokens_seen),
                "callbacks": callbacks.state_dict(),
                "best_val_loss": best_val,
                "data_position": step * accum,
                "world_size": proc.world_size,
            }
            path = ckpt.save_checkpoint(
                checkpoint_root,
                step,
                state,
                config_yaml=to_yaml(config),
                train_state=info,
                tokenizer_dir=tokenizer_dir,
                keep_last_n=config.checkpoint.keep_last_n,
                name=name,
            )
            callbacks.on_checkpoint(run, step, path)
        barrier()
        if name is None:
            saved[step] = path
        return path

    def run_eval(step: int) -> dict[str, float]:
        nonlocal best_val
        metrics = evaluate(eval_fn, state["params"], data, device, perplexity=task.perplexity)
        if metrics:
            callbacks.on_eval(run, step, metrics)
            if config.checkpoint.save_best and (best_val is None or metrics["val_loss"] < best_val):
                best_val = metrics["val_loss"]
                path = save(step)
                if proc.is_main:
                    ckpt.mark_best(checkpoint_root, path)
        return metrics

    def check_nonfinite(step: int, batch_for) -> None:
        """Stop on non-finite steps: at once (halt) or after max_nonfinite in a row (skip)."""
        streak = int(state["nonfinite_streak"])
        limit = 1 if config.train.nonfinite == "halt" else config.train.max_nonfinite
        if streak == 0:
            return
        if streak < limit:
            log(proc, f"step {step}: {streak} non-finite step(s) in a row, updates skipped")
            return
        first = step - streak + 1
        where = nonfinite_report(task, config, state, batch_for(first))
        path = save(step, name=f"nonfinite_step_{first:06d}")
        raise TrainingHalted(
            f"non-finite loss or gradients from step {first} (train.nonfinite={config.train.nonfinite}, "
            f"limit {limit} in a row): {where}. Diagnostic checkpoint (last good values): {path}"
        )

    stopped_by, step, val = "max_steps", start_step, {}
    callbacks.on_train_start(run)
    with StopSignal() as stop:
        try:
            for step in range(start_step + 1, max_steps + 1):
                batch = stacked_train_batch(data, step - 1, accum, device)
                state, metrics = step_fn(state, batch)
                tokens_seen += metrics["tokens"]
                callbacks.on_step_end(run, step, metrics)
                if step % config.logging.log_every == 0 or step == max_steps:
                    check_nonfinite(
                        step, batch_for=lambda s: stacked_train_batch(data, s - 1, accum, device)
                    )
                if step % config.train.eval_every == 0 and step < max_steps:
                    val = run_eval(step)
                if (
                    config.checkpoint.every
                    and step % config.checkpoint.every == 0
                    and step < max_steps
                ):
                    save(step)
                checkpoint_now = step % config.logging.log_every == 0 or proc.world_size == 1
                if checkpoint_now and any_rank(stop.received is not None, device):
                    save(step)
                    log(
                        proc,
                        f"received {stop.received or 'a stop signal'}: saved a checkpoint at step {step} "
                        f"in {checkpoint_root}; continue with train.resume=auto",
                    )
                    stopped_by = run.stop_signal = stop.received or "SIGTERM"
                    break
                if (
                    run.stop_requested
                ):  # EarlyStopping runs on every rank and agrees (same val data)
                    stopped_by = "early_stopping"
                    break
            if not run.stop_signal:
                val = run_eval(step) or val
                if config.checkpoint.save_at_end:
                    save(step)
        except BaseException as error:
            callbacks.on_exception(run, step, error)
            raise
    callbacks.on_train_end(run, step)
    return TrainResult(run_dir, step, val.get("val_loss"), stopped_by)


def main_entry(config: Config) -> int:
    """Run `train` and turn expected failures into one clear line and an exit code."""
    try:
        result = train(config)
    except TrainingHalted as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ckpt.CheckpointError, ValueError, OSError) as err:
        if os.environ.get("LLMFN_DEBUG"):
            raise
        print(f"error: {err}\n(set LLMFN_DEBUG=1 for the full traceback)", file=sys.stderr)
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
