"""Invariants of the decoder over small random architectures (hypothesis).

Every parameter is perturbed away from its init (norm weights, zero biases) and weights use a
large std, so a leak or a misrouted head moves logits far beyond the tolerances used here.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torch.fx.experimental.proxy_tensor import make_fx

from llmfn.cached_decode import decode_weights
from llmfn.layers.attention import attention_bias
from llmfn.layers.dropout import dropout, fold_in, uniform
from llmfn.layers.linear import linear
from llmfn.layers.mlp import mlp
from llmfn.layers.moe import expert_capacity, moe, route
from llmfn.layers.panel_matmul import panel_weight
from llmfn.layers.positions import alibi_slopes
from llmfn.model import forward, forward_cached, forward_with_aux, init_cache, init_params, loss
from llmfn.model_config import ACTIVATIONS, NORM_POSITIONS, NORM_TYPES, POSITIONS, ModelConfig

VOCAB = 32
MAX_LEN = 16
TOL = {"atol": 2e-5, "rtol": 1e-4}


pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def model_configs(draw, *, moe=None, sliding_window=None, position=None) -> ModelConfig:
    """A tiny random architecture: MHA / GQA / MQA, every position kind, norm type and position,
    GLU or not, biases, tied embeddings, sliding window, dropless MoE (with shared experts),
    activation checkpointing (the forward runs through `layers.remat` when grad is enabled)."""
    num_heads = draw(st.sampled_from([2, 4]))
    num_kv_heads = draw(st.sampled_from([None, *[k for k in (1, 2, 4) if num_heads % k == 0]]))
    position = draw(st.sampled_from(POSITIONS)) if position is None else position
    rope_scaling = draw(st.sampled_from([None, "linear", "llama3"])) if position == "rope" else None
    use_moe = draw(st.booleans()) if moe is None else moe
    num_experts = draw(st.sampled_from([2, 4]))
    if sliding_window is None:
        sliding_window = draw(st.sampled_from([None, 2, 3]))
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=num_heads * draw(st.sampled_from([4, 8])),
        num_layers=2,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=draw(st.sampled_from([16, 24])),
        max_seq_len=MAX_LEN,
        use_glu=draw(st.booleans()),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        norm_type=draw(st.sampled_from(NORM_TYPES)),
        norm_position=draw(st.sampled_from(NORM_POSITIONS)),
        position=position,
        rope_scaling=rope_scaling,
        rope_scaling_factor=2.0 if rope_scaling else 1.0,
        rope_original_max_seq_len=8 if rope_scaling == "llama3" else None,
        attention_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        sliding_window=sliding_window or None,
        tie_embeddings=draw(st.booleans()),
        use_moe=use_moe,
        num_experts=num_experts,
        top_k=draw(st.integers(1, num_experts)),
        num_shared_experts=draw(st.integers(0, 1)),
        activation_checkpointing=draw(st.booleans()),
        init_std=0.3,
    )


def perturbed_params(cfg: ModelConfig, seed: int = 0) -> TensorDict:
    """init_params plus noise on every leaf, so norm weights and (zero-init) biases matter."""
    gen = torch.Generator().manual_seed(seed + 1000)
    params = init_params(cfg, seed=seed)
    return params.apply(lambda t: t + 0.2 * torch.randn(t.shape, generator=gen))


def random_tokens(shape, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# --- causality ------------------------------------------------------------------------------
@settings(max_examples=30)
@given(cfg=model_configs(), cut=st.integers(1, 7), seed=st.integers(0, 100))
def test_future_tokens_never_change_past_logits(cfg, cut, seed):
    params = perturbed_params(cfg, seed)
    tokens = random_tokens((2, 8), seed)
    changed = tokens.clone()
    changed[:, cut:] = (
        changed[:, cut:] + 1 + random_tokens((2, 8 - cut), seed + 1) % (VOCAB - 1)
    ) % VOCAB
    before, after = forward(params, tokens, cfg), forward(params, changed, cfg)
    torch.testing.assert_close(after[:, :cut], before[:, :cut], **TOL)
    assert not torch.allclose(after[:, cut:], before[:, cut:], atol=1e-3)  # the change is visible


@settings(max_examples=15)
@given(cfg=model_configs(moe=True), cut=st.integers(1, 7), seed=st.integers(0, 100))
def test_capacity_limited_moe_is_causal_within_a_row(cfg, cut, seed):
    """Earlier tokens claim expert capacity first, so dropping never looks into the future."""
    cfg = cfg.replace(moe_capacity_factor=0.5)
    params = perturbed_params(cfg, seed)
    tokens = random_tokens((1, 8), seed)
    changed = tokens.clone()
    changed[:, cut:] = (changed[:, cut:] + 1) % VOCAB
    before, after = forward(params, tokens, cfg), forward(params, changed, cfg)
    torch.testing.assert_close(after[:, :cut], before[:, :cut], **TOL)


@settings(max_examples=20)
@given(cfg=model_configs(sliding_window=3), seed=st.integers(0, 100))
def test_sliding_window_bounds_the_receptive_field(cfg, seed):
    """One layer, window w: the logits at t see tokens t-w+1 .. t and nothing earlier."""
    cfg = cfg.replace(num_layers=1)
    params = perturbed_params(cfg, seed)
    tokens = random_tokens((1, 10), seed)
    base = forward(params, tokens, cfg)
    t, w = 8, cfg.sliding_window
    for j, visible in [(t - w, False), (t - w + 1, True)]:
        changed = tokens.clone()
        changed[0, j] = (changed[0, j] + 1) % VOCAB
        moved = not torch.allclose(forward(params, changed, cfg)[0, t], base[0, t], atol=1e-4)
        assert moved == visible, (j, visible)


# --- positions ------------------------------------------------------------------------------
def test_alibi_distances_come_from_the_positions_option():
    """Without a cache ALiBi's bias is -slope · (q - k) of the tokens' positions (as RoPE reads
    them): a gapped `positions` scales the distances; a shifted one changes nothing."""
    cfg = ModelConfig(
        vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=4, max_seq_len=MAX_LEN,
        position="alibi",
    )  # fmt: skip
    positions = torch.tensor([[0, 3, 6, 9], [5, 6, 7, 8]])
    bias = attention_bias(
        torch.arange(4), 4, None, cfg, cached=False, batch_size=2, dtype=torch.float32,
        positions=positions,
    )  # fmt: skip
    distance = (positions[:, :, None] - positions[:, None, :]).float()  # [B, Tq, Tk]
    expected = -alibi_slopes(4)[None, :, None, None] * distance[:, None]
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    torch.testing.assert_close(bias[..., causal], expected[..., causal])
    assert torch.isinf(bias[..., ~causal]).all()

    params, tokens = perturbed_params(cfg), random_tokens((2, 8), 0)
    steps = torch.arange(8)[None].expand(2, 8)
    plain = forward(params, tokens, cfg)
    torch.testing.assert_close(forward(params, tokens, cfg, positions=steps + 5), plain, **TOL)
    gapped = forward(params, tokens, cfg, positions=steps * 3)
    assert (gapped - plain).abs().max() > 1e-2


# --- GQA == MHA with repeated K/V heads -----------------------------------------------------
def repeat_kv_rows(weight: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """wqkv [(H + 2·KV)·hd, ...] -> [3·H·hd, ...] with each K/V head repeated H/KV times."""
    hd, H, KV = cfg.head_dim, cfg.num_heads, cfg.kv_heads
    q, k, v = weight.split([H * hd, KV * hd, KV * hd])
    repeat = lambda t: t.unflatten(0, (KV, hd)).repeat_interleave(H // KV, dim=0).flatten(0, 1)  # noqa: E731
    return torch.cat([q, repeat(k), repeat(v)])


@settings(max_examples=25)
@given(cfg=model_configs(), seed=st.integers(0, 100))
def test_gqa_equals_mha_with_repeated_kv_heads(cfg, seed):
    cfg = cfg.replace(num_kv_heads=draw_divisor(cfg.num_heads, seed))
    mha_cfg = cfg.replace(num_kv_heads=None)
    params = perturbed_params(cfg, seed)
    mha_params = params.clone()
    for i in range(cfg.num_layers):
        attn = mha_params["layers", str(i), "attn"]
        attn["wqkv"] = repeat_kv_rows(attn["wqkv"], cfg)
        if cfg.attention_bias:
            attn["bqkv"] = repeat_kv_rows(attn["bqkv"], cfg)
    assert mha_params["layers", "0", "attn", "wqkv"].shape[0] == 3 * cfg.hidden_size
    tokens = random_tokens((2, 8), seed)
    torch.testing.assert_close(
        forward(mha_params, tokens, mha_cfg), forward(params, tokens, cfg), **TOL
    )


def draw_divisor(num_heads: int, seed: int) -> int:
    """A proper divisor of num_heads (GQA or MQA), picked by seed."""
    divisors = [k for k in range(1, num_heads) if num_heads % k == 0]
    return divisors[seed % len(divisors)]


# --- weight layouts ---------------------------------------------------------------------------
@settings(max_examples=30)
@given(
    panels=st.integers(1, 4),
    width=st.sampled_from([8, 16]),  # 8: the CPU kernel; 16: its torch.matmul fallback
    in_features=st.integers(1, 9),
    leading=st.lists(st.integers(1, 3), max_size=2),
    with_bias=st.booleans(),
    seed=st.integers(0, 100),
)
def test_linear_over_panels_equals_f_linear(panels, width, in_features, leading, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(width * panels, in_features, generator=gen)
    bias = torch.randn(width * panels, generator=gen) if with_bias else None
    x = torch.randn(*leading, in_features, generator=gen)
    torch.testing.assert_close(
        linear(x, panel_weight(weight, width), bias), F.linear(x, weight, bias), **TOL
    )
    with pytest.raises(ValueError, match="panel width 16 does not divide the 17 output rows"):
        panel_weight(torch.zeros(17, in_features), 16)


@settings(max_examples=25)
@given(cfg=model_configs(), seed=st.integers(0, 100))
def test_forward_is_the_same_in_the_decode_weight_layout(cfg, seed):
    params = perturbed_params(cfg, seed)
    relaid = decode_weights(params)
    if cfg.hidden_size % 8 == 0:
        assert relaid["layers", "0", "attn", "wo"].dim() == 3  # panels
    tokens = random_tokens((2, 8), seed)
    torch.testing.assert_close(forward(relaid, tokens, cfg), forward(params, tokens, cfg), **TOL)


# --- batch independence and padding ---------------------------------------------------------
@settings(max_examples=25)
@given(cfg=model_configs(), seed=st.integers(0, 100))
def test_each_row_equals_running_it_alone(cfg, seed):
    params = perturbed_params(cfg, seed)
    tokens = random_tokens((3, 8), seed)
    batched = forward(params, tokens, cfg)
    for row in range(3):
        torch.testing.assert_close(
            batched[row : row + 1], forward(params, tokens[row : row + 1], cfg), **TOL
        )


@settings(max_examples=25)
@given(
    cfg=model_configs(),
    lengths=st.lists(st.integers(1, 8), min_size=2, max_size=3),
    seed=st.integers(0, 100),
)
def test_right_padding_does_not_change_real_token_logits(cfg, lengths, seed):
    params = perturbed_params(cfg, seed)
    T = 8
    tokens = random_tokens((len(lengths), T), seed)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    padded = torch.where(mask.bool(), tokens, random_tokens(tokens.shape, seed + 1))
    logits = forward(params, padded, cfg, attention_mask=mask)
    assert torch.isfinite(logits).all()
    for row, n in enumerate(lengths):
        alone = forward(params, tokens[row : row + 1, :n], cfg)
        torch.testing.assert_close(logits[row : row + 1, :n], alone, **TOL)


@settings(max_examples=25)
@given(
    cfg=model_configs(),
    lengths=st.lists(st.integers(1, 8), min_size=2, max_size=3),
    seed=st.integers(0, 100),
)
def test_left_padding_with_mask_equals_the_unpadded_row(cfg, lengths, seed):
    """Positions default from the mask, so each row's first real token is at position 0."""
    params = perturbed_params(cfg, seed)
    T = 8
    tokens = random_tokens((len(lengths), T), seed)
    mask = (torch.arange(T)[None] >= T - torch.tensor(lengths)[:, None]).long()
    padded = torch.where(mask.bool(), tokens, random_tokens(tokens.shape, seed + 1))
    logits = forward(params, padded, cfg, attention_mask=mask)
    assert torch.isfinite(logits).all()
    for row, n in enumerate(lengths):
        alone = forward(params, tokens[row : row + 1, T - n :], cfg)
        torch.testing.assert_close(logits[row : row + 1, T - n :], alone, **TOL)


