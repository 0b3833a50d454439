"""Small configs, batches and train steps shared by the step and distributed tests."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch

from llmfn.config import from_dict
from llmfn.layers.linear_cross_entropy import IGNORE_INDEX
from llmfn.model import init_params
from llmfn.optim import build_optimizer
from llmfn.schedule import lr_schedule_from_config
from llmfn.step import init_train_state, make_train_step
from llmfn.tasks import get_task

TINY_SYNTHETIC_LM = [  # CLI overrides: a 2-layer, 32-wide lm on synthetic tokens
    "model.vocab_size=64",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.max_seq_len=16",
    "data.module=synthetic",
    "data.synthetic_vocab_size=64",
    "data.batch_size=4",
    "data.synthetic_size=512",
]


def small_config(dropout: float = 0.0, **train):
    return from_dict(
        {
            "model": {
                "dropout": dropout,
                "vocab_size": 64,
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 2,
                "max_seq_len": 16,
            },
            "data": {"module": "synthetic", "batch_size": 2},
            "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2},
            "train": {"max_steps": 20, **train},
        }
    )


def global_batch(config, index: int, *, rows: int, accum: int = 1, prompts: bool = False) -> dict:
    """[accum, rows, T] token batch, a pure function of index. prompts: each row's first
    targets are masked as SFT masks a prompt, row r's first 3·r (mod T), so that rows, and the
    micro-batches and ranks that hold them, have different numbers of loss tokens."""
    gen = torch.Generator().manual_seed(1000 + index)
    seq_len = config.model.max_seq_len
    tokens = torch.randint(0, config.model.vocab_size, (accum, rows, seq_len + 1), generator=gen)
    targets = tokens[..., 1:].clone()
    if prompts:
        row = torch.arange(accum * rows).view(accum, rows, 1)
        targets[torch.arange(seq_len) < (3 * row) % seq_len] = IGNORE_INDEX
    return {"inputs": tokens[..., :-1], "targets": targets}


def state_and_step(config, all_reduce=None, rank=0, compile=False, donate=False):
    task = get_task(config.train.task)
    params = init_params(config.model, seed=0)
    optimizer = build_optimizer(config.optim, params)
    state = init_train_state(params, optimizer, seed=0, precision=config.train.precision)
    step = make_train_step(
        task,
        config,
        optimizer,
        lr_schedule_from_config(config.optim, config.train.max_steps),
        all_reduce=all_reduce,
        rank=rank,
        compile=compile,
        donate=donate,
    )
    return state, step


ROOT = Path(__file__).parent.parent


def run_torchrun(*args: str) -> None:
    """`torchrun --standalone --nproc_per_node 2 ARGS...` from the repository root (one
    OpenMP thread per rank); fails the test with the end of stderr if a rank fails."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*cmd, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


def validation_metrics(proc) -> tuple[dict[str, float], int]:
    """The driver's validation pass (`llmfn.evaluation.evaluate`) of small_config's model at init
    over 3 synthetic val batches, on this process's share of them -> (metrics, the number of
    batches this process evaluated)."""
    from llmfn.data import build_data_module
    from llmfn.evaluation import evaluate
    from llmfn.step import make_eval_step

    config = small_config()
    data_config = dataclasses.replace(config.data, val_batches=3, synthetic_vocab_size=64)
    config = config.replace(data=data_config)
    data = build_data_module(config.data, seq_len=config.model.max_seq_len, seed=0)
    data.prepare()
    data.setup(rank=proc.rank, world_size=proc.world_size)
    task = get_task(config.train.task)
    params = init_params(config.model, seed=0)
    calls = []
    eval_step = make_eval_step(task, config)

    def counted_eval_step(params, batch):
        calls.append(1)
        return eval_step(params, batch)

    return evaluate(counted_eval_step, params, data, proc, perplexity=True), len(calls)
