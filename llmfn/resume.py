"""Where a run's state starts: a checkpoint to resume (`train.resume`) or saved weights
(`checkpoint.init_from`). Which checkpoint, whether every rank reads it, whether its tokenizer
and global batch match this run's, and whether anything is left to train.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch.distributed as dist
from tensordict import TensorDict

from llmfn import checkpoint as ckpt
from llmfn.callbacks.early_stopping import stopped_early
from llmfn.checkpoint.initial_params import load_initial_params
from llmfn.config import Config
from llmfn.distributed import ProcessInfo, log, max_over_ranks, on_rank_zero_first
from llmfn.run_folders import resume_checkpoint
from llmfn.step import KEYS_ADDED_SINCE, with_fresh_loss_scale


class CheckpointNotShared(ValueError):
    """A rank cannot read the checkpoint rank 0 resumes; every rank raises it alike."""


def batch_layout(config: Config, world_size: int) -> dict[str, int]:
    """What makes up the global batch: rows per micro-batch, micro-batches, processes."""
    return {
        "batch_size": config.data.batch_size,
        "grad_accum_steps": config.train.grad_accum_steps,
        "world_size": world_size,
    }


def batch_change_warning(train_state: dict, config: Config, world_size: int) -> str | None:
    """A warning when a checkpoint is resumed with another global batch (rows per step): step s
    then reads other rows of the data order than the original run would have (data skipped or
    seen again) and each step holds another number of tokens. The same global batch split
    otherwise (8 rows x 1 process against 4 x 2) reads the same rows (up to where epochs end).
    train_state: the checkpoint's (older ones hold only world_size: the rest counts as unchanged).
    """
    now = batch_layout(config, world_size)
    saved = {key: train_state.get(key, value) for key, value in now.items()}
    if math.prod(saved.values()) == math.prod(now.values()):
        return None
    spell = lambda layout: " x ".join(str(v) for v in layout.values())  # noqa: E731
    return (
        f"warning: the checkpoint trained with a global batch of {math.prod(saved.values())} rows "
        f"(data.batch_size x train.grad_accum_steps x processes = {spell(saved)}) and this run "
        f"has {math.prod(now.values())} ({spell(now)}): from here on each step reads other rows "
        "of the data order than the original run would have (rows skipped or seen again)"
    )


def resumed_state(
    config: Config, state: TensorDict, proc: ProcessInfo, tokenizer=None
) -> tuple[TensorDict, dict, Path | None]:
    """(state, the checkpoint's train_state.json, its folder) for `train.resume`; the fresh
    state, {} and None when there is nothing to resume. tokenizer: the data module's, which
    must be the one the checkpoint trained with (ValueError otherwise)."""
    resume_from = shared_resume_checkpoint(config, proc)
    if resume_from is None:
        if config.train.resume == "auto":
            log(proc, "train.resume=auto: no checkpoint found, starting fresh")
        return state, {}, None
    check_same_tokenizer(config, resume_from, tokenizer)
    state, train_state = ckpt.load_checkpoint(
        resume_from, state, expected_model=config.model.to_dict(), missing_from=KEYS_ADDED_SINCE
    )
    log(proc, f"resumed from {resume_from} at step {int(state['step'])}")
    if warning := batch_change_warning(train_state, config, proc.world_size):
        log(proc, warning)
    saved_precision = ckpt.read_run_config(resume_from).get("train", {}).get("precision")
    if saved_precision not in (None, config.train.precision):
        state = with_fresh_loss_scale(state, config.train.precision)
        log(
            proc,
            f"note: the checkpoint trained with train.precision={saved_precision}, this run uses "
            f"{config.train.precision}: the loss scale starts afresh at "
            f"{float(state['loss_scale']):g}",
        )
    return state, train_state, resume_from


def shared_resume_checkpoint(config: Config, proc: ProcessInfo) -> Path | None:
    """The checkpoint `train.resume` names, as rank 0 finds it, once every rank has checked it
    can read it. Ranks that each looked on their own could differ (a node-local runs/: rank 0
    resumes, rank 1 starts fresh) and then wait in different collectives until
    distributed.timeout_s."""
    if proc.world_size == 1:
        return resume_checkpoint(config)
    found: list[Path | None] = [None]

    def find() -> None:
        found[0] = resume_checkpoint(config)

    on_rank_zero_first(find, proc, "finding the checkpoint to resume (train.resume)")
    dist.broadcast_object_list(found, src=0)
    if found[0] is not None:
        check_every_rank_reads(found[0], proc)
    return found[0]


def can_read_checkpoint(checkpoint: Path) -> bool:
    """Whether this process sees `checkpoint` whole: its manifest and the files it lists."""
    try:
        ckpt.verify_checkpoint(checkpoint, check_hashes=False)
    except (ckpt.CheckpointError, OSError):
        return False
    return True


def check_every_rank_reads(checkpoint: Path, proc: ProcessInfo) -> None:
    """CheckpointNotShared on every rank when any rank cannot read `checkpoint`."""
    unreadable = -1.0 if can_read_checkpoint(checkpoint) else float(proc.rank)
    rank = int(max_over_ranks([unreadable], proc.device)[0])
    if rank >= 0:
        raise CheckpointNotShared(
            f"rank {rank} cannot read {checkpoint}: checkpoints must be on a filesystem every "
            "rank sees (train.run_dir, train.resume)"
        )


def saved_tokenizer_json(tokenizer) -> dict:
    """The tokenizer.json that `tokenizer.save` writes, parsed."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save(folder)
        return json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))


