"""Compile a C kernel of this folder on first use with the machine's C compiler, cache the
shared library, and load it with ctypes.

    library = load_library("panel_matmul")  # None, with one warning, where it cannot be built
    kernel = load_function("panel_matmul", argtypes)  # its typed C function, or None

The compiler is $CC, else cc, gcc or clang: the kind torch.compile needs on CPU. Libraries are
cached in $LLMFN_CACHE_DIR (default: $XDG_CACHE_HOME/llmfn or ~/.cache/llmfn) under a hash of the
source, compiler and flags; concurrent builders each write a temporary file and rename it into
place. The flags ask for 8-float vectors with fused multiply-add (AVX2 + FMA on x86-64, NEON on
ARM64) and OpenMP where the compiler has it; CPUs without them get no kernel.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

KERNELS = Path(__file__).resolve().parent


def vector_flags() -> list[str] | None:
    """Compiler flags for 8-float vectors with fused multiply-add on this CPU, or None."""
    machine = platform.machine().lower()
    if machine in {"x86_64", "amd64"}:
        capability = torch.backends.cpu.get_cpu_capability()
        return ["-mavx2", "-mfma"] if capability in {"AVX2", "AVX512"} else None
    if machine in {"arm64", "aarch64"}:
        return []  # NEON is part of the base instruction set
    return None


def cache_dir() -> Path:
    if "LLMFN_CACHE_DIR" in os.environ:
        return Path(os.environ["LLMFN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmfn"


def build(name: str, compiler: str, flags: list[str]) -> Path:
    """KERNELS/name.c -> a shared library in cache_dir() (compiled once per source and flags)."""
    source = KERNELS / f"{name}.c"
    base = ["-O3", "-ffp-contract=fast", "-shared", "-fPIC", *flags]
    key = hashlib.sha256(source.read_bytes() + " ".join([compiler, *base]).encode())
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        for openmp in (["-fopenmp"], []):  # threads where the compiler has OpenMP
            command = [compiler, *base, *openmp, str(source), "-o", str(built), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(built, target)
                return target
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[:500]}")


@functools.cache
def compiler() -> str | None:
    """$CC where set, else the first of cc, gcc, clang on the PATH; None (with one warning)
    where there is none."""
    names = [os.environ["CC"]] if "CC" in os.environ else ["cc", "gcc", "clang"]
    found = next((name for name in names if shutil.which(name)), None)
    if found is None:
        warnings.warn(
            f"llmfn: no C compiler {' or '.join(map(repr, names))} (set $CC): CPU decode runs "
            "without its kernels (about half as fast at batch 8)",
            stacklevel=3,
        )
    return found


@functools.cache
def load_library(name: str) -> ctypes.CDLL | None:
    """The kernel library `name`, or None (with one warning saying why) where it cannot be
    built here."""
    flags = vector_flags()
    cc = compiler() if flags is not None else None
    if cc is None:
        return None
    try:
        return ctypes.CDLL(str(build(name, cc, flags)))
    except (OSError, RuntimeError) as error:
        warnings.warn(
            f"llmfn: the CPU decode kernel {name} did not build ({error}); decode runs without it",
            stacklevel=3,
        )
        return None


@functools.cache
def load_function(name: str, argtypes: tuple, restype=None):
    """The C function `name` of KERNELS/name.c with its ctypes signature, or None where it
    cannot be built here."""
    library = load_library(name)
    if library is None:
        return None
    function = getattr(library, name)
    function.argtypes, function.restype = list(argtypes), restype
    return function


def clear_cache() -> None:
    """Forget what was loaded (tests: a fresh machine)."""
    compiler.cache_clear()
    load_library.cache_clear()
    load_function.cache_clear()