# --- KV cache -------------------------------------------------------------------------------
def cached_logits(
    params, tokens, cfg, chunk: int, max_len: int, attention_mask=None
) -> torch.Tensor:
    """Feed tokens [B, T] through forward_cached `chunk` tokens at a time -> logits [B, T, V]."""
    cache = init_cache(cfg, tokens.shape[0], max_len)
    pieces = []
    for start in range(0, tokens.shape[1], chunk):
        logits, cache = forward_cached(
            params,
            tokens[:, start : start + chunk],
            cfg,
            cache,
            torch.tensor(start),
            attention_mask=attention_mask,
        )
        pieces.append(logits)
    return torch.cat(pieces, dim=1)


@settings(max_examples=40)
@given(
    cfg=model_configs(),
    chunk=st.integers(1, 5),
    extra_slots=st.integers(0, 4),
    seed=st.integers(0, 100),
)
def test_kv_cache_decode_equals_full_forward(cfg, chunk, extra_slots, seed):
    """One token at a time or in chunks, GQA / MoE / sliding window (2-3, shorter than T = 10)."""
    params = perturbed_params(cfg, seed)
    tokens = random_tokens((2, 10), seed)
    full = forward(params, tokens, cfg)
    torch.testing.assert_close(
        cached_logits(params, tokens, cfg, chunk, 10 + extra_slots), full, **TOL
    )


