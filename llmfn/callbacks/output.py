"""Printing that does not break a running tqdm progress bar."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


def write_line(text: str, file: TextIO | None = None) -> None:
    """Print `text` above any active progress bar (to `file`, default stdout)."""
    tqdm.write(text, file=file if file is not None else sys.stdout)
