"""Every tensor the step, the eval step and the decoder make lives on the params' device.

A tensor made without `device=` lands on the CPU and breaks the first GPU run. These tests
run the code on fake CUDA tensors (`FakeTensorMode`: shapes, dtypes and devices without data
or a GPU), where mixing devices raises just as it does on a GPU. Two things a fake CUDA device
cannot do are left out: autograd's engine wants a CUDA context (so the step's gradient is
replaced by zeros after a real forward) and autocast is disabled without CUDA.
"""

import dataclasses
import os
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from llmfn.cached_decode import prefill, slot_mask
from llmfn.generate import decode_and_sample
from llmfn.model import init_cache
from llmfn.step import make_eval_step
from llmfn.tasks import get_task
from llmfn.token_sampling import init_sampler
from tests.step_fixtures import global_batch, small_config, state_and_step

CUDA = torch.device("cuda", 0)

MODELS = {
    "llama": {},
    "moe": {"use_moe": True, "num_experts": 4},
    "gpt2": {
        "position": "learned", "norm_type": "layernorm", "use_glu": False, "activation": "gelu",
        "attention_bias": True, "mlp_bias": True, "tie_embeddings": True,
    },
    "sliding-window+remat+dropout": {
        "sliding_window": 4, "activation_checkpointing": True, "dropout": 0.1,
    },
}  # fmt: skip


@pytest.fixture
def fake_cuda(monkeypatch):
    """Fake CUDA tensors: `.to("cuda")` moves a tensor there; autograd is replaced by zeros."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # TensorDict.to asks for it

    def forward_then_zero_grads(fn, has_aux):
        def grad_and_value(leaves, *args):
            value, aux = fn(leaves, *args)
            return [torch.zeros_like(leaf) for leaf in leaves], (value, aux)

        return grad_and_value

    monkeypatch.setattr(torch.func, "grad_and_value", forward_then_zero_grads)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "CUDA is not available")
        with FakeTensorMode():
            yield


def config_for(model: str, **train):
    config = small_config(**train)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **MODELS[model]))


def devices(*trees) -> set[torch.device]:
    found = set()
    for tree in trees:
        leaves = tree.values(True, True) if hasattr(tree, "batch_size") else tree.values()
        found |= {leaf.device for leaf in leaves}
    return found


def on_cuda(batch: dict) -> dict:
    return {key: value.to(CUDA) for key, value in batch.items()}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("precision,accum", [("fp32", 1), ("bf16", 2), ("fp16", 2)])
def test_train_and_eval_steps_stay_on_the_params_device(fake_cuda, model, precision, accum):
    config = config_for(model, precision=precision, grad_accum_steps=accum)
    state, step = state_and_step(config, donate=True)  # as the trainer runs on CUDA
    state = state.to(CUDA)
    batch = on_cuda(global_batch(config, 0, rows=2, accum=accum))
    new_state, metrics = step(state, batch)
    assert devices(new_state, metrics) == {CUDA}
    eval_step = make_eval_step(get_task("lm"), config, device_type="cuda")
    assert devices(eval_step(new_state["params"], {k: v[0] for k, v in batch.items()})) == {CUDA}


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_decoding_stays_on_the_params_device(fake_cuda, model):
    config = config_for(model)
    cfg = config.model
    state, _ = state_and_step(config)
    params = state["params"].to(CUDA)
    tokens = torch.randint(0, cfg.vocab_size, (2, 5)).to(CUDA)
    pad_lengths = torch.tensor([0, 2]).to(CUDA)
    sampler, flags = init_sampler(
        tokens, pad_lengths, cfg.vocab_size, temperature=0.8, top_k=5, top_p=0.9,
        repetition_penalty=1.1, eos_id=1, seed=0,
    )  # fmt: skip
    cache = init_cache(cfg, 2, 8, dtype=torch.float32, device=CUDA)
    key_valid = slot_mask(pad_lengths, 8)
    logits, cache = prefill(params, cache, tokens, pad_lengths, key_valid, cfg, last_only=True)
    slot = torch.tensor(5).to(CUDA)
    ids, cache, sampler = decode_and_sample(
        params, cache, tokens[:, -1:], slot, pad_lengths, key_valid, sampler, cfg, flags
    )
    assert devices(cache, sampler, {"logits": logits, "ids": ids}) == {CUDA}


# --- train.deterministic ------------------------------------------------------------------------
@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before, warn_only=True)


@pytest.mark.parametrize(
    ("option", "device", "on"),
    [
        (None, "cpu", True),  # bitwise reproducible CPU steps, at no measurable cost
        (None, "cuda", False),  # inductor's deterministic mode skips autotuning on a GPU
        (False, "cpu", False),
        (True, "cuda", True),
    ],
)
def test_deterministic_algorithms_follow_the_option_and_the_device(
    restore_determinism, option, device, on
):
    from llmfn.devices import set_determinism

    torch.use_deterministic_algorithms(not on)
    assert set_determinism(option, torch.device(device)) is on
    assert torch.are_deterministic_algorithms_enabled() is on
    assert torch.is_deterministic_algorithms_warn_only_enabled() or not on
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    assert cublas == (":4096:8" if on and device == "cuda" else None)


def test_a_cublas_workspace_the_user_set_is_kept(restore_determinism, monkeypatch):
    from llmfn.devices import set_determinism

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    set_determinism(True, CUDA)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_a_device_name_error_lists_every_kind_it_accepts():
    from llmfn.devices import resolve_device

    with pytest.raises(ValueError) as err:
        resolve_device("tpu", option="--device")
    assert str(err.value) == (
        "--device 'tpu' is not a device name: expected auto, cpu, cuda, cuda:N or mps"
    )
    if not torch.backends.mps.is_available():  # a name torch knows, on a machine without it
        with pytest.raises(ValueError, match="'mps' is not available on this machine"):
            resolve_device("mps", option="train.device")