@settings(max_examples=15)
@given(cfg=model_configs(sliding_window=3), seed=st.integers(0, 100))
def test_kv_cache_token_by_token_with_a_sliding_window_shorter_than_the_sequence(cfg, seed):
    assert cfg.sliding_window == 3
    params = perturbed_params(cfg, seed)
    tokens = random_tokens((2, 12), seed)
    torch.testing.assert_close(
        cached_logits(params, tokens, cfg, 1, 12), forward(params, tokens, cfg), **TOL
    )


@settings(max_examples=25)
@given(
    cfg=model_configs(),
    lengths=st.lists(st.integers(1, 6), min_size=2, max_size=3),
    seed=st.integers(0, 100),
)
def test_left_padded_kv_cache_decode_equals_the_unpadded_rows(cfg, lengths, seed):
    """Batched generation: left-padded prompts in a cache, mask over slots, default positions."""
    params = perturbed_params(cfg, seed)
    T, max_len = 6, 9
    tokens = random_tokens((len(lengths), T), seed)
    slot_mask = torch.ones(len(lengths), max_len, dtype=torch.long)
    slot_mask[:, :T] = torch.arange(T)[None] >= T - torch.tensor(lengths)[:, None]
    padded = torch.where(slot_mask[:, :T].bool(), tokens, 0)
    logits = cached_logits(params, padded, cfg, 2, max_len, attention_mask=slot_mask)
    for row, n in enumerate(lengths):
        alone = forward(params, tokens[row : row + 1, T - n :], cfg)
        torch.testing.assert_close(logits[row : row + 1, T - n :], alone, **TOL)


