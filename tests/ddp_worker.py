"""Run under torchrun: N train steps of the functional step with a gradient all-reduce, on
batches whose ranks hold different numbers of loss tokens (masked prompts), with dropout; each
rank writes its final params. Used by tests/test_distributed.py.

    torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR STEPS COMPILE
"""

import os
import sys

from safetensors.torch import save_file

from llmfn.distributed import GradientAllReduce, init_process, shutdown
from tests.step_fixtures import global_batch, small_config, state_and_step

DROPOUT = 0.1  # each row's dropout mask is keyed by its row of the global batch


def main(out_dir: str, steps: int, compiled: bool) -> None:
    proc = init_process("cpu", "gloo")
    config = small_config(dropout=DROPOUT)
    all_reduce = GradientAllReduce(proc.world_size)
    state, step = state_and_step(
        config, all_reduce=all_reduce, rank=proc.rank, compile=compiled, donate=True
    )
    for i in range(steps):
        full = global_batch(config, i, rows=config.data.batch_size * proc.world_size, prompts=True)
        rows = slice(proc.rank * config.data.batch_size, (proc.rank + 1) * config.data.batch_size)
        state, _ = step(state, {k: v[:, rows] for k, v in full.items()})
    flat = {
        ".".join(k): v.contiguous()
        for k, v in state["params"].items(include_nested=True, leaves_only=True)
    }
    save_file(flat, os.path.join(out_dir, f"rank{proc.rank}.safetensors"))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1")
