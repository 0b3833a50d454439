"""The pure forward under torch.func and torch.compile: grad, per-example grads (vmap of grad),
ensembles (vmap over stacked param trees), compiled forward, activation checkpointing."""

import re
import runpy
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from llmfn.layers.positions import rope_angles
from llmfn.model import forward, init_params, loss
from llmfn.model_config import ModelConfig
from tests.model_fixtures import DENSE, MOE

CONFIGS = {"dense": DENSE, "moe_dropout": MOE}
GRAD_TOL = {"atol": 1e-6, "rtol": 1e-5}
EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "research_grad.py"


pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(cfg: ModelConfig, rows: int = 3, length: int = 8, seed: int = 0) -> dict:
    """Inputs, shifted targets with a few ignored (-100), and left padding in row 0."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (rows, length + 1), generator=gen)
    targets = tokens[:, 1:].clone()
    targets[1, :3] = -100
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, :2] = 0
    targets[0, :2] = -100
    return {"inputs": tokens[:, :-1], "targets": targets, "attention_mask": mask}


def loss_value(params: TensorDict, batch: dict, cfg: ModelConfig) -> torch.Tensor:
    """Scalar training loss (dropout keyed by a fixed rng, so it is deterministic)."""
    return loss(params, batch, cfg, training=True, rng=torch.tensor(11))[0]


def autograd_grads(
    params: TensorDict, batch: dict, cfg: ModelConfig
) -> tuple[torch.Tensor, TensorDict]:
    leaves = params.clone().apply(lambda t: t.requires_grad_())
    value = loss_value(leaves, batch, cfg)
    grads = torch.autograd.grad(value, list(leaves.values(True, True)))
    return value.detach(), TensorDict(dict(zip(leaves.keys(True, True), grads, strict=True)), [])


def assert_trees_close(actual: TensorDict, expected: TensorDict, **tol) -> None:
    assert sorted(actual.keys(True, True)) == sorted(expected.keys(True, True))
    for key in expected.keys(True, True):
        torch.testing.assert_close(
            actual[key], expected[key], **(tol or GRAD_TOL), msg=lambda m, k=key: f"{k}: {m}"
        )


# --- torch.func.grad ------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_func_grad_equals_autograd_grad(name):
    cfg = CONFIGS[name]
    params, batch = init_params(cfg, seed=0), make_batch(cfg)
    grads, (value, metrics) = torch.func.grad_and_value(
        lambda p: loss(p, batch, cfg, training=True, rng=torch.tensor(11)), has_aux=True
    )(params)
    expected_value, expected = autograd_grads(params, batch, cfg)
    torch.testing.assert_close(value, expected_value)
    assert_trees_close(grads, expected)
    assert all(g.abs().sum() > 0 for key, g in grads.items(True, True) if "bias" not in key)
    assert metrics["tokens"].item() == 3 * 8 - 5
    assert ("moe_aux_loss" in metrics) == cfg.use_moe


@pytest.mark.parametrize("name", CONFIGS)
def test_per_example_grads_equal_a_loop(name):
    cfg = CONFIGS[name]
    params, batch = init_params(cfg, seed=1), make_batch(cfg, rows=3)

    def example_loss(params, inputs, targets, mask):
        one = {"inputs": inputs[None], "targets": targets[None], "attention_mask": mask[None]}
        return loss_value(params, one, cfg)

    per_example = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0, 0))(
        params, batch["inputs"], batch["targets"], batch["attention_mask"]
    )
    assert per_example.batch_size == torch.Size([3])
    for row in range(3):
        one = {key: value[row : row + 1] for key, value in batch.items()}
        _, expected = autograd_grads(params, one, cfg)
        assert_trees_close(per_example[row], expected)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_example.values(True, True)]).norm(
        dim=0
    )
    assert (norms > 0).all() and len(set(norms.tolist())) == 3


@pytest.mark.parametrize("name", CONFIGS)
def test_vmap_over_an_ensemble_of_param_trees_equals_each_member(name):
    cfg = CONFIGS[name]
    members = [init_params(cfg, seed=seed) for seed in range(3)]
    ensemble = torch.stack(members)
    assert ensemble.batch_size == torch.Size([3])
    batch = make_batch(cfg)
    logits = torch.func.vmap(lambda p: forward(p, batch["inputs"], cfg))(ensemble)
    grads = torch.func.vmap(torch.func.grad(lambda p: loss_value(p, batch, cfg)))(ensemble)
    for index, member in enumerate(members):
        torch.testing.assert_close(
            logits[index], forward(member, batch["inputs"], cfg), rtol=1e-5, atol=1e-6
        )
        assert_trees_close(grads[index], autograd_grads(member, batch, cfg)[1])
    assert not torch.allclose(logits[0], logits[1])


# --- torch.compile --------------------------------------------------------------------------
COMPILED_FORWARD = torch.compile(forward)


def test_compiled_forward_equals_eager_and_reads_new_param_values():
    """A compiled function must read the values of whatever tree it is given: a new tree, a
    tree whose leaves were changed in place, a tree with a leaf swapped for a new tensor."""
    cfg, tokens = DENSE, make_batch(DENSE)["inputs"]
    first, second = init_params(cfg, seed=0), init_params(cfg, seed=1)
    graphs = counters["stats"]["unique_graphs"]
    torch.testing.assert_close(
        COMPILED_FORWARD(first, tokens, cfg), forward(first, tokens, cfg), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        COMPILED_FORWARD(second, tokens, cfg), forward(second, tokens, cfg), rtol=1e-5, atol=1e-6
    )
    before = forward(first, tokens, cfg)
    first["lm_head", "weight"].mul_(2.0)
    first["layers", "1", "attn", "wqkv"].add_(0.05)
    torch.testing.assert_close(
        COMPILED_FORWARD(first, tokens, cfg), forward(first, tokens, cfg), rtol=1e-5, atol=1e-6
    )
    first["embed", "weight"] = torch.randn_like(first["embed", "weight"])
    after = COMPILED_FORWARD(first, tokens, cfg)
    torch.testing.assert_close(after, forward(first, tokens, cfg), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after, before, atol=1e-3)
    assert counters["stats"]["unique_graphs"] - graphs <= 1  # new values, no recompile


def test_compiled_forward_under_vmap_of_an_ensemble():
    cfg, tokens = DENSE, make_batch(DENSE)["inputs"]
    ensemble = torch.stack([init_params(cfg, seed=seed) for seed in (4, 5)])
    compiled = torch.func.vmap(lambda p: COMPILED_FORWARD(p, tokens, cfg))(ensemble)
    eager = torch.func.vmap(lambda p: forward(p, tokens, cfg))(ensemble)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("backend", "options"),
    [
        ("aot_eager", {}),
        ("aot_eager", {"activation_checkpointing": True, "loss_chunk_size": 8}),
        pytest.param("inductor", {}, marks=pytest.mark.slow),
    ],
)
def test_compiled_per_example_grads_equal_eager(backend, options):
    """torch.compile(vmap(grad(loss))) of the default (pre-norm) model: dynamo cannot vmap an
    autograd.Function ("You tried to vmap over ApplyTemplate", pytorch#129845), so where it
    traces a vmap the normed projections take the plain linear (`own_backward_ok`). The error
    was dynamo's: aot_eager shows it without inductor's ~90 s of codegen. New param values
    reuse the one graph. Likewise activation recompute and the chunked loss."""
    cfg = DENSE.replace(**options)
    batch = make_batch(cfg)
    rows = (batch["inputs"], batch["targets"], batch["attention_mask"])

    def example_loss(params, inputs, targets, mask):
        one = {"inputs": inputs[None], "targets": targets[None], "attention_mask": mask[None]}
        return loss(params, one, cfg)[0]

    per_example = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0, 0))
    compiled = torch.compile(per_example, backend=backend, fullgraph=True)
    first, second = init_params(cfg, seed=5), init_params(cfg, seed=6)
    assert_trees_close(compiled(first, *rows), per_example(first, *rows))
    # the first call may recompile vmap's wrapper (compiled for another backend before); not so
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert_trees_close(compiled(second, *rows), per_example(second, *rows))


def test_compiled_cpu_grad_computes_rope_cos_and_sin_once():
    """Every layer's RoPE kernels read one cos/sin table instead of recomputing cos and sin per
    element of q and k (llmfn.layers.positions.cos_sin), forward and backward."""
    cfg = DENSE
    tokens = make_batch(cfg)["inputs"]
    params = init_params(cfg, seed=0)
    grad = torch.compile(
        torch.func.grad(lambda p: forward(p, tokens, cfg).logsumexp(-1).mean()), fullgraph=True
    )
    (compiled,), (code,) = run_and_get_code(lambda: (grad(params),))
    assert code.count("torch.ops.llmfn.cos_sin.default(") == 1
    assert not re.search(r"\bcos\(|\.cos\(\)|\bsin\(|\.sin\(\)", code)
    eager = torch.func.grad(lambda p: forward(p, tokens, cfg).logsumexp(-1).mean())(params)
    assert_trees_close(compiled, eager)


def test_compiled_rope_angles_under_vmap_of_positions():
    positions = torch.stack([torch.arange(8), torch.arange(8) + 3])[:, None].expand(2, 3, 8)
    angles = torch.func.vmap(lambda pos: rope_angles(pos, DENSE))
    compiled = torch.compile(angles, fullgraph=True)(positions)
    for got, expected in zip(compiled, angles(positions), strict=True):
        torch.testing.assert_close(got, expected)


# --- activation checkpointing ---------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_activation_checkpointing_gives_the_same_loss_and_grads(name):
    cfg = CONFIGS[name]
    checkpointed = cfg.replace(activation_checkpointing=True)
    params, batch = init_params(cfg, seed=2), make_batch(cfg)
    value, expected = autograd_grads(params, batch, cfg)

    checkpointed_value, checkpointed_grads = autograd_grads(params, batch, checkpointed)
    torch.testing.assert_close(checkpointed_value, value)
    assert_trees_close(checkpointed_grads, expected)

    func_grads = torch.func.grad(lambda p: loss_value(p, batch, checkpointed))(params)
    assert_trees_close(func_grads, expected)

    def example_loss(params, inputs, targets, mask, cfg):
        return loss_value(
            params,
            {"inputs": inputs[None], "targets": targets[None], "attention_mask": mask[None]},
            cfg,
        )

    rows = (batch["inputs"], batch["targets"], batch["attention_mask"])
    per_example = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0, 0, None))
    assert_trees_close(per_example(params, *rows, checkpointed), per_example(params, *rows, cfg))


@pytest.mark.slow
def test_compiled_grad_and_value_with_activation_checkpointing():
    """The train step's shape: one fullgraph compile of grad_and_value over the loss."""
    cfg = DENSE.replace(activation_checkpointing=True, dropout=0.1)
    params, batch = init_params(cfg, seed=3), make_batch(cfg)
    step = torch.compile(
        lambda p, b: torch.func.grad_and_value(lambda q: loss_value(q, b, cfg))(p), fullgraph=True
    )
    grads, value = step(params, batch)
    expected_value, expected = autograd_grads(
        params, batch, cfg.replace(activation_checkpointing=False)
    )
    torch.testing.assert_close(value, expected_value)
    assert_trees_close(grads, expected, atol=1e-5, rtol=1e-4)


def test_compiled_forward_with_activation_checkpointing_and_no_gradients_wanted():
    """Grad mode on but no param requiring grad (research code calling a compiled forward):
    dynamo passed remat's autograd.Function its context as the first argument and failed
    ("Unsupported autograd.Function context method"); now remat runs the block plainly."""
    cfg = DENSE.replace(activation_checkpointing=True)
    params, tokens = init_params(cfg, seed=4), make_batch(cfg)["inputs"]
    compiled = torch.compile(lambda p, t: forward(p, t, cfg), fullgraph=True)
    torch.testing.assert_close(compiled(params, tokens), forward(params, tokens, cfg))


# --- the README example ---------------------------------------------------------------------
def test_research_example_runs_and_its_norms_match_a_loop(capsys):
    namespace = runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert "per-example gradient norms" in capsys.readouterr().out
    cfg, params, tokens, norms = (namespace[name] for name in ("cfg", "params", "tokens", "norms"))
    assert namespace["logits"].shape == (4, 16, cfg.vocab_size)
    for row in range(4):
        batch = {"inputs": tokens[row : row + 1, :-1], "targets": tokens[row : row + 1, 1:]}
        grads = torch.func.grad(lambda p, b=batch: loss(p, b, cfg)[0])(params)
        expected = torch.stack([g.norm() for g in grads.values(True, True)]).norm()
        torch.testing.assert_close(norms[row], expected, rtol=1e-5, atol=1e-6)
