"""Where a run writes: `train.run_dir/<run name>/` with `config.yaml`, `tokenizer/` and
`checkpoints/step_<N>/`, and which checkpoint `train.resume` continues from.

A fresh run never writes into a folder that already holds checkpoints (they would be
overwritten), nor into one another run started at the same moment took; a resumed run
continues in the folder its checkpoint sits in and keeps its config.yaml (the resumed config
goes to config-resume-<step>.yaml).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import warnings
from pathlib import Path

import torch.distributed as dist
import yaml

from llmfn import checkpoint as ckpt
from llmfn.config import Config, to_yaml
from llmfn.distributed import RankZeroFailed

# The data keys that only say how the data is read, not which data trains the run: resuming
# with another batch size is allowed (with a warning), and so is another eval size or cache.
DATA_KEYS_NOT_DEFINING_THE_RUN = ("batch_size", "val_batches", "cache_dir")


def check_output_folders(config: Config) -> None:
    """train.run_dir and data.cache_dir are folders (or not there yet), before any work."""
    for key, path in (
        ("train.run_dir", config.train.run_dir),
        ("data.cache_dir", config.data.cache_dir),
    ):
        if Path(path).exists() and not Path(path).is_dir():
            raise ValueError(f"{key}={path!r} is a file: expected a folder (created if missing)")


def new_timestamp_folder(root: Path) -> str:
    """Create a folder under `root` named by the time (`-1`, `-2`... appended when taken) and
    return its name. mkdir without exist_ok is atomic: two runs started the same second never
    share a folder."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in itertools.count():
        name = f"{stamp}-{suffix}" if suffix else stamp
        try:
            (root / name).mkdir()
        except FileExistsError:
            continue
        return name
    raise AssertionError("unreachable")


def shared_run_name(config: Config) -> str:
    """The run folder's name, the same on every rank: train.run_name, or a new timestamp
    folder that rank 0 creates (the other ranks then raise RankZeroFailed if it failed)."""
    if config.train.run_name:
        return config.train.run_name
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    name: list[str | None] = [None]
    try:
        if is_main:
            name[0] = new_timestamp_folder(Path(config.train.run_dir))
    finally:
        if dist.is_initialized():
            dist.broadcast_object_list(name, src=0)
    if name[0] is None:
        raise RankZeroFailed("rank 0 failed creating the run folder: its error is in its output")
    return name[0]


def run_identity(tree: dict) -> dict[str, object]:
    """What makes two configs (as dicts) the same run: model.*, train.task and data.* but
    DATA_KEYS_NOT_DEFINING_THE_RUN, flattened to dotted keys."""
    data = {
        k: v for k, v in tree.get("data", {}).items() if k not in DATA_KEYS_NOT_DEFINING_THE_RUN
    }
    flat = {"train.task": tree.get("train", {}).get("task", "lm")}
    flat |= {f"model.{k}": v for k, v in tree.get("model", {}).items()}
    flat |= {f"data.{k}": v for k, v in data.items()}
    return flat


def identity_differences(config: Config, checkpoint: Path) -> list[str]:
    """The run-defining keys (`run_identity`) whose values differ between `config` and the
    config saved with `checkpoint`."""
    now = run_identity(yaml.safe_load(to_yaml(config)))
    saved = run_identity(ckpt.read_run_config(checkpoint))
    return sorted(k for k in now.keys() | saved.keys() if now.get(k) != saved.get(k))


def find_run_to_resume(config: Config) -> Path | None:
    """resume=auto: the named run's newest valid checkpoint; with run_name null, that of the
    newest run under run_dir whose saved config matches this one in model, data and
    train.task (`run_identity`): another experiment's run is never continued."""
    root = Path(config.train.run_dir)
    if config.train.run_name:
        return ckpt.find_resume_checkpoint(root / config.train.run_name / "checkpoints")
    runs = sorted(
        (p for p in root.glob("*") if (p / "checkpoints").is_dir()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    skipped = []
    for run in runs:
        found = ckpt.find_resume_checkpoint(run / "checkpoints")
        if found is not None and not (differences := identity_differences(config, found)):
            return found
        if found is not None:
            skipped.append(f"{run.name} ({', '.join(differences[:3])})")
    if skipped:
        warnings.warn(
            f"train.resume=auto with train.run_name null: no run under {root} trained this "
            f"model, data and train.task; not continuing {', '.join(skipped[:3])}"
            f"{', ...' if len(skipped) > 3 else ''}: starting fresh (name the run to continue "
            "with train.run_name)",
            stacklevel=2,
        )
    return None


def resume_checkpoint(config: Config) -> Path | None:
    """The checkpoint `train.resume` names: "auto" (None when there is none yet), a path, or
    None for a fresh run."""
    if config.train.resume == "auto":
        return find_run_to_resume(config)
    if config.train.resume is None:
        return None
    try:
        return ckpt.resolve_checkpoint(config.train.resume)
    except ckpt.CheckpointError as err:
        raise ckpt.CheckpointError(f"train.resume={config.train.resume}: {err}") from None


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


def config_file_name(resumed_at: int | None) -> str:
    """config.yaml for a run's first launch; config-resume-<step>.yaml for each resume in it."""
    return "config.yaml" if resumed_at is None else f"config-resume-{resumed_at}.yaml"


def write_run_files(config: Config, tokenizer, run_dir: Path, resumed_at: int | None) -> None:
    """The resolved config (also printed) and the tokenizer, if the data has one. resumed_at:
    the step a run continued in its own folder resumed at (None for a new folder), whose
    config.yaml is kept. A new folder's config.yaml is created exclusively: one another run
    with the same train.run_name created since the checks is a ValueError, never overwritten."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / config_file_name(resumed_at)
    try:
        with path.open("w" if resumed_at is not None else "x", encoding="utf-8") as file:
            file.write(to_yaml(config))
    except FileExistsError:
        raise ValueError(
            f"run folder {run_dir}: another run started at the same time with "
            f"train.run_name={run_dir.name!r} took it (its {path.name} appeared after this run "
            "checked the folder): choose another train.run_name"
        ) from None
    print("resolved config:\n" + to_yaml(config), flush=True)
    if tokenizer is not None:
        tokenizer.save(run_dir / "tokenizer")
