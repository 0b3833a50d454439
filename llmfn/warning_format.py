"""How the command-line tools print: llmfn's own warnings as one `warning: ...` line, and an
error that every rank meets alike once per machine (`prints_for_every_rank`).

llmfn's warnings name the file, folder or key that matters, so Python's default second line
(the source line that called `warnings.warn`) only adds noise for a user of the CLIs. Other
libraries' warnings keep Python's format, except one notice dropped: torch's "No CUDA runtime is
found, using CUDA_HOME=..." that a CUDA build of torch logs on a machine without a GPU the first
time a step compiles (it means nothing to someone training on CPU). Imports nothing from llmfn,
so every CLI may use it.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

PACKAGE = Path(__file__).parent
_python_format = warnings.formatwarning


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """`warnings.formatwarning` for the CLIs (see the module docstring)."""
    if Path(filename).is_relative_to(PACKAGE) and issubclass(category, UserWarning):
        return f"warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


def use_one_line_warnings() -> None:
    """Process-wide: print warnings with `one_line_warning` and drop torch's CUDA_HOME notice
    (called by each CLI's main; calling it again changes nothing)."""
    warnings.formatwarning = one_line_warning
    logging.getLogger(CUDA_HOME_NOTICE_LOGGER).addFilter(DROP_CUDA_HOME_NOTICE)


class DropMessage(logging.Filter):
    """Drops the log records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


CUDA_HOME_NOTICE_LOGGER = "torch.utils.cpp_extension"
DROP_CUDA_HOME_NOTICE = DropMessage("No CUDA runtime is found")


def prints_for_every_rank() -> bool:
    """Whether this process reports errors that every rank meets alike (a bad config, a halt):
    one process, or the first of each machine under torchrun (LOCAL_RANK 0), so that such an
    error is printed once per machine rather than once per rank."""
    return os.environ.get("LOCAL_RANK", "0").strip() in ("0", "")
