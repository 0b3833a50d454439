"""llmfn.optim against torch.optim and hand-written references; compile; clipping; masks."""

import math
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torch._dynamo.testing import CompileCounterWithBackend

import llmfn
from llmfn.config import OptimConfig
from llmfn.optim import (
    adamw,
    build_optimizer,
    clip_by_global_norm,
    clip_leaves_by_global_norm,
    default_decay_mask,
    global_norm,
    lion,
    optimizer_from_leaves,
    sgd,
    state_tree,
)
from llmfn.tree import leaf_paths

STEPS = 5
LRS = [1e-2, 2e-2, 3e-2, 2e-2, 1e-2]  # a changing lr, as a schedule would give
TOL = {"atol": 1e-6, "rtol": 1e-5}


def small_tree(seed: int = 0) -> TensorDict:
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return TensorDict(
        {
            "embed": {"weight": rand(7, 4)},
            "layers": {
                "0": {
                    "attn_norm": {"weight": 1 + rand(4)},
                    "attn": {"wqkv": rand(12, 4), "bqkv": rand(12)},
                }
            },
            "final_norm": {"weight": 1 + rand(4)},
            "lm_head": {"weight": rand(7, 4)},
        },
        batch_size=[],
    )


def grad_sequence(params: TensorDict, seed: int = 1) -> list[TensorDict]:
    gen = torch.Generator().manual_seed(seed)
    return [params.apply(lambda p: torch.randn(p.shape, generator=gen)) for _ in range(STEPS)]


def run_functional(optimizer, params, grads_seq, *, update=None):
    update = update or optimizer.update
    state = optimizer.init(params)
    history = []
    for i, grads in enumerate(grads_seq):
        params, state = update(
            params, grads, state, lr=torch.tensor(LRS[i]), step=torch.tensor(i + 1)
        )
        history.append(params)
    return history, state


def run_torch(make_optim, params, grads_seq, mask, weight_decay):
    """torch.optim over leaf copies: one param group with weight decay, one without."""
    leaves = {path: torch.nn.Parameter(params.get(path).clone()) for path in mask}
    groups = [
        {"params": [leaves[p] for p in mask if mask[p]], "weight_decay": weight_decay},
        {"params": [leaves[p] for p in mask if not mask[p]], "weight_decay": 0.0},
    ]
    optim = make_optim(groups)
    history = []
    for i, grads in enumerate(grads_seq):
        for group in optim.param_groups:
            group["lr"] = LRS[i]
        for path, leaf in leaves.items():
            leaf.grad = grads.get(path).clone()
        optim.step()
        history.append({path: leaf.detach().clone() for path, leaf in leaves.items()})
    return history


def assert_trees_close(tree, reference: dict, **tol):
    assert set(leaf_paths(tree)) == set(reference)
    for path, expected in reference.items():
        torch.testing.assert_close(tree.get(path), expected, **(tol or TOL), msg=f"leaf {path}")


