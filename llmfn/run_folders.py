"""Where a run writes: `train.run_dir/<run name>/` with `config.yaml`, `tokenizer/` and
`checkpoints/step_<N>/`, and which checkpoint `train.resume` continues from.

A fresh run never writes into a folder that already holds checkpoints (they would be
overwritten); a resumed run continues in the folder its checkpoint sits in.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch.distributed as dist

from llmfn import checkpoint as ckpt
from llmfn.config import Config, to_yaml


def check_output_folders(config: Config) -> None:
    """train.run_dir and data.cache_dir are folders (or not there yet), before any work."""
    for key, path in (
        ("train.run_dir", config.train.run_dir),
        ("data.cache_dir", config.data.cache_dir),
    ):
        if Path(path).exists() and not Path(path).is_dir():
            raise ValueError(f"{key}={path!r} is a file: expected a folder (created if missing)")


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


def resume_checkpoint(config: Config) -> Path | None:
    """The checkpoint `train.resume` names: "auto" (None when there is none yet), a path, or
    None for a fresh run."""
    if config.train.resume == "auto":
        return find_run_to_resume(config)
    return ckpt.resolve_checkpoint(config.train.resume) if config.train.resume else None


def owning_run(step_folder: Path) -> Path | None:
    """The run folder a step folder belongs to (<run>/checkpoints/step_N), or None (a copy
    kept elsewhere)."""
    return step_folder.parent.parent if step_folder.parent.name == "checkpoints" else None


def run_folder(config: Config, resume_from: Path | None) -> Path:
    """Where this run writes. A resumed run continues in its folder when the checkpoint sits in
    one (<run>/checkpoints/step_N), unless that would overwrite newer checkpoints; otherwise
    a new folder under train.run_dir, which must not hold another run's files."""
    if resume_from is not None and (run := owning_run(resume_from)) is not None:
        check_no_newer_checkpoints(config, resume_from)
        return run
    run_dir = Path(config.train.run_dir) / shared_run_name(config)
    check_no_run_files(run_dir)
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


def check_no_newer_checkpoints(config: Config, resume_from: Path) -> None:
    """An explicit train.resume of an older step of a run: continuing in that run's folder
    would overwrite its newer checkpoints as the steps come round again. (resume=auto picks the
    newest valid one; newer folders there failed verification.)"""
    step = ckpt.step_of(resume_from)
    newer = [p.name for p in ckpt.list_checkpoints(resume_from.parent) if ckpt.step_of(p) > step]
    if config.train.resume == "auto" or not newer:
        return
    raise ValueError(
        f"train.resume={config.train.resume}: step {step} is older than this run's newer "
        f"checkpoints ({', '.join(newer)}), which continuing the run would overwrite: to "
        f"branch off step {step}, copy {resume_from} out of the run folder and resume from the "
        "copy (a new run folder); or resume the run from its newest checkpoint"
    )


def check_no_run_files(run_dir: Path) -> None:
    """A fresh run starts in a new or empty folder: one with an earlier run's files but no
    checkpoint (a run stopped before its first save) would lose its metrics and config."""
    if not run_dir.is_dir() or ckpt.list_checkpoints(run_dir / "checkpoints"):
        return  # (a folder with checkpoints gets its own message)
    found = sorted(p.name for p in run_dir.iterdir())
    if found:
        raise ValueError(
            f"run folder {run_dir} is not empty ({', '.join(found[:4])}"
            f"{', ...' if len(found) > 4 else ''}) and holds no checkpoint to resume: a fresh "
            "run would overwrite its files; move or remove them, or choose another "
            "train.run_name"
        )


def naming_the_run_folder(config: Config, run_dir: Path) -> Config:
    """config with train.run_dir / train.run_name naming `run_dir`: the config.yaml a run saves
    then continues that run with train.resume=auto (with run_name null it would continue the
    newest run under run_dir, whichever that is)."""
    train = dataclasses.replace(config.train, run_dir=str(run_dir.parent), run_name=run_dir.name)
    return dataclasses.replace(config, train=train)


def write_run_files(config: Config, tokenizer, run_dir: Path) -> None:
    """The resolved `config.yaml` (also printed) and the tokenizer, if the data has one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(config))
    print("resolved config:\n" + to_yaml(config), flush=True)
    if tokenizer is not None:
        tokenizer.save(run_dir / "tokenizer")
