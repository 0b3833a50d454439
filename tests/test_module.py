"""The nn.Module bridge: `as_module(params, cfg)` runs `llmfn.forward` over Parameters that
share storage with the tree, named by the tree's dotted paths."""

import pytest
import torch
from tensordict import TensorDict
from torch.func import functional_call

import llmfn
from llmfn.module import as_module
from tests.model_fixtures import DENSE, MOE

TIED = DENSE.replace(tie_embeddings=True)
CONFIGS = {"dense": DENSE, "moe_dropout": MOE, "tied": TIED}
RNG = torch.tensor(11)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(cfg: llmfn.ModelConfig, rows: int = 3, length: int = 8) -> dict:
    """Inputs, shifted targets with a few ignored (-100), and left padding in row 0."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (rows, length + 1), generator=gen)
    targets = tokens[:, 1:].clone()
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, :2] = 0
    targets[0, :2] = -100
    return {"inputs": tokens[:, :-1], "targets": targets, "attention_mask": mask}


def flat_keys(tree: TensorDict) -> list[str]:
    return list(tree.flatten_keys(".").keys())


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_equals_the_functional_forward(name):
    cfg = CONFIGS[name]
    params = llmfn.init_params(cfg, seed=0)
    batch = make_batch(cfg)
    options = {"attention_mask": batch["attention_mask"], "training": True, "rng": RNG}
    expected = llmfn.forward(params, batch["inputs"], cfg, **options)
    torch.testing.assert_close(as_module(params, cfg)(batch["inputs"], **options), expected)


@pytest.mark.parametrize("name", CONFIGS)
def test_parameters_are_the_tree_leaves_by_dotted_path(name):
    cfg = CONFIGS[name]
    params = llmfn.init_params(cfg, seed=0)
    module = as_module(params, cfg)
    keys = flat_keys(params)
    assert list(module.state_dict()) == keys
    assert [key for key, _ in module.named_parameters()] == keys
    for key, param in module.named_parameters():
        assert isinstance(param, torch.nn.Parameter) and param.requires_grad
        assert param.data_ptr() == params.get(tuple(key.split("."))).data_ptr(), key
    if cfg.tie_embeddings:  # one embedding Parameter, no head
        assert "lm_head.weight" not in keys and "embed.weight" in keys


def test_load_state_dict_writes_into_the_tree():
    params = llmfn.init_params(DENSE, seed=0)
    other = llmfn.init_params(DENSE, seed=1)
    as_module(params, DENSE).load_state_dict(other.flatten_keys(".").to_dict())
    assert (params == other).all()


def test_tree_gives_the_parameters_back_as_plain_tensors_with_the_same_storage():
    params = llmfn.init_params(DENSE, seed=0)
    module = as_module(params, DENSE)
    tree = module.tree()
    assert flat_keys(tree) == flat_keys(params)
    for key in params.keys(True, True):
        assert type(tree[key]) is torch.Tensor and not tree[key].requires_grad
        assert tree[key].data_ptr() == params[key].data_ptr()
    tokens = make_batch(DENSE)["inputs"]
    torch.testing.assert_close(llmfn.forward(tree, tokens, DENSE), module(tokens))


@pytest.mark.parametrize("name", CONFIGS)
def test_functional_call_runs_the_model_with_another_tree(name):
    cfg = CONFIGS[name]
    params, other = llmfn.init_params(cfg, seed=0), llmfn.init_params(cfg, seed=1)
    module = as_module(params, cfg)
    tokens = make_batch(cfg)["inputs"]
    logits = functional_call(module, other.flatten_keys(".").to_dict(), (tokens,))
    torch.testing.assert_close(logits, llmfn.forward(other, tokens, cfg))
    assert not torch.allclose(logits, llmfn.forward(params, tokens, cfg), atol=1e-3)
    torch.testing.assert_close(module(tokens), llmfn.forward(params, tokens, cfg))  # restored


@pytest.mark.parametrize("name", CONFIGS)
def test_backward_gives_the_grads_of_torch_func_grad(name):
    cfg = CONFIGS[name]
    params = llmfn.init_params(cfg, seed=0)
    batch = make_batch(cfg)
    module = as_module(params, cfg)
    value, metrics = module.loss(batch, training=True, rng=RNG)
    expected_value, expected_metrics = llmfn.loss(params, batch, cfg, training=True, rng=RNG)
    torch.testing.assert_close(value, expected_value)
    assert metrics.keys() == expected_metrics.keys()
    value.backward()
    grads = torch.func.grad(lambda p: llmfn.loss(p, batch, cfg, training=True, rng=RNG)[0])(params)
    for key, param in module.named_parameters():
        expected = grads.get(tuple(key.split(".")))
        assert expected.abs().sum() > 0, key  # every leaf is used (tied: embed twice)
        torch.testing.assert_close(param.grad, expected, atol=1e-6, rtol=1e-5, msg=key)


def test_tied_embedding_gets_the_gradient_of_both_uses():
    params = llmfn.init_params(TIED, seed=0)
    batch = make_batch(TIED)
    module = as_module(params, TIED)
    module.loss(batch)[0].backward()

    lookup_grad, head_grad = torch.func.grad(
        lambda lookup, head: untied_loss(params, batch, lookup, head), argnums=(0, 1)
    )(params["embed", "weight"], params["embed", "weight"])
    torch.testing.assert_close(module.embed.weight.grad, lookup_grad + head_grad)
    assert head_grad.abs().sum() > 0 and lookup_grad.abs().sum() > 0


def untied_loss(params: TensorDict, batch: dict, lookup, head) -> torch.Tensor:
    """The tied model's loss with its embedding lookup and LM head as separate tensors."""
    untied = params.clone()
    untied["embed", "weight"] = lookup
    untied["lm_head"] = TensorDict({"weight": head}, [])
    return llmfn.loss(untied, batch, DENSE)[0]


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.AdamW])
def test_a_torch_optim_step_updates_the_tree_in_place(optimizer):
    params = llmfn.init_params(DENSE, seed=0)
    before = params.clone()
    module = as_module(params, DENSE)
    opt = optimizer(module.parameters(), lr=0.1)
    module.loss(make_batch(DENSE))[0].backward()
    opt.step()
    if optimizer is torch.optim.SGD:
        for key, param in module.named_parameters():
            path = tuple(key.split("."))
            torch.testing.assert_close(params.get(path), before.get(path) - 0.1 * param.grad)
    assert all(not torch.equal(params[key], before[key]) for key in params.keys(True, True)), (
        "every leaf of the original tree moves"
    )