# --- parity with torch.optim ---------------------------------------------------------------------
def test_adamw_matches_torch_adamw_with_decay_mask():
    params, weight_decay = small_tree(), 0.1
    grads_seq = grad_sequence(params)
    mask = default_decay_mask(params)
    ours, state = run_functional(
        adamw(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay), params, grads_seq
    )
    make = partial(torch.optim.AdamW, lr=1.0, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    reference = run_torch(make, params, grads_seq, mask, weight_decay)
    for tree, ref in zip(ours, reference, strict=True):
        assert_trees_close(tree, ref)
    assert set(state.keys()) == {"exp_avg", "exp_avg_sq"}
    assert leaf_paths(state["exp_avg"]) == leaf_paths(params)


def test_adamw_decay_mask_matters():
    """The same run with everything decayed differs exactly on the leaves the mask spared."""
    params = small_tree()
    grads_seq = grad_sequence(params)
    masked, _ = run_functional(adamw(weight_decay=0.5), params, grads_seq)
    everything, _ = run_functional(
        adamw(weight_decay=0.5, decay_mask=lambda path, leaf: True), params, grads_seq
    )
    mask = default_decay_mask(params)
    for path, decays in mask.items():
        same = torch.allclose(masked[-1].get(path), everything[-1].get(path))
        assert same == decays, path


@pytest.mark.parametrize(
    ("momentum", "nesterov", "weight_decay"),
    [
        (0.9, False, 0.0),
        (0.9, True, 0.0),
        (0.9, False, 0.05),
        (0.8, True, 0.05),
        (0.0, False, 0.05),
    ],
)
def test_sgd_matches_torch_sgd(momentum, nesterov, weight_decay):
    params = small_tree()
    grads_seq = grad_sequence(params)
    mask = default_decay_mask(params)
    optimizer = sgd(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    ours, state = run_functional(optimizer, params, grads_seq)
    make = partial(torch.optim.SGD, lr=1.0, momentum=momentum, nesterov=nesterov)
    reference = run_torch(make, params, grads_seq, mask, weight_decay)
    for tree, ref in zip(ours, reference, strict=True):
        assert_trees_close(tree, ref)
    assert set(state.keys()) == ({"momentum"} if momentum else set())


def lion_reference(params: dict, grads_seq, lrs, beta1, beta2, weight_decay, mask):
    """Lion as written in Chen et al. 2023, Algorithm 2, one tensor at a time."""
    params = {k: v.clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    history = []
    for grads, lr in zip(grads_seq, lrs, strict=True):
        for k in params:
            g = grads.get(k)
            c = beta1 * m[k] + (1 - beta1) * g
            wd = weight_decay if mask[k] else 0.0
            params[k] = params[k] - lr * (torch.sign(c) + wd * params[k])
            m[k] = beta2 * m[k] + (1 - beta2) * g
        history.append({k: v.clone() for k, v in params.items()})
    return history


def test_lion_matches_paper_update():
    params = small_tree()
    grads_seq = grad_sequence(params)
    mask = default_decay_mask(params)
    ours, state = run_functional(lion(beta1=0.9, beta2=0.99, weight_decay=0.3), params, grads_seq)
    leaves = {path: params.get(path) for path in mask}
    reference = lion_reference(leaves, grads_seq, LRS, 0.9, 0.99, 0.3, mask)
    for tree, ref in zip(ours, reference, strict=True):
        assert_trees_close(tree, ref)
    # every step moves each undecayed coordinate by exactly lr (sign update)
    first_step = ours[0].get(("final_norm", "weight")) - params.get(("final_norm", "weight"))
    torch.testing.assert_close(first_step.abs(), torch.full_like(first_step, LRS[0]))
    assert set(state.keys()) == {"exp_avg"}


# --- purity, compile, recompiles -----------------------------------------------------------------
OPTIMIZERS = {
    "adamw": lambda: adamw(weight_decay=0.1),
    "sgd": lambda: sgd(momentum=0.9, nesterov=True, weight_decay=0.01),
    "lion": lambda: lion(weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_update_does_not_mutate_inputs(name):
    optimizer = OPTIMIZERS[name]()
    params, grads = small_tree(), grad_sequence(small_tree())[0]
    lr, step = torch.tensor(0.1), torch.tensor(1)
    _, state = optimizer.update(params, grads, optimizer.init(params), lr=lr, step=step)
    before = [t.clone() for t in (params, grads, state)]
    new_params, new_state = optimizer.update(
        params, grads, state, lr=torch.tensor(0.1), step=torch.tensor(2)
    )
    for tree, copy in zip((params, grads, state), before, strict=True):
        assert (tree == copy).all()
    assert not torch.equal(new_params["lm_head", "weight"], params["lm_head", "weight"])
    assert new_params["lm_head", "weight"].data_ptr() != params["lm_head", "weight"].data_ptr()


COMPILE_CASES = [
    ("adamw", "eager"),  # dynamo tracing, fullgraph and guards: the fast check
    pytest.param("adamw", "inductor", marks=pytest.mark.slow),  # + inductor numerics (~20 s)
    pytest.param("sgd", "eager", marks=pytest.mark.slow),
    pytest.param("lion", "eager", marks=pytest.mark.slow),
    pytest.param("sgd", "inductor", marks=pytest.mark.slow),
    pytest.param("lion", "inductor", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "backend"), COMPILE_CASES)
def test_compiled_update_equals_eager_and_never_recompiles(name, backend):
    """fullgraph compile; 5 steps with new lr and step values reuse the first graph."""
    optimizer = OPTIMIZERS[name]()
    params = small_tree()
    grads_seq = grad_sequence(params)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(optimizer.update, backend=counter, fullgraph=True)
    eager_history, eager_state = run_functional(optimizer, params, grads_seq)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled_history, compiled_state = run_functional(
            optimizer, params, grads_seq, update=compiled
        )
    assert counter.frame_count == 1
    for eager, comp in zip(eager_history, compiled_history, strict=True):
        assert_trees_close(comp, {p: eager.get(p) for p in leaf_paths(eager)})
    assert leaf_paths(compiled_state) == leaf_paths(eager_state)
    assert compiled_state.apply(torch.isfinite).all()


@pytest.mark.slow
def test_clip_and_update_compile_together():
    """The pieces a train step chains compile as one graph (fullgraph) and agree with eager."""
    optimizer = adamw()
    params, grads = small_tree(), grad_sequence(small_tree())[0]

    def step(params, grads, state, lr, step):
        clipped, norm = clip_by_global_norm(grads, 1.0)
        new_params, new_state = optimizer.update(params, clipped, state, lr=lr, step=step)
        return new_params, new_state, norm

    state = optimizer.init(params)
    args = (params, grads, state, torch.tensor(0.01), torch.tensor(1))
    torch._dynamo.reset()
    compiled_out = torch.compile(step, fullgraph=True)(*args)
    eager_out = step(*args)
    torch.testing.assert_close(compiled_out[2], eager_out[2])
    assert_trees_close(compiled_out[0], {p: eager_out[0].get(p) for p in leaf_paths(params)})


# --- decay masks ----------------------------------------------------------------------------------
def test_default_decay_mask_on_a_model():
    cfg = llmfn.ModelConfig(
        vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, position="learned",
        attention_bias=True, mlp_bias=True, norm_type="layernorm", max_seq_len=8,
    )  # fmt: skip
    params = llmfn.init_params(cfg)
    mask = default_decay_mask(params)
    expected_true = {
        ("layers", "0", "attn", "wqkv"),
        ("layers", "0", "attn", "wo"),
        ("layers", "0", "mlp", "w13"),
        ("layers", "0", "mlp", "w2"),
        ("lm_head", "weight"),
    }
    assert {path for path, decays in mask.items() if decays} == expected_true
    for must_not in [
        ("embed", "weight"),
        ("pos", "weight"),
        ("layers", "0", "attn", "bqkv"),
        ("layers", "0", "mlp", "b13"),
        ("layers", "0", "attn_norm", "bias"),
    ]:
        assert mask[must_not] is False, must_not
    with_embeddings = default_decay_mask(params, decay_embeddings=True)
    assert with_embeddings[("embed", "weight")] and with_embeddings[("pos", "weight")]
    assert not with_embeddings[("layers", "0", "attn_norm", "weight")]


def test_default_decay_mask_moe_and_stacked_trees():
    cfg = llmfn.ModelConfig(
        vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, use_moe=True, num_experts=4
    )
    params = llmfn.init_params(cfg)
    mask = default_decay_mask(params)
    assert mask[("layers", "0", "moe", "experts", "w13")] and mask[("layers", "0", "moe", "router")]
    stacked = torch.stack([params, params])  # an ensemble: batch dims do not make norms "matrices"
    assert default_decay_mask(stacked) == mask


def test_default_decay_mask_uses_names_and_element_dims():
    tree = TensorDict(
        {
            "block": {"scale": torch.ones(4), "proj": torch.ones(3, 4)},
            "qk_norm": {"weight": torch.ones(2, 4)},
        },
        batch_size=[],
    )
    expected = {("block", "scale"): False, ("block", "proj"): True, ("qk_norm", "weight"): False}
    assert default_decay_mask(tree) == expected
    assert default_decay_mask(torch.stack([tree, tree, tree])) == expected


def test_user_decay_masks_dict_and_callable():
    params = small_tree()
    grads_seq = grad_sequence(params)
    only_head = {path: path == ("lm_head", "weight") for path in leaf_paths(params)}
    dotted = {".".join(path): value for path, value in only_head.items()}
    by_dict, _ = run_functional(adamw(weight_decay=0.5, decay_mask=only_head), params, grads_seq)
    by_dotted, _ = run_functional(adamw(weight_decay=0.5, decay_mask=dotted), params, grads_seq)
    by_callable, _ = run_functional(
        adamw(weight_decay=0.5, decay_mask=lambda path, leaf: path[0] == "lm_head"),
        params,
        grads_seq,
    )
    assert (by_dict[-1] == by_dotted[-1]).all() and (by_dict[-1] == by_callable[-1]).all()
    nothing, _ = run_functional(adamw(weight_decay=0.0), params, grads_seq)
    assert not torch.allclose(by_dict[-1]["lm_head", "weight"], nothing[-1]["lm_head", "weight"])
    torch.testing.assert_close(by_dict[-1]["embed", "weight"], nothing[-1]["embed", "weight"])


def test_incomplete_decay_mask_names_the_missing_leaf():
    params = small_tree()
    optimizer = adamw(decay_mask={("lm_head", "weight"): True})
    with pytest.raises(KeyError, match="decay_mask has no entry.*embed/weight"):
        optimizer.update(
            params, params, optimizer.init(params), lr=torch.tensor(0.1), step=torch.tensor(1)
        )


def test_grads_missing_a_leaf_is_named():
    params = small_tree()
    optimizer = adamw()
    grads = params.exclude(("lm_head", "weight"))
    with pytest.raises(KeyError, match="grads has no leaf at lm_head/weight"):
        optimizer.update(
            params, grads, optimizer.init(params), lr=torch.tensor(0.1), step=torch.tensor(1)
        )


def test_opt_state_missing_a_moment_says_how_to_build_it():
    params = small_tree()
    optimizer = adamw()
    opt_state = optimizer.init(params).exclude("exp_avg_sq")
    with pytest.raises(KeyError, match="no 'exp_avg_sq' tree.*build it with init"):
        optimizer.update(params, params, opt_state, lr=torch.tensor(0.1), step=torch.tensor(1))


def test_optimizer_from_leaves_gives_the_tree_update():
    """A user's optimizer written over leaves (sign descent with a running mean) works on
    trees, with its moment mirroring params, and leaves its inputs alone."""

    def init(params):
        return state_tree(params, mean=params.apply(torch.zeros_like))

    def update_leaves(paths, p, g, moments, *, lr, step=None, batch_dims=0):
        mean = torch._foreach_lerp(moments["mean"], g, 0.5)
        return torch._foreach_sub(p, torch._foreach_mul(torch._foreach_sign(mean), lr)), {
            "mean": mean
        }

    optimizer = optimizer_from_leaves(init, update_leaves)
    params, grads = small_tree(0), small_tree(1)
    before = params.clone()
    new_params, new_state = optimizer.update(
        params, grads, optimizer.init(params), lr=torch.tensor(0.1), step=torch.tensor(1)
    )
    for path in leaf_paths(params):
        torch.testing.assert_close(new_state["mean"][path], grads[path] / 2)
        torch.testing.assert_close(new_params[path], params[path] - 0.1 * grads[path].sign())
        torch.testing.assert_close(params[path], before[path], rtol=0, atol=0)


# --- build_optimizer --------------------------------------------------------------------------------
BUILD_CASES = {
    "adamw": (
        {"exp_avg", "exp_avg_sq"},
        lambda mask: adamw(beta1=0.8, beta2=0.9, eps=1e-7, weight_decay=0.2, decay_mask=mask),
    ),
    "sgd": (
        {"momentum"},
        lambda mask: sgd(momentum=0.5, nesterov=True, weight_decay=0.2, decay_mask=mask),
    ),
    "lion": (
        {"exp_avg"},
        lambda mask: lion(beta1=0.8, beta2=0.9, weight_decay=0.2, decay_mask=mask),
    ),
}


@pytest.mark.parametrize("name", sorted(BUILD_CASES))
def test_build_optimizer_from_config(name):
    params = small_tree()
    cfg = OptimConfig(
        name=name,
        weight_decay=0.2,
        beta1=0.8,
        beta2=0.9,
        eps=1e-7,
        momentum=0.5,
        nesterov=True,
        decay_embeddings=True,
    )
    moments, make_expected = BUILD_CASES[name]
    optimizer = build_optimizer(cfg, params)
    assert set(optimizer.init(params).keys()) == moments
    grads_seq = grad_sequence(params)
    built, _ = run_functional(optimizer, params, grads_seq)
    expected, _ = run_functional(
        make_expected(default_decay_mask(params, decay_embeddings=True)), params, grads_seq
    )
    assert (built[-1] == expected[-1]).all()
    other_mask, _ = run_functional(make_expected(default_decay_mask(params)), params, grads_seq)
    assert not torch.equal(built[-1]["embed", "weight"], other_mask[-1]["embed", "weight"])


def test_build_optimizer_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"optim.name='adam'.*adamw, sgd, lion"):
        build_optimizer(OptimConfig(name="adam"), small_tree())


# --- global norm and clipping -----------------------------------------------------------------------
def test_clip_matches_torch_clip_grad_norm():
    grads = small_tree(seed=3)
    leaves = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads.values(True, True)]
    for leaf, g in zip(leaves, grads.values(True, True), strict=True):
        leaf.grad = g.clone()
    torch_norm = torch.nn.utils.clip_grad_norm_(leaves, max_norm=0.5)
    clipped, norm = clip_by_global_norm(grads, 0.5)
    torch.testing.assert_close(norm, torch_norm)
    for leaf, path in zip(leaves, leaf_paths(grads), strict=True):
        torch.testing.assert_close(clipped.get(path), leaf.grad)
    torch.testing.assert_close(global_norm(clipped), torch.tensor(0.5), atol=1e-5, rtol=0)


def test_global_norm_by_hand_and_no_clipping_cases():
    grads = small_tree(seed=4)
    by_hand = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values(True, True)))
    assert global_norm(grads).item() == pytest.approx(by_hand, rel=1e-6)
    same, norm = clip_by_global_norm(grads, None)
    assert same is grads and norm.item() == pytest.approx(by_hand, rel=1e-6)
    loose, _ = clip_by_global_norm(grads, by_hand * 2)
    assert (loose == grads).all()
    with pytest.raises(ValueError, match="max_norm=0"):
        clip_by_global_norm(grads, 0)


@settings(max_examples=10)
@given(max_norm=st.floats(1e-3, 10.0), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 100))
def test_clipped_norm_never_exceeds_max(max_norm, scale, seed):
    grads = small_tree(seed).apply(lambda g: g * scale)
    clipped, before = clip_by_global_norm(grads, max_norm)
    after = global_norm(clipped).item()
    assert after <= max_norm * (1 + 1e-5)
    assert after == pytest.approx(min(before.item(), max_norm), rel=1e-4)


