"""The default training text: the Python standard library's own `.py` files.

Every machine that runs llmfn has them, so `make train` learns from real text with no download.
The files come from `sysconfig.get_paths()["stdlib"]`, minus tests, vendored packages and data
tables; a deterministic, evenly spread subset (sorted paths) of DEFAULT_MAX_FILES files is
about 4 MB of Python.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from llmfn.data.text_module import TextDataModule, select_evenly

DEFAULT_MAX_FILES = 256
SKIPPED_DIRS = frozenset(
    {
        "site-packages",  # third-party packages, not the stdlib
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "encodings",  # codec tables: long strings of escapes
        "pydoc_data",  # one huge string literal
        "turtledemo",
        "ensurepip",
    }
)


def stdlib_root() -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(
            f"the Python standard library folder '{root}' (sysconfig 'stdlib') does not exist"
        )
    return root


def stdlib_files(max_files: int | None = DEFAULT_MAX_FILES, root: Path | None = None) -> list[Path]:
    """Sorted `.py` files of the stdlib (see SKIPPED_DIRS), at most `max_files`, evenly spread."""
    root = root or stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith(".")]
        found += [
            Path(dirpath) / name
            for name in filenames
            if name.endswith(".py") and not name.startswith("_sysconfigdata")
        ]
    found.sort(key=lambda path: path.relative_to(root).as_posix())
    if not found:
        raise FileNotFoundError(f"no .py files under the standard library folder '{root}'")
    return select_evenly(found, max_files)


class StdlibDataModule(TextDataModule):
    """`TextDataModule` over `stdlib_files(max_files)`, cached as `{cache_dir}/stdlib-...`."""

    def __init__(self, *, max_files: int | None = DEFAULT_MAX_FILES, **options):
        super().__init__(stdlib_files(max_files), name="stdlib", **options)
