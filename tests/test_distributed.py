"""Two CPU processes (gloo) under torchrun: params identical on both ranks after N steps, and
equal to one process stepping on the same global batch (whose ranks' halves hold different
numbers of loss tokens: each token weighs the same; each row drops what it drops in one
process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.ddp_worker import DROPOUT
from tests.step_fixtures import ROOT, global_batch, run_torchrun, small_config, state_and_step

STEPS = 3


def run_two_ranks(out: Path, compiled: bool) -> None:
    worker = str(ROOT / "tests" / "ddp_worker.py")
    run_torchrun(worker, str(out), str(STEPS), "1" if compiled else "0")


def single_process_params():
    config = small_config(dropout=DROPOUT)
    state, step = state_and_step(config)
    for i in range(STEPS):
        batch = global_batch(config, i, rows=2 * config.data.batch_size, prompts=True)
        state, _ = step(state, batch)
    return {".".join(k): v for k, v in state["params"].items(include_nested=True, leaves_only=True)}


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_two_ranks_agree_and_match_one_process(tmp_path, compiled):
    run_two_ranks(tmp_path, compiled)
    rank0 = load_file(tmp_path / "rank0.safetensors")
    rank1 = load_file(tmp_path / "rank1.safetensors")
    reference = single_process_params()
    assert rank0.keys() == rank1.keys() == reference.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
        # Adam divides by sqrt(v): a near-zero gradient element amplifies float noise to ~1e-5.
        torch.testing.assert_close(
            rank0[name], reference[name], rtol=1e-4, atol=5e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    start = small_config()
    assert not torch.equal(
        rank0["embed.weight"], state_and_step(start)[0]["params", "embed", "weight"]
    )  # it trained


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch):
    from llmfn.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError) as error:
        resolve_device("auto", option="train.device", local_rank=2)
    assert str(error.value) == (
        "train.device='auto' (cuda:2 for LOCAL_RANK=2) but this machine has 2 CUDA device(s): "
        "cuda:0 to cuda:1"
    )


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "gpu"])
def test_a_bad_device_name_is_one_clear_error(name):
    from llmfn.distributed import init_process

    with pytest.raises(
        ValueError, match=rf"train.device='{name}' is not a device name: expected auto, cpu"
    ):
        init_process(name)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"WORLD_SIZE": "abc"},
            r"environment variable WORLD_SIZE='abc': expected an integer \(torchrun sets it\)",
        ),
        ({"WORLD_SIZE": "0"}, r"WORLD_SIZE='0': expected an integer >= 1"),
        ({"WORLD_SIZE": "2", "RANK": "-1"}, r"RANK='-1': expected an integer >= 0"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK='2': expected an integer below WORLD_SIZE=2"),
        ({"LOCAL_RANK": "x"}, r"LOCAL_RANK='x': expected an integer"),
    ],
)
def test_bad_torchrun_variables_are_one_clear_error(monkeypatch, environ, message):
    from llmfn.distributed import init_process

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        init_process("cpu")


def test_nccl_without_a_gpu_is_one_clear_error(monkeypatch):
    from llmfn.distributed import process_group_backend

    cpu = torch.device("cpu")
    assert process_group_backend("auto", cpu) == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ValueError,
        match=r"distributed.backend='nccl' needs CUDA GPUs and none is available: "
        r"use distributed.backend=gloo \(or auto\)",
    ):
        process_group_backend("nccl", cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=r"needs CUDA GPUs but train.device is cpu"):
        process_group_backend("nccl", cpu)


def torchrun_train(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m llmfn.train ARGS` (its output, its code)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*cmd, "-m", "llmfn.train", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def llmfn_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_errors_under_torchrun_are_one_line(tmp_path):
    """A bad key (every rank) and data that rank 0 fails to prepare (the others waiting at the
    barrier): one error line each, no rank's traceback (torchrun's own summary follows)."""
    done = torchrun_train("configs/tiny.yaml", "optim.lrr=1")
    assert done.returncode != 0
    assert llmfn_errors(done.stderr) == [
        "error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"
    ]
    missing = tmp_path / "nope"
    done = torchrun_train(
        "configs/tiny.yaml",
        "data.module=token_bin",
        f"data.path={missing}",
        f"train.run_dir={tmp_path}",
    )
    assert done.returncode != 0
    (line,) = llmfn_errors(done.stderr)
    assert f"token-bin folder '{missing}': the folder does not exist" in line
    assert "[rank1]" not in done.stderr and "gloo" not in done.stderr, done.stderr[-3000:]


def test_validation_is_split_across_ranks_and_equals_one_process(tmp_path):
    """3 val batches on 2 ranks (2 and 1 each): the summed result is one process's."""
    from llmfn.distributed import ProcessInfo
    from tests.step_fixtures import validation_metrics

    run_torchrun(str(ROOT / "tests" / "ddp_eval_worker.py"), str(tmp_path / "val.json"))
    ranks = [json.loads((tmp_path / f"val.json.rank{r}").read_text()) for r in (0, 1)]
    assert [rank["batches"] for rank in ranks] == [2, 1]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    one_process = ProcessInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    metrics, batches = validation_metrics(one_process)
    assert batches == 3 and ranks[0]["metrics"].keys() == metrics.keys() == {"val_loss", "val_ppl"}
    assert ranks[0]["metrics"]["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)
