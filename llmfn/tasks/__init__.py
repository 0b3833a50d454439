"""Training tasks by name. To add one: write a `Task` (see base.py) and register it here."""

import os
from pathlib import Path

from llmfn.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    read_run_config,
    resolve_checkpoint,
    verify_checkpoint,
)
from llmfn.tasks import lm, regression
from llmfn.tasks.base import Task

AVAILABLE_TASKS: dict[str, Task] = {
    "lm": lm.LM,
    "sft": lm.SFT,
    "regression": regression.REGRESSION,
}


def get_task(name: str) -> Task:
    if name not in AVAILABLE_TASKS:
        raise ValueError(
            f"train.task={name!r} is unknown: expected one of {', '.join(AVAILABLE_TASKS)}"
        )
    return AVAILABLE_TASKS[name]


def language_model_checkpoint(path: str | os.PathLike, action: str) -> Path:
    """The step folder `path` names, verified against its manifest before its config.yaml is
    read (a damaged config.yaml shows as a failed size or sha256 check), and holding a language
    model (its task generates text; a task not registered here passes). CheckpointError
    otherwise: `action` says what needs one ("exported"). Load it with verify=False."""
    folder = resolve_checkpoint(path)
    verify_checkpoint(folder)
    train = read_run_config(folder).get("train")
    task = train.get("task", "lm") if isinstance(train, dict) else "lm"
    if task in AVAILABLE_TASKS and not AVAILABLE_TASKS[task].generates_text:
        language_tasks = [name for name, kind in AVAILABLE_TASKS.items() if kind.generates_text]
        raise CheckpointError(
            f"checkpoint {folder} holds a {task} model (train.task={task} in its {CONFIG_FILE}): "
            f"only language-model checkpoints ({', '.join(language_tasks)}) can be {action}"
        )
    return folder


__all__ = ["AVAILABLE_TASKS", "Task", "get_task", "language_model_checkpoint"]