def test_kv_cache_writes_only_the_new_slots():
    cfg = ModelConfig(
        vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=16
    )
    params = init_params(cfg)
    cache = init_cache(cfg, 2, 8)
    assert cache["layers", "1", "k"].shape == (2, 2, 8, 4)
    _, new_cache = forward_cached(params, random_tokens((2, 3), 0), cfg, cache, torch.tensor(2))
    k = new_cache["layers", "0", "k"]
    assert (k[:, :, :2] == 0).all() and (k[:, :, 5:] == 0).all()
    assert (k[:, :, 2:5].abs().sum(-1) > 0).all()
    assert (cache["layers", "0", "k"] == 0).all()  # the input cache is not modified in place


# --- init -----------------------------------------------------------------------------------
@settings(max_examples=8)
@given(cfg=model_configs(), seed=st.integers(0, 2**31 - 1))
def test_init_is_deterministic_in_the_seed(cfg, seed):
    first, again, other = (
        init_params(cfg, seed=seed),
        init_params(cfg, seed=seed),
        init_params(cfg, seed=seed + 1),
    )
    assert sorted(first.keys(True, True)) == sorted(other.keys(True, True))
    for key in first.keys(True, True):
        assert torch.equal(first[key], again[key]), key
        constant = "norm" in key[-2] or key[-1].startswith("b")  # norms are ones, biases zeros
        assert torch.equal(first[key], other[key]) == constant, key


