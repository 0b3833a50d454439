"""A float64 model computes in float64 end to end: the loss is float64 and its gradients pass
`torch.autograd.gradcheck` (finite differences), for every layer that upcasts low-precision
activations (norms, RoPE, the cross-entropy, the chunked head, the MoE router)."""

import math

import pytest
import torch

import llmfn
from llmfn.layers.positions import rope_angles, sinusoidal_table

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)
CONFIGS = {
    "rope rmsnorm": {},
    "learned": {"position": "learned"},
    "sinusoidal layernorm gelu": {
        "position": "sinusoidal",
        "norm_type": "layernorm",
        "use_glu": False,
        "activation": "gelu",
    },
    "llama3 rope": {"rope_scaling": "llama3", "rope_scaling_factor": 4.0},
    "moe": {"use_moe": True, "num_experts": 4, "top_k": 2},
    "chunked loss": {"loss_chunk_size": 5},
    "remat": {"activation_checkpointing": True},
}
# leaves the gradcheck perturbs: a norm in front of a recomputed projection, the final norm, the
# head (the chunked loss's own gradient), and the router or an MLP weight
CHECKED = [("layers", "0", "attn_norm", "weight"), ("final_norm", "weight"), ("lm_head", "weight")]


def loss_of_leaves(cfg, params, paths, batch):
    def loss(*leaves):
        tree = params.clone(recurse=False)
        for path, leaf in zip(paths, leaves, strict=True):
            tree[path] = leaf
        return llmfn.loss(tree, batch, cfg)[0]

    return loss


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float64_loss_is_float64_and_passes_gradcheck(name):
    cfg = llmfn.ModelConfig(**BASE, max_seq_len=16, **CONFIGS[name])
    params = llmfn.init_params(cfg, seed=0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, cfg.vocab_size, (2, 7), generator=gen)
    batch = {"inputs": inputs, "targets": torch.roll(inputs, -1, 1)}
    extra = ("layers", "0", "moe", "router") if cfg.use_moe else ("layers", "0", "mlp", "w2")
    paths = [*CHECKED, extra]
    leaves = [params[path].detach().clone().requires_grad_() for path in paths]
    loss = loss_of_leaves(cfg, params, paths, batch)
    assert loss(*leaves).dtype == torch.float64
    assert torch.autograd.gradcheck(loss, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("scaling", [None, "linear", "llama3", "dynamic"])
def test_rope_and_sinusoidal_tables_in_float64(scaling):
    cfg = llmfn.ModelConfig(
        **BASE, max_seq_len=16, rope_scaling=scaling, rope_scaling_factor=2.0 if scaling else 1.0
    )
    positions = torch.arange(40).expand(2, 40)  # past max_seq_len: dynamic NTK grows its base
    cos32, sin32 = rope_angles(positions, cfg)
    cos64, sin64 = rope_angles(positions, cfg, torch.float64)
    assert cos32.dtype == torch.float32 and cos64.dtype == torch.float64
    assert (cos64.float() - cos32).abs().max() < 1e-4  # the same angles, float32 rounding
    assert (sin64**2 + cos64**2 - 1).abs().max() < 1e-14
    assert rope_angles(positions, cfg, torch.bfloat16)[0].dtype == torch.float32
    if scaling is None:  # exact: cos(p · theta^(-2i/hd)) in float64
        half = cfg.head_dim // 2
        expected = [math.cos(39 * cfg.rope_theta ** (-i / half)) for i in range(half)]
        got = cos64[0, 0, 39, :half].tolist()
        assert all(math.isclose(g, e, abs_tol=1e-13) for g, e in zip(got, expected, strict=True))
    table = sinusoidal_table(positions, 8, torch.float64)
    assert table.dtype == torch.float64
    assert math.isclose(table[0, 39, 2].item(), math.sin(39 / 10000 ** (2 / 8)), abs_tol=1e-14)
