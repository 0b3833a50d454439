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


class OutputError(OSError):
    """The output folder cannot be written. The message names the folder the caller asked for,
    never the temporary one beside it."""

    def __init__(self, path: Path, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path = path
        self.reason = cause.strerror or str(cause)

    def __str__(self) -> str:
        return f"'{self.path}' cannot be written: {self.reason}"


def _is_about_other_file(err: OSError, folder: Path) -> bool:
    """The error names a file outside `folder` (such as an input being read)."""
    names = [str(name) for name in (err.filename, err.filename2) if name is not None]
    return bool(names) and not any(name.startswith(str(folder)) for name in names)


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


def publish(tmp: Path, final: Path, if_exists: str, flag: str = "--overwrite") -> Path:
    """Rename the finished `tmp` to `final`. if_exists: "error" raise (naming `flag`), "replace"
    swap the old one out, "keep" discard `tmp` when `final` appeared meanwhile (another process
    won)."""
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
        try:
            os.rename(tmp, final)
        except OSError:
            os.rename(old, final)  # put the old folder back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        check_writable(final, "error", flag)
    return final


@contextmanager
def atomic_folder(
    final: str | Path, *, if_exists: str = "error", flag: str = "--overwrite"
) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes `final`, on any error it is deleted."""
    final = Path(final)
    check_writable(final, if_exists, flag)
    tmp = temporary_sibling(final, "tmp")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as err:
        raise OutputError(final, err) from None
    try:
        yield tmp
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_about_other_file(err, tmp):
            raise
        raise OutputError(final, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        publish(tmp, final, if_exists, flag)
    except FileExistsError:
        raise
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(final, err) from None
