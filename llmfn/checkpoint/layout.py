"""The on-disk layout: file and folder names, step folders, the `latest` / `best` pointers."""

from __future__ import annotations

import os
import re
from pathlib import Path

FORMAT = "llmfn-checkpoint"
FORMAT_VERSION = 1
PARAMS_FILE = "params.safetensors"
STATE_FILE = "state.safetensors"
CONFIG_FILE = "config.yaml"
TRAIN_STATE_FILE = "train_state.json"
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
LATEST_POINTER = "latest"
BEST_POINTER = "best"
REQUIRED_FILES = (PARAMS_FILE, CONFIG_FILE)  # enough for inference; resume also needs the state
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or does not fit the running model.

    The message names the folder, the file or key, and the check that failed."""


def step_dir_name(step: int) -> str:
    """The folder name of a step: 100 -> "step_000100"."""
    return f"step_{step:06d}"


def step_of(path: str | os.PathLike) -> int | None:
    """The step number in a step folder's name, or None if the name is not "step_<digits>"."""
    match = STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The step folders under `root`, oldest step first (unverified; temporary folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(folders, key=step_of)


def read_pointer(root: Path, name: str) -> Path | None:
    """The step folder the pointer file `root/name` names, or None if either does not exist.

    CheckpointError naming the pointer file if it holds anything but a step folder name (a
    damaged or overwritten pointer: not UTF-8 text, or not "step_<digits>")."""
    pointer = root / name
    if not pointer.is_file():
        return None
    try:
        text = pointer.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        text = None
    if text is None or STEP_DIR.match(text) is None:
        shown = "text that is not UTF-8" if text is None else repr(text[:40])
        raise CheckpointError(
            f"pointer file {pointer} holds {shown}: expected the name of a step folder "
            "(e.g. step_000100)"
        )
    target = root / text
    return target if target.is_dir() else None


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The step folder the `latest` pointer names, if it exists (unverified; see
    `find_resume_checkpoint` for the newest folder that passes verification)."""
    return read_pointer(Path(root), LATEST_POINTER)


def best_checkpoint(root: str | os.PathLike) -> Path | None:
    """The step folder the `best` pointer names, if it exists."""
    return read_pointer(Path(root), BEST_POINTER)
