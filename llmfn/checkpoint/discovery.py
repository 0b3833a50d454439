"""Which step folder to load: the newest valid one under a root, or one from what a user typed."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from llmfn.checkpoint.layout import (
    BEST_POINTER,
    LATEST_POINTER,
    MANIFEST_FILE,
    CheckpointError,
    list_checkpoints,
    read_pointer,
    step_of,
)
from llmfn.checkpoint.verification import verify_checkpoint


def find_resume_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest step folder under `root` that passes `verify_checkpoint`, or None.

    Newer folders that fail verification (no manifest, missing or corrupted files) are skipped
    with a warning naming the folder and the failed check; hidden temporary folders of
    interrupted saves are never candidates."""
    for folder in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(folder)
        except CheckpointError as err:
            warnings.warn(f"skipping checkpoint {folder}: {err}", stacklevel=2)
            continue
        return folder
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step folder from what a user may type: a step folder, a `latest`/`best` pointer file,
    a checkpoint root (its newest valid step), or a run folder holding `checkpoints/`."""
    path = Path(path)
    if path.is_file() and path.name in (LATEST_POINTER, BEST_POINTER):
        target = read_pointer(path.parent, path.name)
        if target is None:
            raise CheckpointError(f"pointer file {path} does not name an existing step folder")
        return target
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise CheckpointError(
            f"checkpoint path {path} {what}: expected a step folder (step_000100/), "
            "a checkpoint root, or a run folder with checkpoints/"
        )
    if (path / MANIFEST_FILE).is_file() or step_of(path) is not None:
        return path
    for root in (path, path / "checkpoints"):
        if list_checkpoints(root):
            found = find_resume_checkpoint(root)
            if found is None:
                raise CheckpointError(
                    f"no valid checkpoint under {root}: every step folder failed verification"
                )
            return found
    runs = sorted((p for p in path.iterdir() if (p / "checkpoints").is_dir()), key=os.path.getmtime)
    hint = f" (it holds run folders: the newest is {runs[-1]})" if runs else ""
    raise CheckpointError(
        f"{path} holds no checkpoint: expected manifest.json, step_<N>/ folders, or "
        f"checkpoints/step_<N>/{hint}"
    )
