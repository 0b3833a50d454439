"""The CPU decode matmul over column panels: `llmfn/kernels/panel_matmul.c`, compiled on first
use with the machine's C compiler, cached, and called through the torch op
`llmfn::panel_matmul` under torch.compile (one opaque kernel), directly in eager.

A decode step multiplies every weight once by a few rows, which makes it a stream through
memory: the kernel reads each panel [in, 8] once as a sequential block while the rows
accumulate in registers (bench/decode_throughput.py measures it against MKL).

Where the kernel cannot serve (gradients to compute, vmap, not float32, not on CPU) torch.matmul
computes the same product; where it cannot be built (no C compiler, a CPU without AVX2/FMA or
NEON) `kernel_available()` is False and `llmfn.generate.decode_weights` keeps column-major
weights instead.
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

PANEL_WIDTH = 8  # output columns per panel: one 8-float vector register
SOURCE = Path(__file__).resolve().parent.parent / "kernels" / "panel_matmul.c"


def panel_weight(weight: torch.Tensor, width: int = PANEL_WIDTH) -> torch.Tensor:
    """[out, in] -> [out // width, in, width] contiguous panels of `width` output columns."""
    out_features, in_features = weight.shape
    if out_features % width:
        raise ValueError(f"panel width {width} does not divide the {out_features} output rows")
    panels = weight.t().reshape(in_features, out_features // width, width)
    return panels.transpose(0, 1).contiguous()


def unpanel(panels: torch.Tensor) -> torch.Tensor:
    """[P, in, width] panels -> the [in, P · width] matrix they hold (Wᵀ)."""
    num_panels, in_features, width = panels.shape
    return panels.transpose(0, 1).reshape(in_features, num_panels * width)


# --- Building the kernel ----------------------------------------------------------------------
def vector_flags() -> list[str] | None:
    """The compiler flags for 8-float vectors with fused multiply-add on this CPU, None when it
    has no such unit (the kernel is then not built)."""
    machine = platform.machine().lower()
    if machine in {"x86_64", "amd64"}:
        capability = torch.backends.cpu.get_cpu_capability()
        return ["-mavx2", "-mfma"] if capability in {"AVX2", "AVX512"} else None
    if machine in {"arm64", "aarch64"}:
        return []  # NEON is part of the base instruction set
    return None


def cache_dir() -> Path:
    """Where built kernels live: $LLMFN_CACHE_DIR, else $XDG_CACHE_HOME/llmfn, else
    ~/.cache/llmfn."""
    if "LLMFN_CACHE_DIR" in os.environ:
        return Path(os.environ["LLMFN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmfn"


def build(compiler: str, flags: list[str]) -> Path:
    """Compile the kernel to a shared library in cache_dir() (once per source, compiler and
    flags; concurrent builders each write a temporary file and rename it into place)."""
    base = ["-O3", "-ffp-contract=fast", "-shared", "-fPIC", *flags]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *base]).encode())
    target = cache_dir() / f"panel_matmul-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        for openmp in (["-fopenmp"], []):  # threads where the compiler has OpenMP
            command = [compiler, *base, *openmp, str(SOURCE), "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(built, target)
                return target
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[:500]}")


@functools.cache
def load_kernel():
    """The compiled `panel_matmul` C function, or None (with one warning saying why) when it
    cannot be built here. $CC picks the compiler (default: cc)."""
    flags = vector_flags()
    if flags is None:
        return None
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        warnings.warn(
            f"llmfn: no C compiler {compiler!r} (set $CC), so CPU decode keeps column-major "
            "weights instead of the faster panel kernel",
            stacklevel=2,
        )
        return None
    try:
        library = ctypes.CDLL(str(build(compiler, flags)))
    except (OSError, RuntimeError) as error:
        warnings.warn(
            f"llmfn: the CPU decode kernel did not build ({error}); CPU decode keeps "
            "column-major weights instead",
            stacklevel=2,
        )
        return None
    kernel = library.panel_matmul
    kernel.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
    kernel.restype = None
    return kernel


def kernel_available() -> bool:
    """Whether this machine runs the panel kernel (builds it on the first call)."""
    return load_kernel() is not None


# --- The op -----------------------------------------------------------------------------------
def panel_matmul(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """x [rows, in] @ panels [P, in, width] -> [rows, P · width].

    With gradients to compute, torch.matmul over the panels' matrix (the kernel has no
    backward); under torch.compile the op `llmfn::panel_matmul`; in eager its kernel directly
    (the dispatcher would cost a fifth of a small multiply)."""
    if torch.is_grad_enabled() and (x.requires_grad or panels.requires_grad):
        return x @ unpanel(panels)
    if torch.compiler.is_compiling():
        return torch.ops.llmfn.panel_matmul.default(x, panels)
    return multiply(x, panels)


def multiply(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """The kernel where it serves (float32 on CPU, width-8 panels), torch.matmul elsewhere."""
    num_panels, in_features, width = panels.shape
    kernel = load_kernel() if x.device.type == "cpu" else None
    if kernel is None or width != PANEL_WIDTH or not x.dtype == panels.dtype == torch.float32:
        return x @ unpanel(panels)
    x, panels = x.contiguous(), panels.contiguous()
    try:
        pointers = x.data_ptr(), panels.data_ptr()
    except RuntimeError:  # a tensor of torch.func's transforms (vmap): no storage of its own
        return x @ unpanel(panels)
    y = x.new_empty(x.shape[0], num_panels * width)
    rows, threads = x.shape[0], torch.get_num_threads()
    kernel(*pointers, y.data_ptr(), rows, in_features, num_panels, threads)
    return y


torch.library.define("llmfn::panel_matmul", "(Tensor x, Tensor panels) -> Tensor")
torch.library.impl("llmfn::panel_matmul", "default", multiply)


@torch.library.register_fake("llmfn::panel_matmul")
def _(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], panels.shape[0] * panels.shape[2])
