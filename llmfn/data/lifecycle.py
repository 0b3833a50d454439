"""The order a data module is driven in, and the errors for breaking it.

`prepare()` (rank 0) builds a cached folder, `setup(rank=..., world_size=...)` (every rank)
opens it, and only then are batches served. A prepared folder is complete once its meta.json
is there (the folder appears atomically, meta.json included).
"""

from __future__ import annotations

from pathlib import Path


class NotSetUp(RuntimeError):
    """A batch was asked for before `setup()`."""

    def __init__(
        self, message: str = "call setup(rank=..., world_size=...) before asking for batches"
    ):
        super().__init__(message)


def is_prepared(folder: Path) -> bool:
    return (folder / "meta.json").is_file()


def require_prepared(folder: Path, what: str = "prepared data") -> None:
    """FileNotFoundError naming `what` unless `prepare()` has built `folder`."""
    if not is_prepared(folder):
        raise FileNotFoundError(
            f"{what} '{folder}' is missing: call prepare() (on rank 0) before setup()"
        )
