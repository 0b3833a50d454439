"""Run under torchrun: N SGD steps of `llmfn.as_module` wrapped in DistributedDataParallel, the
loss computed from the wrapper's output; each rank writes its final params. Used by
tests/test_module.py.

    torchrun --nproc_per_node 2 tests/ddp_module_worker.py OUT_DIR STEPS
"""

import os
import sys

import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from llmfn.distributed import init_process, shutdown
from llmfn.model import cross_entropy, init_params
from llmfn.module import as_module
from tests.step_fixtures import global_batch, small_config

LR = 0.5


def module_sgd_steps(module, batches) -> None:
    """SGD on `module` (plain or DDP-wrapped) over batches {"inputs", "targets"} [B, T]."""
    opt = torch.optim.SGD(module.parameters(), lr=LR)
    for batch in batches:
        loss, _ = cross_entropy(module(batch["inputs"]), batch["targets"])
        loss.backward()
        opt.step()
        opt.zero_grad()


def main(out_dir: str, steps: int) -> None:
    proc = init_process("cpu", "gloo")
    config = small_config()
    module = as_module(init_params(config.model, seed=0), config.model)
    rows = slice(proc.rank * config.data.batch_size, (proc.rank + 1) * config.data.batch_size)
    shards = [
        {k: v[0, rows] for k, v in global_batch(config, i, rows=2 * config.data.batch_size).items()}
        for i in range(steps)
    ]
    module_sgd_steps(DistributedDataParallel(module), shards)
    flat = {name: p.detach().contiguous() for name, p in module.named_parameters()}
    save_file(flat, os.path.join(out_dir, f"rank{proc.rank}.safetensors"))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