def test_init_dtype_and_residual_scaling():
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=8, num_heads=4, init_std=0.02)
    params = init_params(cfg, seed=0, dtype=torch.float64)
    assert all(leaf.dtype == torch.float64 for leaf in params.values(True, True))
    layer = params["layers", "3"]
    assert layer["attn", "wqkv"].std().item() == pytest.approx(0.02, rel=0.05)
    assert layer["attn", "wo"].std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert layer["mlp", "w2"].std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


# --- MoE ------------------------------------------------------------------------------------
@settings(max_examples=15)
@given(cfg=model_configs(moe=False), seed=st.integers(0, 100))
def test_single_expert_moe_equals_the_dense_mlp(cfg, seed):
    cfg = cfg.replace(mlp_bias=False)  # experts have no biases
    moe_cfg = cfg.replace(use_moe=True, num_experts=1, top_k=1, num_shared_experts=0)
    moe_params = perturbed_params(moe_cfg, seed)
    dense_params = moe_params.clone()
    for i in range(cfg.num_layers):
        layer = dense_params["layers", str(i)]
        experts = layer["moe", "experts"]
        layer["mlp"] = TensorDict({name: w[0] for name, w in experts.items()}, [])
        del layer["moe"]
    tokens = random_tokens((2, 8), seed)
    logits, losses = forward_with_aux(moe_params, tokens, moe_cfg)
    torch.testing.assert_close(logits, forward(dense_params, tokens, cfg), **TOL)
    torch.testing.assert_close(losses["moe_aux_loss"], torch.tensor(1.0))  # E·f·p = 1·1·1


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_router_learns_from_the_model_loss(top_k):
    """Switch-style top-1 keeps the raw probability: renormalised it is exactly 1 and the
    router's gradient from the output (aux losses aside) would be zero."""
    cfg = ModelConfig(
        vocab_size=32,
        hidden_size=16,
        num_heads=2,
        num_layers=1,
        use_moe=True,
        num_experts=4,
        top_k=top_k,
    )
    params = init_params(cfg, seed=0)["layers", "0", "moe"]
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    target = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))

    def output_loss(router):
        with_router = params.clone(recurse=False)
        with_router["router"] = router
        out, _ = moe(with_router, x, cfg)  # no aux losses in it
        return (out - target).pow(2).mean()

    router_grad = torch.func.grad(output_loss)(params["router"].clone())
    assert router_grad.abs().sum() > 0
    weights, _, _ = route(params["router"], x.reshape(-1, 16), cfg)
    if top_k > 1:
        torch.testing.assert_close(weights.sum(-1), torch.ones(10))
    else:
        assert (weights < 1).all()


def moe_reference(
    params: TensorDict, x: torch.Tensor, cfg: ModelConfig
) -> tuple[torch.Tensor, int]:
    """A loop over (token, choice) pairs in token order: a pair runs its expert only while the
    expert has room (capacity C); otherwise it is dropped. -> ([N, D], pairs dropped)."""
    tokens = x.reshape(-1, x.shape[-1])
    weights, experts, _ = route(params["router"], tokens, cfg)
    capacity = expert_capacity(tokens.shape[0], cfg)
    used = [0] * cfg.num_experts
    out, dropped = torch.zeros_like(tokens), 0
    for n in range(tokens.shape[0]):
        for j in range(cfg.top_k):
            e = experts[n, j].item()
            if used[e] == capacity:
                dropped += 1
                continue
            used[e] += 1
            one_expert = TensorDict({name: w[e] for name, w in params["experts"].items()}, [])
            out[n] += weights[n, j] * mlp(one_expert, tokens[n], cfg)
    return out, dropped


