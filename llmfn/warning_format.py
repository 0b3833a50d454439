"""How the command-line tools print warnings: llmfn's own as one `warning: ...` line.

llmfn's warnings name the file, folder or key that matters, so Python's default second line
(the source line that called `warnings.warn`) only adds noise for a user of the CLIs. Other
libraries' warnings keep Python's format. Imports nothing from llmfn, so every CLI may use it.
"""

from __future__ import annotations

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
    """Process-wide: print warnings with `one_line_warning` (called by each CLI's main)."""
    warnings.formatwarning = one_line_warning
