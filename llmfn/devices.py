"""Device names as users write them (`train.device=...`, `--device ...`) -> a device this
machine has, with one clear error naming the option otherwise."""

from __future__ import annotations

import torch

EXPECTED = "expected auto, cpu, cuda or cuda:N"


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
