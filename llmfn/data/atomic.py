"""Write a folder so that nobody ever sees it half-written: build it under a temporary name
beside the target, then rename it into place (one atomic `rename` on the same filesystem).

    with atomic_folder(Path("data/out"), if_exists="error") as tmp:
        (tmp / "train.bin").write_bytes(...)      # a crash or Ctrl-C here leaves no data/out
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

IF_EXISTS = ("error", "replace", "keep")


def temporary_sibling(final: Path, tag: str) -> Path:
    return final.parent / f".{final.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def check_writable(final: Path, if_exists: str, flag: str = "--overwrite") -> None:
    """Fail early (before any heavy work) when `final` exists and may not be replaced."""
    if if_exists not in IF_EXISTS:
        raise ValueError(
            f"if_exists={if_exists!r} is invalid: expected one of {', '.join(IF_EXISTS)}"
        )
    if if_exists == "error" and final.exists():
        raise FileExistsError(
            f"output folder '{final}' already exists: choose another folder or pass {flag} to replace it"
        )


def publish(tmp: Path, final: Path, if_exists: str) -> Path:
    """Rename the finished `tmp` to `final`. if_exists: "error" raise, "replace" swap the old
    one out, "keep" discard `tmp` when `final` appeared meanwhile (another process won)."""
    try:
        os.rename(tmp, final)  # fails if `final` is a non-empty folder
        return final
    except OSError:
        if not final.exists():
            raise
    if if_exists == "keep":
        shutil.rmtree(tmp, ignore_errors=True)
    elif if_exists == "replace":
        old = temporary_sibling(final, "old")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        check_writable(final, "error")
    return final


@contextmanager
def atomic_folder(
    final: str | Path, *, if_exists: str = "error", flag: str = "--overwrite"
) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes `final`, on any error it is deleted."""
    final = Path(final)
    check_writable(final, if_exists, flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, final, if_exists)
