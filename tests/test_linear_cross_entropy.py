"""The chunked head + cross-entropy (`model.loss_chunk_size`): the unfused loss's values and
gradients under every transform the step uses, no [N, V] tensor kept for the backward, and
a clear error where it cannot give the right answer (second order, forward mode)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import llmfn
from llmfn.checkpoint.config_checks import RUNTIME_ONLY_MODEL_FIELDS
from llmfn.layers.linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy
from llmfn.model_config import ModelConfig
from tests.step_fixtures import global_batch, small_config, state_and_step

D, V = 12, 40


def plain(h, weight, targets):
    logits = F.linear(h, weight).flatten(0, -2).float()
    return F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def case(rows: int, seed: int = 0, ignored: int = 3):
    """h [2, rows, D], weight [V, D], targets [2, rows] with the first `ignored` of row 0
    ignored."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2, rows, D, generator=gen)
    weight = 0.3 * torch.randn(V, D, generator=gen)
    targets = torch.randint(0, V, (2, rows), generator=gen)
    targets[0, :ignored] = IGNORE_INDEX
    return h, weight, targets


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 19),
    chunk=st.integers(1, 45),
    ignored=st.integers(0, 19),
    seed=st.integers(0, 2**16),
)
def test_values_and_gradients_equal_the_unfused_loss(rows, chunk, ignored, seed):
    h, weight, targets = case(rows, seed, min(ignored, rows))
    expected_grads, expected = torch.func.grad_and_value(plain, argnums=(0, 1))(h, weight, targets)
    grads, value = torch.func.grad_and_value(
        lambda h, w: linear_cross_entropy(h, w, targets, chunk), argnums=(0, 1)
    )(h, weight)
    torch.testing.assert_close(value, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_autograd_gradients_equal_the_unfused_loss():
    """(Compiled: `test_compiled_train_steps_equal_the_unchunked_steps`.)"""
    h, weight, targets = case(rows=11)
    expected = torch.func.grad(plain, argnums=(0, 1))(h, weight, targets)
    leaves = [h.clone().requires_grad_(), weight.clone().requires_grad_()]
    (2 * linear_cross_entropy(*leaves, targets, 4)).backward()
    for leaf, want in zip(leaves, expected, strict=True):
        torch.testing.assert_close(leaf.grad / 2, want, rtol=1e-5, atol=1e-6)


def test_per_example_gradients_under_vmap_equal_the_unfused_loss():
    h, weight, targets = case(rows=9)

    def per_example(loss):
        return torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(0, None, 0))

    expected = per_example(plain)(h, weight, targets)
    grads = per_example(lambda h, w, t: linear_cross_entropy(h, w, t, 4))(h, weight, targets)
    for got, want in zip(grads, expected, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_the_unfused_loss_within_bf16_rounding():
    h, weight, targets = case(rows=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.func.grad_and_value(plain, argnums=(0, 1))(h, weight, targets)
        fused = lambda h, w: linear_cross_entropy(h, w, targets, 5)  # noqa: E731
        got = torch.func.grad_and_value(fused, argnums=(0, 1))(h, weight)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-2, atol=0)
    for g, want in zip(got[0], expected[0], strict=True):
        assert g.dtype == want.dtype == torch.float32
        torch.testing.assert_close(g, want, rtol=0, atol=2e-2 * want.abs().max().item())


def test_the_backward_keeps_no_logits():
    rows = 64
    h, weight, targets = case(rows)
    leaves = [h.clone().requires_grad_(), weight.clone().requires_grad_()]
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fused = linear_cross_entropy(*leaves, targets, 8)
    assert saved and max(saved) < 2 * rows * V  # h's and the weight's gradients, no [N, V]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        plain(*leaves, targets)
    assert max(saved) >= 2 * rows * V  # the unfused loss keeps the logits
    fused.backward()


def test_without_gradients_it_is_the_unfused_loss():
    h, weight, targets = case(rows=7)
    with torch.no_grad():
        torch.testing.assert_close(
            linear_cross_entropy(h, weight, targets, 2), plain(h, weight, targets)
        )


@pytest.mark.parametrize(
    "transform",
    [
        lambda f: torch.func.jacrev(torch.func.grad(f)),
        torch.func.hessian,
        lambda f: lambda x: torch.func.jvp(f, (x,), (torch.ones_like(x),)),
    ],
    ids=["jacrev(grad)", "hessian", "jvp"],
)
def test_second_order_and_forward_mode_raise_instead_of_giving_zeros(transform):
    h, weight, targets = case(rows=5)
    with pytest.raises(NotImplementedError, match="loss_chunk_size=0"):
        transform(lambda h: linear_cross_entropy(h, weight, targets, 2))(h)


MODELS = {
    "llama": {},
    "tied": {"tie_embeddings": True},
    "post-norm layernorm": {"norm_position": "post", "norm_type": "layernorm"},
    "moe": {"use_moe": True, "num_experts": 4},
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_loss_and_gradients_equal_the_unchunked_loss(name):
    cfg = ModelConfig(
        vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, **MODELS[name]
    )
    params = llmfn.init_params(cfg, seed=0)
    tokens = torch.randint(0, 97, (3, 21), generator=torch.Generator().manual_seed(0))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:].clone()}
    batch["targets"][0, :7] = IGNORE_INDEX

    def run(cfg):
        return torch.func.grad_and_value(lambda p: llmfn.loss(p, batch, cfg), has_aux=True)(params)

    grads, (value, metrics) = run(cfg.replace(loss_chunk_size=16))
    expected_grads, (expected, expected_metrics) = run(cfg)
    torch.testing.assert_close(value, expected)
    assert int(metrics["tokens"]) == int(expected_metrics["tokens"]) == 53
    for key, leaf in grads.items(include_nested=True, leaves_only=True):
        torch.testing.assert_close(leaf, expected_grads[key], rtol=1e-5, atol=1e-6)


def test_compiled_train_steps_equal_the_unchunked_steps():
    config = small_config()
    chunked = dataclasses.replace(config, model=config.model.replace(loss_chunk_size=12))
    runs = []
    for cfg, compile in [(config, False), (chunked, True)]:
        state, step = state_and_step(cfg, compile=compile)
        losses = []
        for i in range(4):
            state, metrics = step(state, global_batch(cfg, i, rows=2))
            losses.append(float(metrics["loss"]))
        runs.append((state, losses))
    (state, losses), (chunked_state, chunked_losses) = runs
    torch.testing.assert_close(
        torch.tensor(chunked_losses), torch.tensor(losses), rtol=1e-5, atol=1e-5
    )
    for key, leaf in state["params"].items(include_nested=True, leaves_only=True):
        torch.testing.assert_close(chunked_state["params"][key], leaf, rtol=1e-4, atol=1e-5)


def test_the_chunk_size_is_validated_and_may_change_on_resume():
    with pytest.raises(ValueError, match="model.loss_chunk_size=-1 is invalid"):
        ModelConfig(loss_chunk_size=-1)
    assert "loss_chunk_size" in RUNTIME_ONLY_MODEL_FIELDS


def test_the_module_way_compiled_with_backward_equals_the_unchunked_loss():
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    tokens = torch.randint(0, 97, (3, 21), generator=torch.Generator().manual_seed(1))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    grads = []
    for variant in (cfg, cfg.replace(loss_chunk_size=16)):
        module = llmfn.as_module(llmfn.init_params(variant, seed=0), variant)
        torch.compile(lambda batch, m=module: m.loss(batch, training=True)[0])(batch).backward()
        grads.append({name: p.grad for name, p in module.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)
