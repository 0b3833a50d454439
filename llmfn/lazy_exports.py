"""Package exports that load on first use (PEP 562), so that importing a package, or a light
submodule of it, does not import torch and tensordict (seconds) until a name needs them.

    __getattr__, __dir__ = lazy_exports(__name__, {"forward": "llmfn.model", ...})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package`, whose names in `exports`
    (name -> the module that defines it) load from their modules on first use, and whose
    submodules import on first use as attributes too."""
    namespace = sys.modules[package]

    def __getattr__(name: str) -> object:
        if name not in exports:
            return submodule(name)
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(namespace, name, value)  # later lookups find it without this function
        return value

    def submodule(name: str) -> object:
        """`package.name` as a submodule, imported (`import llmfn; llmfn.checkpoint.x`)."""
        if not name.startswith("_"):
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as err:
                if err.name != f"{package}.{name}":
                    raise  # the submodule exists and failed to import
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(namespace)) | set(exports))

    return __getattr__, __dir__
