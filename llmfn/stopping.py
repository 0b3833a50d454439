"""How a run stops before its last step: stop signals (SIGTERM, SIGINT) that all ranks agree
on, and the halt on non-finite loss or gradients with a report of where they are.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field

import torch
from tensordict import TensorDict

from llmfn.config import Config
from llmfn.distributed import max_over_ranks
from llmfn.optim import global_norm


class TrainingHalted(RuntimeError):
    """Training stopped on purpose (non-finite values); the message says why and where."""


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop saves and exits at the next step boundary. A second
    SIGINT (Ctrl-C twice) interrupts at once, and so does any once `interrupt_at_once` is set
    (after the loop: nothing is left to save)."""

    def __init__(self):
        self.received: str | None = None
        self.interrupt_at_once = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        second_ctrl_c = self.received == "SIGINT" and signum == signal.SIGINT
        self.received = signal.Signals(signum).name
        if second_ctrl_c or self.interrupt_at_once:
            raise KeyboardInterrupt  # stop now (a second Ctrl-C: without the checkpoint)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class SignalCheck:
    """When the processes of a run next agree on whether any of them received a stop signal:
    at steps about `seconds` apart by the slowest rank's step time, learned at each check (one
    all-reduce of the flag and that time). torchrun kills its workers 30 s after forwarding a
    signal, so a check every few seconds leaves the rest of that time to save; agreeing every
    step would sync the host with the device at every step."""

    seconds: float = 5.0
    next_step: int = 0
    last_step: int = 0
    last_time: float = field(default_factory=time.monotonic)

    def agree(self, step: int, received: bool, device: torch.device) -> bool:
        now = time.monotonic()
        step_time = (now - self.last_time) / max(step - self.last_step, 1)
        any_received, slowest = max_over_ranks([float(received), step_time], device)
        self.last_step, self.last_time = step, now
        self.next_step = step + max(1, int(self.seconds / max(slowest, 1e-9)))
        return any_received > 0


def nonfinite_report(task, config: Config, state: TensorDict, batch: dict) -> str:
    """Names of parameters or gradients that are not finite, recomputed eagerly on `batch`; when
    all are finite but their global norm is not (its float32 sum of squares overflowed), that."""
    params = state["params"]
    bad = [
        ".".join(k)
        for k, v in params.items(include_nested=True, leaves_only=True)
        if not torch.isfinite(v).all()
    ]
    first = {k: v[0] for k, v in batch.items()}
    grads = torch.func.grad(lambda p: task.loss(p, first, config, training=False)[0])(params)
    bad += [
        "grad:" + ".".join(k)
        for k, v in grads.items(include_nested=True, leaves_only=True)
        if not torch.isfinite(v).all()
    ]
    if bad:
        return ", ".join(bad[:20]) + (" ..." if len(bad) > 20 else "")
    if not torch.isfinite(global_norm(grads)):
        return gradient_norm_overflow(grads)
    return "loss only (all parameters and gradients finite)"


def gradient_norm_overflow(grads: TensorDict) -> str:
    """What to say when every gradient is finite but their global norm overflows float32."""
    name, largest = max(
        (
            (".".join(k), v.abs().max())
            for k, v in grads.items(include_nested=True, leaves_only=True)
        ),
        key=lambda item: float(item[1]),
    )
    return (
        "gradient norm overflow: every gradient is finite but their global norm is not (its "
        f"float32 sum of squares overflows; the largest |gradient| is {float(largest):.3g}, in "
        f"grad:{name}): usually a diverging loss (lower optim.lr)"
    )
