"""The step-memory estimate and the warning a CPU run prints when its step will not fit."""

import dataclasses

import torch

from llmfn import memory_estimate
from llmfn.config import load_config
from llmfn.memory_estimate import cpu_memory_warning, step_memory_bytes
from llmfn.trainer import train

GIB = 2**30
CPU = torch.device("cpu")
GPU_CONFIG = "configs/llama-135m-gpu.yaml"
LLAMA_135M_PARAMS = 134_515_008


def test_the_gpu_config_on_a_small_cpu_machine_warns_with_what_to_change():
    config = load_config(GPU_CONFIG, [], {})
    warning = cpu_memory_warning(config, LLAMA_135M_PARAMS, CPU, available=8 * GIB)
    assert warning.startswith("warning: a train step needs about 17 GiB at data.batch_size=16")
    assert "more than the 8 GiB this machine has available" in warning
    assert "lower data.batch_size" in warning
    assert cpu_memory_warning(config, LLAMA_135M_PARAMS, CPU, available=64 * GIB) is None
    gpu = torch.device("cuda")
    assert cpu_memory_warning(config, LLAMA_135M_PARAMS, gpu, available=8 * GIB) is None


def test_the_estimate_follows_the_memory_options():
    model = load_config(GPU_CONFIG, [], {}).model

    def gib(cfg, **options):
        options = {"precision": "bf16", "compiled": True, "optimizer": "adamw", **options}
        return step_memory_bytes(cfg, num_params=LLAMA_135M_PARAMS, batch_size=16, **options) / GIB

    base = gib(model)
    assert 15 < base < 20  # state 2.0 GiB + activations 14.3 GiB + one chunk of logits
    assert gib(model.replace(loss_chunk_size=0)) > base + 8  # the whole logits: B·T x 49152
    assert gib(model.replace(activation_checkpointing=True)) < base / 3
    assert gib(model, precision="fp32") > 1.8 * base - 2
    assert gib(model, compiled=False) > 1.7 * base - 2
    assert gib(model, optimizer="sgd") == base - 4 * LLAMA_135M_PARAMS / GIB


def test_a_run_prints_the_warning_at_start(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory_estimate, "available_memory_bytes", lambda: 1024)
    config = load_config(
        "configs/tiny.yaml",
        [
            "train.max_steps=1",
            "train.compile=false",
            "data.module=synthetic",
            "logging.progress=false",
            "logging.plot=false",
            "checkpoint.every=0",
            "checkpoint.save_best=false",
            "train.sample_tokens=1",
            f"train.run_dir={tmp_path}",
        ],
        {},
    )
    config = dataclasses.replace(config, model=config.model.replace(num_layers=1))
    train(config)
    assert "warning: a train step needs about 0 GiB at data.batch_size=" in capsys.readouterr().out
