"""Higher-order and forward-mode derivatives of the model loss (`hessian`, `jacrev(grad)`,
`jvp(grad)`) with the default config: the recomputing autograd.Functions (`recomputed_input`,
`remat`) have no jvp and step aside under such transforms (`first_order_only`). References are
central finite differences of the first-order gradient, which runs through those Functions.

SDPA runs on its math backend here: torch's fused CPU kernel has neither a forward-mode
derivative nor a derivative of its backward (docs/troubleshooting.md)."""

import pytest
import torch
from torch.func import grad, hessian, jacrev, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import llmfn
from llmfn.layers.norm import rms_norm
from llmfn.layers.recomputed_input import (
    first_order_only,
    own_backward_ok,
    recomputed_input_linear,
)
from llmfn.layers.remat import remat

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(
    vocab_size=16, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16, init_std=0.4
)  # large weights: a Hessian far from 0
CONFIGS = {
    "default": {},
    "remat": {"activation_checkpointing": True},
    "layernorm gelu": {"norm_type": "layernorm", "use_glu": False, "activation": "gelu"},
}
LEAF = ("layers", "0", "attn_norm", "weight")  # [D]: through every later layer and the head


def loss_of_leaf(name):
    cfg = llmfn.ModelConfig(**BASE, max_seq_len=16, **CONFIGS[name])
    assert cfg.loss_chunk_size == 0
    params = llmfn.init_params(cfg, seed=0, dtype=torch.float64)
    params[LEAF] = params[LEAF] + 0.1 * torch.randn(8, generator=torch.Generator().manual_seed(2))
    inputs = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    batch = {"inputs": inputs, "targets": torch.roll(inputs, -1, 1)}

    def loss(weight):
        tree = params.clone(recurse=False)
        tree[LEAF] = weight
        return llmfn.loss(tree, batch, cfg)[0]

    return loss, params[LEAF]


def finite_difference_hessian(loss, weight, step=1e-5):
    """[D, D]: column j = (grad(w + h·e_j) - grad(w - h·e_j)) / 2h, first-order gradients only."""
    eye = torch.eye(weight.numel(), dtype=weight.dtype)
    gradient = grad(loss)
    columns = [
        (gradient(weight + step * e) - gradient(weight - step * e)) / (2 * step) for e in eye
    ]
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hessian_jacrev_grad_and_hvp_equal_finite_differences(name):
    loss, weight = loss_of_leaf(name)
    with sdpa_kernel(SDPBackend.MATH):  # the same attention arithmetic as the transforms'
        expected = finite_difference_hessian(loss, weight)
    tangent = torch.linspace(-1, 1, weight.numel(), dtype=weight.dtype)
    results = {  # no sdpa_kernel needed: attention picks SDPA's math backend under them
        "hessian": hessian(loss)(weight),
        "jacrev(grad)": jacrev(grad(loss))(weight),
        "jvp(grad) · v": jvp(grad(loss), (weight,), (tangent,))[1],
    }
    assert expected.abs().max() > 1e-3  # a Hessian that is not ~0
    for transform, got in results.items():
        want = expected @ tangent if transform.startswith("jvp") else expected
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8, msg=transform)


def test_first_order_only_reads_the_transform_stack():
    seen = {}

    def record(name):
        def f(x):
            seen[name] = first_order_only()
            return (x**3).sum()

        return f

    x = torch.ones(3)
    record("none")(x)
    grad(record("grad"))(x)
    torch.func.vmap(grad(record("vmap(grad)")))(x[:, None])
    jacrev(grad(record("jacrev(grad)")))(x)
    jvp(record("jvp"), (x,), (x,))
    hessian(record("hessian"))(x)
    assert seen == {
        "none": True,
        "grad": True,
        "vmap(grad)": True,
        "jacrev(grad)": False,
        "jvp": False,
        "hessian": False,
    }


def test_own_backward_ok_reads_the_stack_dynamo_traces():
    """Under torch.compile the transform stack is read at trace time, a constant of the graph
    (no graph break, no recompile): vmap(grad) and grad(grad) take the plain path there."""

    def f(x):  # the answer as a factor of the output: a side effect would add a guard
        return (x**3).sum() * (2.0 if own_backward_ok() else 3.0)

    def with_factor(factor):
        return lambda x: (x**3).sum() * factor

    cases = {  # transform, input, the factor own_backward_ok gives under it
        "none": (lambda g: g, torch.ones(3), 2.0),
        "grad": (grad, torch.ones(3), 2.0),
        "vmap(grad)": (lambda g: vmap(grad(g)), torch.ones(3, 1), 3.0),
        "jacrev(grad)": (lambda g: jacrev(grad(g)), torch.ones(3), 3.0),
    }
    for name, (transform, x, factor) in cases.items():
        compiled = torch.compile(transform(f), backend="eager", fullgraph=True)
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = compiled(2 * x)  # new values reuse the graph
        torch.testing.assert_close(got, transform(with_factor(factor))(2 * x), msg=name)


def test_plain_autograd_second_derivatives_under_the_math_sdpa_backend():
    """torch.autograd.grad(create_graph=True) and torch.autograd.functional.hvp cannot be seen
    from the forward, which takes SDPA's fused kernel (no derivative of its backward): they run
    with the forward and the gradient calls under sdpa_kernel(SDPBackend.MATH), as
    docs/troubleshooting.md says, with remat too (its backward recomputes the attention)."""
    tangent = torch.linspace(-1, 1, 8, dtype=torch.float64)
    for name in ("default", "remat"):
        loss, weight = loss_of_leaf(name)
        expected = jvp(grad(loss), (weight,), (tangent,))[1]
        with pytest.raises(RuntimeError, match="_scaled_dot_product_flash_attention_for_cpu_back"):
            torch.autograd.functional.hvp(loss, weight, tangent)  # the documented message
        with sdpa_kernel(SDPBackend.MATH):
            _, hvp = torch.autograd.functional.hvp(loss, weight, tangent)
            leaf = weight.clone().requires_grad_()
            (gradient,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
            (double,) = torch.autograd.grad(gradient @ tangent, leaf)
        torch.testing.assert_close(hvp, expected, msg=name)
        torch.testing.assert_close(double, expected, msg=name)


def test_recomputed_input_linear_and_remat_under_forward_mode():
    """The two Functions directly: jvp and hessian equal those of the plain computation."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    norm_weight = 1 + 0.1 * torch.randn(8, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 8, generator=gen, dtype=torch.float64)

    def pre(h, w):
        return rms_norm(h, w, 1e-6)

    def recomputed(w):
        return recomputed_input_linear(pre, [x, w], weight).tanh().sum()

    def rematerialized(w):
        (out,) = remat(lambda h, w: (torch.nn.functional.linear(pre(h, w), weight),), [x, w], [])
        return out.tanh().sum()

    def plain(w):
        return torch.nn.functional.linear(pre(x, w), weight).tanh().sum()

    tangent = torch.linspace(-1, 1, 8, dtype=torch.float64)
    for f in (recomputed, rematerialized):
        torch.testing.assert_close(hessian(f)(norm_weight), hessian(plain)(norm_weight))
        torch.testing.assert_close(
            jvp(grad(f), (norm_weight,), (tangent,))[1],
            jvp(grad(plain), (norm_weight,), (tangent,))[1],
        )
