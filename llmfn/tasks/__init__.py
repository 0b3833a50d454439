"""Training tasks by name. To add one: write a `Task` (see base.py) and register it here."""

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


__all__ = ["AVAILABLE_TASKS", "Task", "get_task"]
