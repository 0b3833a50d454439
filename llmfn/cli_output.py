"""What the command-line tools do when their reader goes away (torch-free).

    python -m llmfn.train --list-keys | head -3
    python -m llmfn.generate runs/x --prompt "def" | head -c 100

`head` closes the pipe after its share, the next write raises BrokenPipeError, and the tool
ends quietly with status 0, as other command-line tools do: a reader that stopped early is no
error of ours.
"""

from __future__ import annotations

import os
import sys


def closed_pipe_exit() -> int:
    """After a BrokenPipeError on stdout: point stdout at /dev/null (so the flush at exit
    raises nothing) -> exit status 0."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
