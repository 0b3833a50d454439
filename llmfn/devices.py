"""Device names as users write them (`train.device=...`, `--device ...`) -> a device this
machine has, with one clear error naming the option otherwise; and the deterministic mode a
device runs in (`train.deterministic`)."""

from __future__ import annotations

import os

import torch

EXPECTED = "expected auto, cpu, cuda, cuda:N or mps"


def spelled(option: str, value: str) -> str:
    """How the user wrote the option: `train.device='x'` in a config, `--device 'x'` on a CLI."""
    return f"{option} {value}" if option.startswith("--") else f"{option}={value}"


def resolve_device(name: str, *, option: str, local_rank: int = 0) -> torch.device:
    """`auto` -> cuda:local_rank when a GPU is present, else cpu; `cuda` -> cuda:local_rank;
    any other name torch knows, if this machine has it. option: where the name came from
    ("train.device", "--device"), for the error."""
    given = spelled(option, repr(name))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type == "meta":
        raise ValueError(f"{given} is not a device name: {EXPECTED}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            use = spelled(option, "cpu")
            raise ValueError(f"{given} but no CUDA device is available (use {use})")
        from_rank = device.index is None
        device = torch.device("cuda", local_rank if from_rank else device.index)
        count = torch.cuda.device_count()
        if device.index >= count:
            rank = f" (cuda:{local_rank} for LOCAL_RANK={local_rank})" if from_rank else ""
            raise ValueError(
                f"{given}{rank} but this machine has {count} CUDA device(s): "
                f"cuda:0 to cuda:{count - 1}"
            )
    try:
        torch.empty(0, device=device)
    except Exception:  # an accelerator torch was not built for: several error types
        raise ValueError(f"{given} is not available on this machine") from None
    return device


def set_determinism(option: bool | None, device: torch.device) -> bool:
    """Turn torch's deterministic algorithms on or off for a run on `device` (warn-only, so an
    op without a deterministic version still runs) and say which.

    option: `train.deterministic`; None (the default) means on for a CPU, where it costs nothing
    measurable and makes the compiled step bitwise reproducible (a resumed run matches an
    uninterrupted one), and off elsewhere, as torchtitan and HF's Trainer leave it: on a GPU it
    also puts inductor in its deterministic mode, which skips the on-device autotuning of kernels
    (pytorch/pytorch#165950, #174711). On CUDA, on also sets CUBLAS_WORKSPACE_CONFIG=:4096:8
    (unless set), which cuBLAS needs to be deterministic; it takes effect only if no cuBLAS
    handle exists yet (the driver calls this before its first matmul)."""
    on = device.type == "cpu" if option is None else option
    if on and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    return on


def is_out_of_memory(err: BaseException) -> bool:
    """numpy's and Python's MemoryError, torch's CUDA OutOfMemoryError, or the CPU allocator's
    failure (a RuntimeError "DefaultCPUAllocator: can't allocate memory")."""
    return isinstance(err, MemoryError | torch.OutOfMemoryError) or (
        "can't allocate memory" in str(err)
    )