def other_tokenizer(checkpoint: Path, tokenizer) -> Path | None:
    """The checkpoint's tokenizer folder when its tokenizer.json differs from the data module's
    `tokenizer` (token ids that mean other tokens, which model.vocab_size cannot catch); None
    when they agree or there is nothing to compare (no tokenizer on either side)."""
    saved = checkpoint / ckpt.TOKENIZER_DIR / "tokenizer.json"
    if tokenizer is None or not saved.is_file():
        return None
    if json.loads(saved.read_text(encoding="utf-8")) == saved_tokenizer_json(tokenizer):
        return None
    return saved.parent


def check_same_tokenizer(config: Config, checkpoint: Path, tokenizer) -> None:
    """ValueError when a resumed checkpoint's tokenizer differs from the data module's (the data
    was prepared again: changed text, another data.tokenizer), or the data has none (other data:
    its ids are no text the checkpoint read, and the run's later checkpoints would lose the
    tokenizer that generation needs)."""
    data = config.data
    if tokenizer is None and (checkpoint / ckpt.TOKENIZER_DIR / "tokenizer.json").is_file():
        fix = (
            f"copy {checkpoint / ckpt.TOKENIZER_DIR / 'tokenizer.json'} into {data.path} if its "
            "bins were made with it"
            if data.module == "token_bin"
            else "train on the data it used"
        )
        raise ValueError(
            f"train.resume: checkpoint {checkpoint} trained on text with the tokenizer in "
            f"{checkpoint / ckpt.TOKENIZER_DIR}, but data.module={data.module!r} has no "
            f"tokenizer: its token ids are not that text's. Start a fresh run (another "
            f"train.run_name, train.resume=null), or {fix}"
        )
    saved = other_tokenizer(checkpoint, tokenizer)
    if saved is None:
        return
    raise ValueError(
        f"train.resume: checkpoint {checkpoint} trained with the tokenizer in {saved}, "
        f"but the data of data.path={data.path!r} (data.module={data.module!r}, "
        f"data.tokenizer={data.tokenizer!r}) now has another one: its token ids would mean other "
        "tokens. Start a fresh run (another train.run_name, train.resume=null), or train on the "
        "data the checkpoint used (the same text and data.tokenizer, or data.module=token_bin "
        "with data.path set to the folder prepared for it under data.cache_dir)"
    )


def start_from_weights(config: Config, state: TensorDict, proc: ProcessInfo, tokenizer) -> None:
    """Fill the fresh state's params, in place, from the weights `checkpoint.init_from` names;
    ValueError when their tokenizer is not the data's."""
    try:
        folder = ckpt.resolve_checkpoint(config.checkpoint.init_from)
    except ckpt.CheckpointError as err:
        raise ckpt.CheckpointError(
            f"checkpoint.init_from={config.checkpoint.init_from}: {err}"
        ) from None
    if (saved := other_tokenizer(folder, tokenizer)) is not None:
        data = config.data
        raise ValueError(
            f"checkpoint.init_from: {folder} trained with the tokenizer in {saved}, but the data "
            f"(data.module={data.module!r}, data.tokenizer={data.tokenizer!r}) has another one: "
            f"its token ids would mean other tokens. Tokenize with it: data.tokenizer={str(saved)!r}"
        )
    load_initial_params(folder, config.model, state["params"])
    log(proc, f"initial params from {folder} (checkpoint.init_from; a fresh optimizer and step)")


def nothing_to_train(
    config: Config, resume_from: Path, state: TensorDict, train_state: dict, max_steps: int
) -> tuple[str, str] | None:
    """(what to say, TrainResult.stopped_by) when the resumed run is already over: at its last
    step, or stopped by early stopping that would stop it again at this patience; else None.
    Nothing is written then (a requeued job exits cleanly)."""
    step, patience = int(state["step"]), config.train.early_stopping_patience
    if step >= max_steps:
        key = "train.max_steps" if config.train.epochs is None else "train.epochs"
        return (
            f"nothing to train: {resume_from} is at step {step} and the run ends at step "
            f"{max_steps} ({key}); raise {key} to train on. No file was written.",
            "max_steps",
        )
    if stopped_early(train_state.get("callbacks", {}), patience):
        return (
            f"nothing to train: the run of {resume_from} stopped early at step {step} "
            f"(train.early_stopping_patience={patience}); to train on, raise the patience or "
            "set it to null",
            "early_stopping",
        )
    return None
