"""`recomputed_input_linear`: the same values and gradients as `linear(pre(*inputs), ...)` under
every transform the step uses, while keeping only the inputs (not pre's output) for the
backward."""

import pytest
import torch
from tensordict import TensorDict

from llmfn.layers.attention import attention
from llmfn.layers.linear import linear
from llmfn.layers.mlp import hidden_activation
from llmfn.layers.norm import norm, normed_linear
from llmfn.layers.recomputed_input import recomputed_input_linear
from llmfn.model import init_params
from llmfn.model_config import ModelConfig

D, OUT, WIDTH = 16, 24, 20


def cfg_for(kind: str) -> ModelConfig:
    base = dict(vocab_size=32, hidden_size=D, num_layers=1, num_heads=2, intermediate_size=WIDTH)
    if kind == "layernorm":
        return ModelConfig(**base, norm_type="layernorm", use_glu=False, activation="gelu")
    return ModelConfig(**base)


def make_case(kind: str, seed: int = 0):
    """(f(inputs, weight, bias, recompute) -> [B, T, OUT], inputs, weight, bias) for a pre of
    each kind: an RMSNorm or LayerNorm before a projection, SwiGLU or GELU before the down one."""
    gen = torch.Generator().manual_seed(seed)
    cfg = cfg_for(kind)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    if kind in ("rmsnorm", "layernorm"):
        inputs = [randn(3, 5, D), 1 + 0.1 * randn(D)] + (
            [0.1 * randn(D)] if kind == "layernorm" else []
        )

        def f(inputs, weight, bias, recompute):
            x, norm_weight, *norm_bias = inputs
            norm_params = TensorDict({"weight": norm_weight}, [])
            if norm_bias:
                norm_params["bias"] = norm_bias[0]
            if recompute:
                return normed_linear(norm_params, x * 1, weight, bias, cfg)
            return linear(norm(norm_params, x * 1, cfg), weight, bias)

        return f, inputs, randn(OUT, D), randn(OUT)
    rows = 2 * WIDTH if kind == "swiglu" else WIDTH
    act = hidden_activation(cfg_for("layernorm") if kind == "gelu" else cfg)

    def f(inputs, weight, bias, recompute):
        (h,) = inputs
        if recompute:
            return recomputed_input_linear(act, [h * 1], weight, bias)
        return linear(act(h * 1), weight, bias)

    return f, [randn(3, 5, rows)], randn(OUT, WIDTH), randn(OUT)


KINDS = ["rmsnorm", "layernorm", "swiglu", "gelu"]


def loss_of(f, recompute):
    def loss(inputs, weight, bias):
        return (f(inputs, weight, bias, recompute).float() ** 2).mean()

    return loss


def grads(f, inputs, weight, bias, *, recompute: bool, how: str, bf16: bool):
    loss = loss_of(f, recompute)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if how == "autograd":
            leaves = [t.clone().requires_grad_() for t in (*inputs, weight, bias)]
            loss(leaves[:-2], *leaves[-2:]).backward()
            return [t.grad for t in leaves]
        grad = torch.func.grad(loss, argnums=(0, 1, 2))
        if how == "compile":
            torch._dynamo.reset()  # every case compiles grad's one wrapper function anew
            grad = torch.compile(grad, fullgraph=True)
        g_inputs, g_weight, g_bias = grad(inputs, weight, bias)
        return [*g_inputs, g_weight, g_bias]


CASES = [(kind, how) for kind in KINDS for how in ("autograd", "func.grad")] + [
    ("rmsnorm", "compile"),  # compiled: the two pre kinds the train step uses (seconds each)
    ("swiglu", "compile"),
]


@pytest.mark.parametrize(("kind", "how"), CASES)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_values_and_gradients_equal_the_plain_linear(kind, how, bf16):
    f, inputs, weight, bias = make_case(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = f(inputs, weight, bias, True)
        expected_out = f(inputs, weight, bias, False)
    assert out.dtype == expected_out.dtype
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    got = grads(f, inputs, weight, bias, recompute=True, how=how, bf16=bf16)
    expected = grads(f, inputs, weight, bias, recompute=False, how=how, bf16=bf16)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype == torch.float32
        if bf16:  # the matmuls may round in another order
            torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2 * e.abs().max().item())
        else:
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_per_example_gradients_under_vmap_equal_the_plain_linear(kind):
    f, inputs, weight, bias = make_case(kind)
    first, *rest = inputs

    def per_example(recompute):
        def loss(row, weight, bias):
            return loss_of(f, recompute)([row[None], *rest], weight, bias)

        return torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(0, None, None))(
            first, weight, bias
        )

    for g, e in zip(per_example(True), per_example(False), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["rmsnorm", "swiglu"])
def test_second_derivatives_equal_the_plain_linear(kind):
    f, inputs, weight, bias = make_case(kind)

    def grad_norm(weight, recompute):
        g = torch.func.grad(lambda w: loss_of(f, recompute)(inputs, w, bias))(weight)
        return (g**2).sum()

    torch.testing.assert_close(
        torch.func.grad(grad_norm)(weight, True),
        torch.func.grad(grad_norm)(weight, False),
        rtol=1e-5,
        atol=1e-6,
    )


def saved_tensor_sizes(run) -> list[tuple[int, ...]]:
    sizes = []

    def pack(tensor):
        sizes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sizes


def test_the_backward_keeps_the_inputs_not_the_norms_output():
    """The point of it: autograd keeps a norm's output [B, T, D] for the projection's weight
    gradient; recomputed, only x, the norm's weight and the projection's weight are kept."""
    f, (x, norm_weight), weight, bias = make_case("rmsnorm")
    leaves = [t.requires_grad_() for t in (x, norm_weight, weight, bias)]
    recomputed = saved_tensor_sizes(lambda: f(leaves[:2], *leaves[2:], True))
    plain = saved_tensor_sizes(lambda: f(leaves[:2], *leaves[2:], False))
    assert sorted(recomputed) == sorted([tuple(x.shape), (D,), (OUT, D)])
    assert plain.count(tuple(x.shape)) > recomputed.count(tuple(x.shape))


def test_without_gradients_it_is_the_plain_linear():
    f, inputs, weight, bias = make_case("swiglu")
    with torch.no_grad():
        out = f(inputs, weight, bias, True)
    assert out.grad_fn is None
    torch.testing.assert_close(out, f(inputs, weight, bias, False))
    # nothing requires grad: no autograd.Function node either (dynamo mis-traces it then)
    assert f(inputs, weight, bias, True).grad_fn is None


def test_attention_keeps_v_not_the_whole_qkv_projection():
    """With RoPE, q and k are fresh tensors; SDPA's saved v would be a view of the fused qkv
    output and keep all of it ([B, T, (H + 2·KV)·hd]) alive for the backward. v is copied."""
    cfg = ModelConfig(vocab_size=32, hidden_size=D, num_layers=1, num_heads=2, num_kv_heads=1)
    layer = init_params(cfg, seed=0)["layers", "0"]
    x = torch.randn(3, 5, D)
    qkv_bytes = 3 * 5 * (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim * 4
    storages = []

    def pack(tensor):
        storages.append(tensor.untyped_storage().nbytes())
        return tensor

    params = layer.apply(lambda leaf: leaf.requires_grad_())
    positions = torch.arange(5).expand(3, 5)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        attention(params["attn"], x, cfg, positions=positions, input_norm=params["attn_norm"])
    assert storages and qkv_bytes not in storages
