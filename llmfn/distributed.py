"""Multi-process pieces: process-group setup from torchrun's environment, and the gradient
all-reduce that runs *inside* the compiled step.

Why not `DistributedDataParallel`: `torch.func.grad` through DDP does no averaging (ranks
silently diverge, DESIGN.md §4). Instead every rank computes its gradients functionally and one
functional all-reduce (over a single flattened buffer) sums them, weighted by each rank's token
count, inside the same graph.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from llmfn.devices import resolve_device


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_int(name: str, default: int, minimum: int) -> int:
    """The integer in environment variable `name` (`default` when unset); ValueError naming the
    variable when it is not an integer >= minimum."""
    text = os.environ.get(name, str(default))
    problem = f"environment variable {name}={text!r}: expected an integer"
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{problem} (torchrun sets it)") from None
    if value < minimum:
        raise ValueError(f"{problem} >= {minimum} (torchrun sets it)")
    return value


def process_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; one process when unset."""
    world_size = env_int("WORLD_SIZE", 1, minimum=1)
    rank = env_int("RANK", 0, minimum=0)
    if rank >= world_size:
        raise ValueError(
            f"environment variable RANK='{rank}': expected an integer below WORLD_SIZE={world_size} "
            "(torchrun sets them)"
        )
    return rank, world_size, env_int("LOCAL_RANK", 0, minimum=0)


def process_group_backend(backend: str, device: torch.device) -> str:
    """The backend to join with: `auto` is nccl on a GPU, gloo on CPU; nccl without a GPU to
    use is a ValueError (torch's own error comes once per rank, amid torchrun's report)."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError(
            "distributed.backend='nccl' needs CUDA GPUs and none is available: "
            "use distributed.backend=gloo (or auto)"
        )
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(
            f"distributed.backend='nccl' needs CUDA GPUs but train.device is {device}: "
            "use train.device=auto, or distributed.backend=gloo (or auto)"
        )
    return backend


def init_process(device_name: str, backend: str = "auto", timeout_s: int = 1800) -> ProcessInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise one process."""
    rank, world_size, local_rank = process_ranks()
    device = resolve_device(device_name, option="train.device", local_rank=local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = process_group_backend(backend, device)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return ProcessInfo(rank, world_size, local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class RankZeroFailed(RuntimeError):
    """What the other ranks raise when work done on rank 0 alone failed there."""


def on_rank_zero_first(work: Callable[[], object], proc: ProcessInfo, what: str) -> None:
    """work() on rank 0 while the other ranks wait for it (a barrier). If it fails there, rank
    0 raises its error and every other rank raises RankZeroFailed naming `what`, rather than
    waiting out the collective timeout or failing in the transport when rank 0 exits."""
    if proc.is_main:
        try:
            work()
        except BaseException:
            max_over_ranks([1.0], proc.device)  # tell the waiting ranks, then fail here
            raise
    if max_over_ranks([0.0], proc.device)[0] > 0:
        raise RankZeroFailed(f"rank 0 failed {what}: its error is in rank 0's output")


def log(proc: ProcessInfo, message: str) -> None:
    """Print `message` on the main process only."""
    if proc.is_main:
        print(message, flush=True)


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value's maximum over all ranks: one all-reduce, and a host sync (call at step
    boundaries). One process: the values themselves."""
    return _reduce_over_ranks(values, device, dist.ReduceOp.MAX)


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over all ranks (float64), as `max_over_ranks`."""
    return _reduce_over_ranks(values, device, dist.ReduceOp.SUM)


def _reduce_over_ranks(values: list[float], device: torch.device, op) -> list[float]:
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


class GradientAllReduce:
    """Sum a list of tensors over all ranks with one functional all-reduce (traceable by
    torch.compile): flatten into one float32 buffer, sum, split back. The train step weights
    each rank's part by its token count before the sum (`llmfn.step.mean_over_ranks`)."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        flat = funcol.all_reduce(flat, "sum", dist.group.WORLD)
        pieces = flat.split([t.numel() for t in tensors])
        return [p.view(t.shape).to(t.dtype) for p, t in zip(pieces, tensors, strict=True)]
