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