@settings(max_examples=25)
@given(
    cfg=model_configs(moe=True),
    capacity_factor=st.sampled_from([0.25, 0.5, 1.0, 1.5, 100.0]),
    seed=st.integers(0, 100),
)
def test_moe_drops_pairs_only_when_an_expert_is_over_capacity(cfg, capacity_factor, seed):
    cfg = cfg.replace(moe_capacity_factor=capacity_factor, num_shared_experts=0)
    params = perturbed_params(cfg, seed)["layers", "0", "moe"]
    x = torch.randn(2, 6, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    out, _ = moe(params, x, cfg)
    expected, dropped = moe_reference(params, x, cfg)
    torch.testing.assert_close(out.reshape(-1, cfg.hidden_size), expected, **TOL)

    _, experts, _ = route(params["router"], x.reshape(-1, cfg.hidden_size), cfg)
    load = torch.bincount(experts.flatten(), minlength=cfg.num_experts)
    capacity = expert_capacity(12, cfg)
    assert dropped == (load - capacity).clamp(min=0).sum().item()
    dropless, _ = moe(params, x, cfg.replace(moe_capacity_factor=None))
    if dropped == 0:
        torch.testing.assert_close(out, dropless, **TOL)
    else:
        assert not torch.allclose(out, dropless, atol=1e-4)


def test_expert_capacity():
    cfg = ModelConfig(use_moe=True, num_experts=4, top_k=2, moe_capacity_factor=1.0)
    assert expert_capacity(10, cfg) == 5  # ceil(1.0 · 10·2 / 4)
    assert expert_capacity(10, cfg.replace(moe_capacity_factor=1.3)) == 7  # ceil(6.5)
    assert expert_capacity(10, cfg.replace(moe_capacity_factor=100.0)) == 10  # at most N
    assert expert_capacity(1, cfg.replace(moe_capacity_factor=0.01)) == 1  # at least 1
    assert expert_capacity(10, cfg.replace(moe_capacity_factor=None)) == 10


# --- dropout --------------------------------------------------------------------------------
@settings(max_examples=15)
@given(cfg=model_configs(), p=st.sampled_from([0.1, 0.5]), seed=st.integers(0, 100))
def test_dropout_is_a_pure_function_of_the_key(cfg, p, seed):
    cfg = cfg.replace(dropout=p)
    params = perturbed_params(cfg, seed)
    tokens = random_tokens((2, 8), seed)
    key, other_key = torch.tensor(seed), torch.tensor(seed + 7)
    train = forward(params, tokens, cfg, training=True, rng=key)
    torch.testing.assert_close(
        forward(params, tokens, cfg, training=True, rng=key.clone()), train, rtol=0, atol=0
    )
    assert not torch.allclose(
        forward(params, tokens, cfg, training=True, rng=other_key), train, atol=1e-3
    )
    evaluation = forward(params, tokens, cfg, training=False, rng=key)
    torch.testing.assert_close(
        evaluation, forward(params, tokens, cfg.replace(dropout=0.0)), rtol=0, atol=0
    )
    assert not torch.allclose(evaluation, train, atol=1e-3)


def test_dropout_rate_and_scale():
    x = torch.ones(200_000)
    out = dropout(x, 0.3, torch.tensor(5))
    assert (out == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / 0.7))
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)  # inverted dropout keeps the mean
    assert torch.equal(dropout(x, 0.3, None), x)


def test_the_streams_of_two_keys_are_unrelated():
    """Keys 0 and the inverse of the old key multiplier (mod 2**32) once gave the same stream
    shifted by one element; seeds that differ above bit 32 once gave the same stream."""
    n = 1 << 16
    inverse = pow(0x632BE5AB, -1, 1 << 32)
    first, second = uniform(torch.tensor(0), (n,)), uniform(torch.tensor(inverse), (n,))
    for shift in range(4):
        assert (first[shift:] == second[: n - shift]).float().mean() < 0.01
    high = uniform(torch.tensor(3 + 2**32), (n,))
    assert (uniform(torch.tensor(3), (n,)) == high).float().mean() < 0.01


def test_one_keys_children_are_distinct_and_unrelated_to_its_neighbours():
    children = fold_in(torch.tensor(7), torch.arange(10_000))
    assert children.unique().numel() == 10_000
    assert ((children >= 0) & (children < 2**32)).all()
    neighbours = fold_in(torch.tensor(8), torch.arange(10_000))
    assert (children == neighbours).float().mean() < 0.01
    torch.testing.assert_close(fold_in(torch.tensor(7), 5), children[5], rtol=0, atol=0)