def test_torch_compile_gives_the_same_logits():
    params = llmfn.init_params(DENSE, seed=0)
    compiled = torch.compile(as_module(params, DENSE), backend="eager", fullgraph=True)
    tokens = make_batch(DENSE)["inputs"]
    torch.testing.assert_close(compiled(tokens), llmfn.forward(params, tokens, DENSE))


def test_hooks_see_the_logits_and_the_parameter_grads():
    params = llmfn.init_params(DENSE, seed=0)
    module = as_module(params, DENSE)
    seen = {}
    module.register_forward_hook(lambda mod, args, out: seen.update(logits=out))
    wqkv = module.get_parameter("layers.0.attn.wqkv")
    wqkv.register_hook(lambda grad: seen.update(grad=grad))
    tokens = make_batch(DENSE)["inputs"]
    module(tokens).sum().backward()
    torch.testing.assert_close(seen["logits"], llmfn.forward(params, tokens, DENSE))
    torch.testing.assert_close(seen["grad"], wqkv.grad)


def test_ddp_over_two_processes_averages_the_module_gradients(tmp_path):
    """DDP's own gradient averaging, through the bridge: both ranks end equal, and equal to one
    process on the global batch (the mean loss of two equal shards is the global mean)."""
    from safetensors.torch import load_file

    from tests.ddp_module_worker import module_sgd_steps
    from tests.step_fixtures import ROOT, global_batch, run_torchrun, small_config

    steps = 3
    run_torchrun(str(ROOT / "tests" / "ddp_module_worker.py"), str(tmp_path), str(steps))
    rank0 = load_file(tmp_path / "rank0.safetensors")
    rank1 = load_file(tmp_path / "rank1.safetensors")
    config = small_config()
    reference = as_module(llmfn.init_params(config.model, seed=0), config.model)
    batches = [
        {k: v[0] for k, v in global_batch(config, i, rows=2 * config.data.batch_size).items()}
        for i in range(steps)
    ]
    module_sgd_steps(reference, batches)
    start = llmfn.init_params(config.model, seed=0).flatten_keys(".")
    for name, param in reference.named_parameters():
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
        torch.testing.assert_close(rank0[name], param.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.equal(rank0[name], start[name]), f"{name} did not train"
