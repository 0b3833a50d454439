"""Printing that does not break a running tqdm progress bar."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


def write_line(text: str, console: TextIO | None = None) -> None:
    """Print `text` above any active progress bar (to `console`, default stdout)."""
    tqdm.write(text, file=console if console is not None else sys.stdout)