def test_a_mask_costs_few_ops_because_compile_inlines_it_into_every_kernel_that_reads_it():
    """torch.compile recomputes a dropout mask, key derivation included, in each kernel that
    reads it, and inductor's codegen time grows with those ops: at 129 ops for this mask,
    compile(grad) of a 2-layer model with activation recompute took over 10 minutes."""
    graph = make_fx(lambda x, key: dropout(x, 0.1, fold_in(fold_in(key, 1), 2)))(
        torch.ones(4, 8), torch.tensor(3)
    )
    assert sum(node.op == "call_function" for node in graph.graph.nodes) <= 75


def test_a_key_per_row_gives_each_row_the_stream_of_its_own_key():
    keys = fold_in(torch.tensor(9), torch.arange(3))
    rows = uniform(keys, (3, 50))
    for row, key in zip(rows, keys, strict=True):
        assert torch.equal(row, uniform(key, (50,)))


def test_training_with_dropout_needs_a_key():
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2, dropout=0.1)
    with pytest.raises(ValueError, match="rng="):
        forward(init_params(cfg), random_tokens((1, 4), 0), cfg, training=True)
    for bad in (torch.tensor([1, 2, 3]), torch.tensor(1.0), torch.tensor([[1], [2]])):
        with pytest.raises(
            ValueError, match=r"rng must be an int64 key, 0-d or one per row \[B=2\]"
        ):
            forward(init_params(cfg), random_tokens((2, 4), 0), cfg, training=True, rng=bad)


def test_a_key_per_row_drops_each_row_as_alone():
    """Row keys [B]: a row's dropout masks do not depend on the rest of the batch."""
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2, dropout=0.3)
    params, tokens = init_params(cfg), random_tokens((3, 6), 1)
    keys = fold_in(torch.tensor(4), torch.arange(3))
    together = forward(params, tokens, cfg, training=True, rng=keys)
    for row in range(3):
        alone = forward(params, tokens[row : row + 1], cfg, training=True, rng=keys[row : row + 1])
        torch.testing.assert_close(alone[0], together[row])


# --- config validation ----------------------------------------------------------------------
@settings(max_examples=60)
@given(
    hidden_size=st.integers(-4, 48),
    num_heads=st.integers(-1, 8),
    num_kv_heads=st.one_of(st.none(), st.integers(-1, 8)),
    dropout_rate=st.floats(-0.5, 1.5),
    position=st.sampled_from([*POSITIONS, "rotary"]),
    use_moe=st.booleans(),
    num_experts=st.integers(-1, 4),
    top_k=st.integers(-1, 5),
)
def test_config_is_valid_or_raises_a_value_error_naming_a_field(
    hidden_size, num_heads, num_kv_heads, dropout_rate, position, use_moe, num_experts, top_k
):
    fields = {
        "hidden_size": hidden_size,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "dropout": dropout_rate,
        "position": position,
        "use_moe": use_moe,
        "num_experts": num_experts,
        "top_k": top_k,
    }
    try:
        cfg = ModelConfig(**fields)
    except ValueError as err:
        named = [name for name in fields if f"model.{name}={fields[name]!r}" in str(err)]
        assert named, str(err)
        return
    assert cfg.hidden_size > 0 and cfg.num_heads > 0 and cfg.hidden_size % cfg.num_heads == 0
    assert cfg.num_heads % cfg.kv_heads == 0 and 0 <= cfg.dropout < 1 and position != "rotary"
    assert not use_moe or 0 < cfg.top_k <= cfg.num_experts
    if position == "rope":
        assert cfg.head_dim % 2 == 0
    small = cfg.replace(num_layers=1, vocab_size=8)
    logits = forward(init_params(small), torch.zeros(1, 2, dtype=torch.long), small)
    assert logits.shape == (1, 2, 8) and torch.isfinite(logits).all()


def test_loss_ignores_masked_targets():
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2)
    params = init_params(cfg)
    inputs = random_tokens((2, 6), 0)
    targets = random_tokens((2, 6), 1)
    logits = forward(params, inputs, cfg)
    targets[0, :3] = -100
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    value, metrics = loss(params, {"inputs": inputs, "targets": targets}, cfg)
    torch.testing.assert_close(value, expected)
    assert metrics["tokens"].item() == 9
