"""HF transformers parity: tiny random HF models (built from configs, no downloads) must give the
same float32 logits as llmfn after `from_hf`, and llmfn -> HF -> llmfn must be exact.

q/k projections are scaled by 10 (DESIGN.md §5) so that attention is sharp and a wrong RoPE,
mask or head split shows up; norm weights and biases are randomized so that swapped norms or
dropped biases show up. The measured max |Δlogits| per model is printed at the end of the module.
"""

import functools

import pytest
import torch

from llmfn import ModelConfig, forward, init_params
from llmfn.hf import (
    config_from_hf,
    from_hf,
    from_hf_state_dict,
    save_hf_pretrained,
    to_hf_config,
    to_hf_state_dict,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOLERANCE = 1e-4
VOCAB, SEQ = 97, 24
_LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
_GPT2 = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32)

# name -> (HF class, HF config kwargs)
HF_CASES = {
    "llama_mha_untied": ("LlamaForCausalLM", dict(_LLAMA)),
    "llama_gqa_tied": (
        "LlamaForCausalLM",
        dict(_LLAMA, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "llama_mqa_biases_gelu": (
        "LlamaForCausalLM",
        dict(
            _LLAMA,
            num_key_value_heads=1,
            attention_bias=True,
            mlp_bias=True,
            hidden_act="gelu_pytorch_tanh",
        ),
    ),
    "llama_rope_linear": (
        "LlamaForCausalLM",
        dict(_LLAMA, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    ),
    "llama_rope_dynamic": (  # SEQ > max_position_embeddings: the NTK base actually grows
        "LlamaForCausalLM",
        dict(
            _LLAMA, max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0}
        ),
    ),
    "llama_rope_llama3": (
        "LlamaForCausalLM",
        dict(
            _LLAMA,
            num_key_value_heads=2,
            rope_scaling=dict(_LLAMA3, original_max_position_embeddings=32),
        ),
    ),
    "mistral_sliding": (
        "MistralForCausalLM",
        dict(_LLAMA, num_key_value_heads=2, sliding_window=5),
    ),
    "qwen2_qkv_bias": (
        "Qwen2ForCausalLM",
        dict(_LLAMA, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "qwen2_sliding": (
        "Qwen2ForCausalLM",
        dict(
            _LLAMA,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=6,
            max_window_layers=0,
        ),
    ),
    "gpt2_tied": ("GPT2LMHeadModel", dict(_GPT2)),
    "gpt2_untied_relu": (
        "GPT2LMHeadModel",
        dict(_GPT2, tie_word_embeddings=False, n_inner=80, activation_function="relu"),
    ),
}


@pytest.fixture(scope="module")
def measured(request):
    """Collects max |Δlogits| per model and prints them when the module ends."""
    results: dict[str, tuple[float, float]] = {}
    yield results
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None or not results:
        return
    with capture.global_and_fixture_disabled():
        print("\nHF parity, float32, q/k x10: max |Δlogits| (max |logit|)")
        for name, (delta, scale) in sorted(results.items()):
            print(f"  {name:46s} {delta:.3e}  ({scale:.2f})")


def _tokens(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _randomize_hf(model, seed: int = 0):
    """Norm weights ~ 1 + 0.2·N, biases ~ 0.1·N, q/k projections x10 (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.ndim == 1:
                is_norm = "norm" in name or ".ln_" in name
                param.copy_(1 + 0.2 * noise if is_norm and name.endswith("weight") else 0.1 * noise)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(10)
            if name.endswith("c_attn.weight"):  # Conv1D [D, 3D]: q and k are the first 2D columns
                param[:, : 2 * param.shape[0]].mul_(10)
    return model.eval()


@functools.cache
def _hf_model(case: str):
    """The randomized HF model of HF_CASES[case], built once per module (tests never modify it)."""
    class_name, kwargs = HF_CASES[case]
    config_class = getattr(
        transformers, class_name.replace("LMHeadModel", "Config").replace("ForCausalLM", "Config")
    )
    torch.manual_seed(0)
    config = config_class(**kwargs, attn_implementation="eager")
    return _randomize_hf(getattr(transformers, class_name)(config))


def _max_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_from_hf_matches_hf_logits(case, measured):
    model = _hf_model(case)
    cfg, params = from_hf(model)
    tokens = _tokens()
    with torch.no_grad():
        expected = model(tokens).logits
        logits = forward(params, tokens, cfg)
    delta = _max_delta(logits, expected)
    measured[f"from_hf {case}"] = (delta, expected.abs().max().item())
    assert delta <= TOLERANCE, f"{case}: max |Δlogits| = {delta:.3e}"


# without rope_scaling, its other fields must be at their defaults too
NO_ROPE_SCALING = {
    "rope_scaling": None,
    "rope_scaling_factor": 1.0,
    "rope_original_max_seq_len": None,
}


@pytest.mark.parametrize(
    ("case", "ablation"),
    [
        ("llama_rope_linear", {"rope_scaling": None, "rope_scaling_factor": 1.0}),
        ("llama_rope_dynamic", NO_ROPE_SCALING),
        ("llama_rope_llama3", NO_ROPE_SCALING),
        ("mistral_sliding", {"sliding_window": None}),
        ("qwen2_sliding", {"sliding_window": None}),
        ("llama_mha_untied", {"rope_theta": 20000.0}),
    ],
)
def test_parity_cases_are_sensitive(case, ablation):
    """Negative control: dropping the feature under test breaks parity by far more than the
    tolerance, so the parity tests above can fail."""
    model = _hf_model(case)
    cfg, params = from_hf(model)
    tokens = _tokens()
    with torch.no_grad():
        delta = _max_delta(forward(params, tokens, cfg.replace(**ablation)), model(tokens).logits)
    assert delta > 100 * TOLERANCE, f"{case} without {ablation}: Δ = {delta:.3e}"


def _right_padded_mask(lengths: list[int], seq: int = SEQ) -> torch.Tensor:
    return (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).long()


@pytest.mark.parametrize(
    "case", ["llama_gqa_tied", "mistral_sliding", "qwen2_qkv_bias", "gpt2_tied"]
)
def test_right_padded_batch_matches_hf(case, measured):
    model = _hf_model(case)
    cfg, params = from_hf(model)
    tokens, mask = _tokens(3), _right_padded_mask([SEQ, 17, 9])
    with torch.no_grad():
        expected = model(tokens, attention_mask=mask).logits
        logits = forward(params, tokens, cfg, attention_mask=mask)
    real = mask.bool()
    delta = _max_delta(logits[real], expected[real])
    measured[f"right-padded {case}"] = (delta, expected[real].abs().max().item())
    assert delta <= TOLERANCE
    # The padded rows equal the same sequences run alone, unpadded.
    with torch.no_grad():
        alone = forward(params, tokens[2:, :9], cfg)
    assert _max_delta(logits[2, :9], alone[0]) <= TOLERANCE


def test_left_padded_batch_matches_hf_with_positions(measured):
    model = _hf_model("llama_gqa_tied")
    cfg, params = from_hf(model)
    tokens, mask = _tokens(2), _right_padded_mask([SEQ, 15]).flip(1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # llmfn's default for a [B, T] mask
    with torch.no_grad():
        expected = model(tokens, attention_mask=mask, position_ids=positions).logits
        logits = forward(params, tokens, cfg, attention_mask=mask)
    real = mask.bool()
    delta = _max_delta(logits[real], expected[real])
    measured["left-padded llama_gqa_tied"] = (delta, expected[real].abs().max().item())
    assert delta <= TOLERANCE


# --- llmfn -> HF ------------------------------------------------------------------------------
_SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=96,
    max_seq_len=64,
)
LLMFN_CASES = {
    "llama_gqa_biases_llama3": ModelConfig(
        **_SMALL,
        num_kv_heads=2,
        attention_bias=True,
        mlp_bias=True,
        rope_scaling="llama3",
        rope_scaling_factor=8.0,
        rope_original_max_seq_len=32,
        rope_low_freq_factor=2.0,
        rope_high_freq_factor=6.0,
    ),
    "llama_tied_linear_gelu": ModelConfig(
        **_SMALL,
        tie_embeddings=True,
        rope_scaling="linear",
        rope_scaling_factor=2.0,
        activation="gelu_tanh",
    ),
    "llama_dynamic": ModelConfig(
        **dict(_SMALL, max_seq_len=16),
        rope_theta=500.0,
        rope_scaling="dynamic",
        rope_scaling_factor=3.0,
    ),
    "llama_dynamic_longer_context": ModelConfig(  # HF's max_position_embeddings is the 16
        **_SMALL,
        rope_scaling="dynamic",
        rope_scaling_factor=2.0,
        rope_original_max_seq_len=16,
    ),
    "mistral_mqa": ModelConfig(**_SMALL, num_kv_heads=1, sliding_window=5, norm_eps=1e-6),
    "qwen2_qkv_bias_window": ModelConfig(
        **_SMALL, num_kv_heads=2, attention_bias="qkv", sliding_window=6
    ),
    "gpt2_tied": ModelConfig(
        **dict(_SMALL, intermediate_size=None, max_seq_len=32),
        use_glu=False,
        activation="gelu_tanh",
        norm_type="layernorm",
        position="learned",
        attention_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
    ),
    "gpt2_untied_relu_dropout": ModelConfig(
        **dict(_SMALL, max_seq_len=32),
        use_glu=False,
        activation="relu",
        norm_type="layernorm",
        position="learned",
        attention_bias=True,
        mlp_bias=True,
        dropout=0.1,
    ),
}
QWEN2 = ModelConfig(**_SMALL, num_kv_heads=2, attention_bias=True, tie_embeddings=True)


def _random_params(cfg: ModelConfig, seed: int = 1, zero_bo: bool = False):
    """init_params with norm weights ~ 1 + 0.2·N, biases ~ 0.1·N and q/k rows of wqkv x10."""
    params = init_params(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for key in params.keys(include_nested=True, leaves_only=True):
        leaf = params.get(key)
        noise = torch.randn(leaf.shape, generator=gen)
        if key[-1] == "bo" and zero_bo:
            continue
        if leaf.ndim == 1:
            params.set(key, 1 + 0.2 * noise if key[-1] == "weight" else 0.1 * noise)
        if key[-1] == "wqkv":
            qk_rows = (cfg.num_heads + cfg.kv_heads) * cfg.head_dim
            params.set(key, torch.cat([leaf[:qk_rows] * 10, leaf[qk_rows:]]))
    return params


def _family_cases():
    cases = [(name, cfg, None) for name, cfg in LLMFN_CASES.items()]
    return [*cases, ("qwen2", QWEN2, "qwen2")]


@pytest.mark.parametrize(
    ("name", "cfg", "family"), _family_cases(), ids=[c[0] for c in _family_cases()]
)
def test_round_trip_llmfn_hf_llmfn_is_exact(name, cfg, family):
    params = _random_params(cfg, zero_bo=family == "qwen2")
    hf_config = to_hf_config(cfg, family)
    model = getattr(transformers, hf_config.architectures[0])(hf_config)
    model.load_state_dict(to_hf_state_dict(params, cfg, family), strict=True)
    back_cfg, back = from_hf(model)

    if family == "qwen2":  # True with an all-zero bo (older checkpoints): back as Qwen2's layout
        cfg = cfg.replace(attention_bias="qkv")
        params = params.exclude(*[("layers", str(i), "attn", "bo") for i in range(cfg.num_layers)])
    assert back_cfg == cfg
    keys = list(params.keys(include_nested=True, leaves_only=True))
    assert (
        list(back.keys(include_nested=True, leaves_only=True)) == keys
    )  # init order: compile guards
    for key in keys:
        assert torch.equal(back.get(key), params.get(key)), key


@pytest.mark.parametrize(
    ("name", "cfg", "family"), _family_cases(), ids=[c[0] for c in _family_cases()]
)
def test_save_hf_pretrained_loads_with_same_logits(name, cfg, family, tmp_path, measured):
    params = _random_params(cfg, zero_bo=family == "qwen2")
    save_hf_pretrained(params, cfg, tmp_path, family=family)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(model).__name__ == to_hf_config(cfg, family).architectures[0]
    tokens = _tokens()
    with torch.no_grad():
        expected = model(tokens).logits
        logits = forward(params, tokens, cfg)
    delta = _max_delta(logits, expected)
    measured[f"save_hf_pretrained {name}"] = (delta, expected.abs().max().item())
    assert delta <= TOLERANCE


def test_gpt2_weights_are_transposed_conv1d():
    cfg = LLMFN_CASES["gpt2_tied"]
    params = _random_params(cfg)
    state_dict = to_hf_state_dict(params, cfg)
    wqkv = params["layers", "1", "attn", "wqkv"]
    assert state_dict["transformer.h.1.attn.c_attn.weight"].shape == (64, 3 * 64)
    assert torch.equal(state_dict["transformer.h.1.attn.c_attn.weight"], wqkv.t())
    assert torch.equal(
        state_dict["transformer.h.0.mlp.c_fc.weight"], params["layers", "0", "mlp", "w1"].t()
    )
    assert state_dict["lm_head.weight"] is state_dict["transformer.wte.weight"]


def test_llama_qkv_and_gate_up_are_split_in_order():
    cfg = LLMFN_CASES["llama_gqa_biases_llama3"]
    params = _random_params(cfg)
    state_dict = to_hf_state_dict(params, cfg)
    wqkv, w13 = params["layers", "0", "attn", "wqkv"], params["layers", "0", "mlp", "w13"]
    prefix = "model.layers.0."
    assert torch.equal(state_dict[prefix + "self_attn.q_proj.weight"], wqkv[:64])
    assert torch.equal(state_dict[prefix + "self_attn.k_proj.weight"], wqkv[64:96])
    assert torch.equal(state_dict[prefix + "self_attn.v_proj.weight"], wqkv[96:])
    assert torch.equal(state_dict[prefix + "mlp.gate_proj.weight"], w13[:96])
    assert torch.equal(state_dict[prefix + "mlp.up_proj.weight"], w13[96:])


# --- Errors -----------------------------------------------------------------------------------
def test_unsupported_model_class_names_itself_and_the_supported_ones():
    class FalconForCausalLM:
        pass

    with pytest.raises(TypeError, match=r"FalconForCausalLM.*LlamaForCausalLM.*GPT2LMHeadModel"):
        from_hf(FalconForCausalLM())


def test_unsupported_rope_type_is_named():
    config = transformers.LlamaConfig(**_LLAMA, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match=r"rope_type='yarn'.*llama3"):
        config_from_hf(config)


def test_qwen2_mixed_sliding_layers_are_rejected():
    config = transformers.Qwen2Config(
        **_LLAMA, use_sliding_window=True, sliding_window=4, max_window_layers=1
    )
    with pytest.raises(ValueError, match="layer_types"):
        config_from_hf(config)


GPT2_STYLE = ModelConfig(
    norm_type="layernorm",
    position="learned",
    use_glu=False,
    activation="gelu",
    attention_bias=True,
    mlp_bias=True,
)


@pytest.mark.parametrize(
    ("cfg", "family", "message"),
    [
        (ModelConfig(use_moe=True), None, "use_moe"),
        (ModelConfig(position="alibi"), None, "position='alibi'"),
        (ModelConfig(attention_bias=True), "qwen2", None),  # fine
        (ModelConfig(attention_bias="qkv"), None, None),  # qwen2, window or not
        (ModelConfig(attention_bias="qkv"), "llama", "attention_bias='qkv' .* HF llama"),
        (ModelConfig(attention_bias="qkv", sliding_window=4), "mistral", "attention_bias='qkv'"),
        (GPT2_STYLE.replace(attention_bias="qkv"), "gpt2", "attention_bias='qkv'"),
        (ModelConfig(), "qwen2", "attention_bias=False"),
        (ModelConfig(mlp_bias=True, sliding_window=4), None, "mlp_bias.*mistral"),
        (ModelConfig(), "falcon", "family='falcon'"),
        (GPT2_STYLE, "gpt2", None),
        (GPT2_STYLE.replace(num_kv_heads=4), "gpt2", None),  # = num_heads: plain MHA
        (GPT2_STYLE.replace(num_kv_heads=2), "gpt2", "num_kv_heads=2 .* no grouped-query"),
    ],
)
def test_inexpressible_configs_name_the_field(cfg, family, message):
    if message is None:
        assert to_hf_config(cfg, family).model_type == (family or "qwen2")
        return
    with pytest.raises(ValueError, match=message):
        to_hf_config(cfg, family)


def test_missing_or_misshapen_hf_weights_are_named():
    model = _hf_model("llama_gqa_tied")
    cfg = config_from_hf(model.config)
    state_dict = dict(model.state_dict())
    del state_dict["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(
        KeyError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*layers\.1\.attn\.wqkv"
    ):
        from_hf_state_dict(state_dict, cfg, "llama")
    with pytest.raises(ValueError, match=r"shape .* llmfn .layers\.0\.attn\.wqkv"):
        from_hf_state_dict(model.state_dict(), cfg.replace(num_kv_heads=1), "llama")
    extra = {**model.state_dict(), "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}
    with pytest.raises(ValueError, match="q_norm"):
        from_hf_state_dict(extra, cfg, "llama")


def test_qwen2_export_refuses_a_nonzero_output_bias():
    params = _random_params(QWEN2)  # bo randomized: Qwen2 has no o_proj bias
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.bo.*model.attention_bias=qkv"):
        to_hf_state_dict(params, QWEN2, "qwen2")


def test_a_qwen2_sliding_window_model_exports_without_naming_the_family(tmp_path):
    hf_model = _hf_model("qwen2_sliding")
    cfg, params = from_hf(hf_model)
    assert cfg.attention_bias == "qkv" and cfg.sliding_window == 6
    save_hf_pretrained(params, cfg, tmp_path)  # default family: Mistral has no q/k/v biases
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    tokens = _tokens()
    with torch.no_grad():
        assert _max_delta(model(tokens).logits, hf_model(tokens).logits) <= TOLERANCE


@pytest.mark.parametrize("case", ["qwen2_qkv_bias", "qwen2_sliding"])
def test_a_fine_tuned_qwen2_exports_back_with_same_logits(case, tmp_path):
    """Import a Qwen2, take a gradient step on every leaf (an o_proj bias would move away from
    zero, which Qwen2 cannot store: an import has none), export, and compare in transformers."""
    from llmfn import loss

    cfg, params = from_hf(_hf_model(case))
    assert cfg.attention_bias == "qkv" and "bo" not in params["layers", "0", "attn"]
    tokens = _tokens(seed=1)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    grads = torch.func.grad(lambda p: loss(p, batch, cfg)[0])(params)
    tuned = params.apply(lambda p, g: p - 0.1 * g, grads)
    assert all(g.abs().max() > 0 for g in grads.values(include_nested=True, leaves_only=True))
    save_hf_pretrained(tuned, cfg, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        expected = forward(tuned, tokens, cfg)
        assert _max_delta(model(tokens).logits, expected) <= TOLERANCE
        assert _max_delta(forward(params, tokens, cfg), expected) > 100 * TOLERANCE  # it moved
    back_cfg, back = from_hf(model)
    assert back_cfg == cfg
    for key in tuned.keys(include_nested=True, leaves_only=True):
        assert torch.equal(back.get(key), tuned.get(key)), key