def test_adamw_without_a_step_says_what_it_needs():
    params = TensorDict({"w": torch.ones(2, 2)}, [])
    optimizer = adamw()
    with pytest.raises(ValueError, match=r"adamw update needs step= \(the 1-based number"):
        optimizer.update(params, params, optimizer.init(params), lr=torch.tensor(0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_of_a_stacked_ensemble_clips_each_member_alone(dtype):
    """A stacked tree (batch_size [3]: an ensemble) is clipped per member: member i's norm and
    clipped grads are exactly those of clipping member i alone (the first is under max_norm)."""
    scales = (0.01, 1.0, 30.0)
    members = [
        small_tree(seed).apply(lambda g, s=s: (g * s).to(dtype)) for seed, s in enumerate(scales)
    ]
    ensemble = torch.stack(members)
    clipped, norm = clip_by_global_norm(ensemble, 1.0)
    assert norm.shape == (3,) and torch.equal(global_norm(ensemble), norm)
    for i, member in enumerate(members):
        alone, alone_norm = clip_by_global_norm(member, 1.0)
        assert torch.equal(norm[i], alone_norm)
        for path in leaf_paths(member):
            assert torch.equal(clipped[i].get(path), alone.get(path)), (i, path)
    assert torch.equal(clipped[0].get(("embed", "weight")), members[0].get(("embed", "weight")))
    # two batch dims [2, 3], and the compiled leaves function the train step calls
    grid = torch.stack([ensemble, torch.stack(members[::-1])])
    grid_clipped, grid_norm = clip_by_global_norm(grid, 1.0)
    assert torch.equal(grid_norm, torch.stack([norm, norm.flip(0)]))
    for path in leaf_paths(grid):
        assert torch.equal(grid_clipped[1, 0].get(path), clipped[2].get(path))
    leaves = list(ensemble.values(True, True))
    compiled = torch.compile(partial(clip_leaves_by_global_norm, batch_dims=1), fullgraph=True)
    compiled_leaves, compiled_norm = compiled(leaves, 1.0)
    torch.testing.assert_close(compiled_norm, norm)
    torch.testing.assert_close(compiled_leaves, list(clipped.values(True, True)))
