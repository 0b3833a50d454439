"""`ModelConfig` validation: every bad value raises ValueError naming the field, the value and
what is allowed; good configs construct and derive the right sizes."""

import pytest

from llmfn.model_config import ModelConfig

INF, NAN = float("inf"), float("nan")

# (overrides, field named in the message, text describing what is allowed)
INVALID = [
    ({"vocab_size": 0}, "vocab_size", "positive integer"),
    ({"hidden_size": -8}, "hidden_size", "positive integer"),
    ({"num_layers": 0}, "num_layers", "positive integer"),
    ({"num_heads": 0}, "num_heads", "positive integer"),
    ({"max_seq_len": 0}, "max_seq_len", "positive integer"),
    ({"vocab_size": 2.5}, "vocab_size", "positive integer"),
    ({"num_layers": True}, "num_layers", "positive integer"),
    ({"num_kv_heads": 0}, "num_kv_heads", "positive integer"),
    ({"intermediate_size": 0}, "intermediate_size", "positive integer"),
    ({"sliding_window": 0}, "sliding_window", "positive integer"),
    ({"hidden_size": 30, "num_heads": 4}, "hidden_size", "multiple of num_heads=4"),
    ({"num_heads": 4, "num_kv_heads": 3}, "num_kv_heads", "divisor of num_heads=4"),
    ({"num_heads": 4, "num_kv_heads": 8}, "num_kv_heads", "divisor of num_heads=4"),
    ({"dropout": 1.0}, "dropout", "[0, 1)"),
    ({"dropout": -0.1}, "dropout", "[0, 1)"),
    ({"activation": "swish"}, "activation", "'silu'"),
    ({"norm_type": "batchnorm"}, "norm_type", "'rmsnorm'"),
    ({"norm_position": "sandwich"}, "norm_position", "'pre'"),
    ({"position": "rotary"}, "position", "'rope'"),
    ({"rope_scaling": "yarn"}, "rope_scaling", "'llama3'"),
    ({"norm_eps": 0.0}, "norm_eps", "positive float"),
    ({"rope_theta": -1.0}, "rope_theta", "positive float"),
    ({"hidden_size": 12, "num_heads": 4}, "hidden_size", "even head_dim"),
    ({"rope_scaling": "linear", "rope_scaling_factor": 0.5}, "rope_scaling_factor", ">= 1"),
    ({"use_moe": True, "num_experts": 0}, "num_experts", "positive integer"),
    ({"use_moe": True, "top_k": 0}, "top_k", "positive integer"),
    ({"use_moe": True, "num_experts": 2, "top_k": 3}, "top_k", "<= num_experts=2"),
    ({"use_moe": True, "num_shared_experts": -1}, "num_shared_experts", "non-negative integer"),
    ({"use_moe": True, "moe_capacity_factor": 0.0}, "moe_capacity_factor", "positive float"),
    ({"use_moe": True, "moe_aux_loss_coef": -0.01}, "moe_aux_loss_coef", "non-negative float"),
    ({"use_moe": True, "router_z_loss_coef": -1.0}, "router_z_loss_coef", "non-negative float"),
    ({"dropout": "0.1"}, "dropout", "[0, 1)"),
    ({"init_std": -0.02}, "init_std", "non-negative float"),
    ({"rope_original_max_seq_len": 0}, "rope_original_max_seq_len", "positive integer"),
    # scaling fields without rope_scaling would be silently ignored
    ({"rope_scaling_factor": 2.0}, "rope_scaling_factor", "1.0 (the default) while rope_scaling"),
    (
        {"rope_original_max_seq_len": 16},
        "rope_original_max_seq_len",
        "null (the default) while rope_scaling is null; it is read by rope_scaling=dynamic or llama3",
    ),
    # ... and so would fields the chosen scaling does not read
    (
        {"rope_scaling": "linear", "rope_scaling_factor": 2.0, "rope_original_max_seq_len": 16},
        "rope_original_max_seq_len",
        "while rope_scaling is linear; it is read by rope_scaling=dynamic or llama3",
    ),
    (
        {"rope_scaling": "dynamic", "rope_scaling_factor": 2.0, "rope_low_freq_factor": 2.0},
        "rope_low_freq_factor",
        "1.0 (the default) while rope_scaling is dynamic; it is read by rope_scaling=llama3",
    ),
    (
        {"rope_scaling": "llama3", "rope_scaling_factor": 8.0, "rope_low_freq_factor": 4.0},
        "rope_low_freq_factor",
        "< rope_high_freq_factor=4.0",
    ),
    # llama3 bands are original / factor: a zero factor divided by zero, a negative one inverted
    ({"rope_scaling": "llama3", "rope_low_freq_factor": 0.0}, "rope_low_freq_factor", "positive"),
    ({"rope_scaling": "llama3", "rope_low_freq_factor": -1.0}, "rope_low_freq_factor", "positive"),
    (
        {"rope_scaling": "llama3", "rope_high_freq_factor": INF},
        "rope_high_freq_factor",
        "finite positive",
    ),
    # dynamic NTK grows the base by scale^(hd / (hd - 2)): head_dim 2 divided by zero
    (
        {"hidden_size": 8, "num_heads": 4, "rope_scaling": "dynamic", "rope_scaling_factor": 2.0},
        "hidden_size",
        "head_dim >= 4 for dynamic RoPE (got 2)",
    ),
    # bools: a string is truthy ("no" would tie the embeddings)
    ({"tie_embeddings": "no"}, "tie_embeddings", "a bool"),
    ({"use_glu": "false"}, "use_glu", "a bool"),
    ({"attention_bias": 1}, "attention_bias", "a bool"),  # 1 == True, but not a bool
    ({"attention_bias": "true"}, "attention_bias", "or 'qkv' (q, k, v only)"),
    ({"attention_bias": "QKV"}, "attention_bias", "or 'qkv' (q, k, v only)"),
    ({"mlp_bias": None}, "mlp_bias", "a bool"),
    ({"use_moe": "true"}, "use_moe", "a bool"),
    ({"activation_checkpointing": 0}, "activation_checkpointing", "a bool"),
    # floats: inf or nan where only a finite value makes sense, and strings
    ({"init_std": INF}, "init_std", "finite non-negative float"),
    ({"init_std": NAN}, "init_std", "finite non-negative float"),
    ({"norm_eps": INF}, "norm_eps", "finite positive float"),
    ({"rope_theta": INF}, "rope_theta", "finite positive float"),
    ({"rope_theta": "1e4"}, "rope_theta", "finite positive float"),
    ({"dropout": NAN}, "dropout", "[0, 1)"),
    ({"rope_scaling": "linear", "rope_scaling_factor": INF}, "rope_scaling_factor", "finite"),
    ({"use_moe": True, "moe_aux_loss_coef": INF}, "moe_aux_loss_coef", "finite non-negative"),
    ({"use_moe": True, "router_z_loss_coef": INF}, "router_z_loss_coef", "finite non-negative"),
    ({"use_moe": True, "moe_capacity_factor": INF}, "moe_capacity_factor", "finite positive"),
]


@pytest.mark.parametrize(("overrides", "field", "allowed"), INVALID, ids=lambda v: str(v))
def test_invalid_value_raises_naming_field_value_and_allowed(overrides, field, allowed):
    with pytest.raises(ValueError) as err:
        ModelConfig(**overrides)
    message = str(err.value)
    assert f"model.{field}=" in message
    assert repr(overrides.get(field, ModelConfig.__dataclass_fields__[field].default)) in message
    assert allowed in message


def test_enum_error_lists_every_allowed_choice():
    with pytest.raises(ValueError, match="model.position='rotary'") as err:
        ModelConfig(position="rotary")
    for choice in ("rope", "learned", "sinusoidal", "alibi", "none"):
        assert repr(choice) in str(err.value)


def test_moe_fields_are_ignored_when_moe_is_off():
    cfg = ModelConfig(use_moe=False, num_experts=2, top_k=3)
    assert cfg.top_k == 3


def test_rope_scaling_fields_at_their_defaults_are_fine_without_rope_scaling():
    assert ModelConfig(rope_scaling_factor=1, rope_original_max_seq_len=None).rope_scaling is None
    scaled = ModelConfig(rope_scaling="linear", rope_scaling_factor=2.0)
    assert scaled.replace(rope_scaling=None, rope_scaling_factor=1.0).rope_scaling_factor == 1.0


def test_odd_head_dim_is_fine_without_rope():
    assert ModelConfig(hidden_size=12, num_heads=4, position="alibi").head_dim == 3


@pytest.mark.parametrize(
    ("overrides", "kv_heads"),
    [({}, 4), ({"num_kv_heads": 2}, 2), ({"num_kv_heads": 1}, 1), ({"num_kv_heads": 4}, 4)],
)
def test_kv_heads_mha_gqa_mqa(overrides, kv_heads):
    assert ModelConfig(num_heads=4, **overrides).kv_heads == kv_heads


def test_derived_sizes():
    cfg = ModelConfig(hidden_size=96, num_heads=6)
    assert cfg.head_dim == 16
    assert cfg.ffn_size == 256  # 8/3·96 = 256, already a multiple of 64
    assert ModelConfig(hidden_size=100, num_heads=5).ffn_size == 320  # 266 rounded up to 64
    assert ModelConfig(hidden_size=64, use_glu=False).ffn_size == 256
    assert ModelConfig(hidden_size=64, intermediate_size=100).ffn_size == 100


def test_config_is_frozen_and_replace_revalidates():
    cfg = ModelConfig()
    with pytest.raises(AttributeError):
        cfg.hidden_size = 8  # type: ignore[misc]
    assert cfg.replace(num_layers=2).num_layers == 2
    with pytest.raises(ValueError, match="model.num_kv_heads=3"):
        cfg.replace(num_kv_heads=3)


def test_to_dict_round_trips():
    cfg = ModelConfig(num_kv_heads=2, use_moe=True, position="alibi")
    assert ModelConfig(**cfg.to_dict()) == cfg


def test_valid_edge_values_still_construct():
    assert ModelConfig(hidden_size=16, num_heads=4, rope_scaling="dynamic").head_dim == 4
    assert ModelConfig(rope_theta=10000, init_std=0, dropout=0).rope_theta == 10000  # ints
    cfg = ModelConfig(rope_scaling="llama3", rope_low_freq_factor=0.5, rope_high_freq_factor=2.0)
    assert cfg.rope_low_freq_factor == 0.5
    # rope fields are not read without RoPE, so a dynamic head_dim of 2 is fine there
    assert ModelConfig(hidden_size=8, num_heads=4, position="alibi", rope_scaling="dynamic")


@pytest.mark.parametrize(
    ("attention_bias", "leaves"),
    [(False, set()), (True, {"bqkv", "bo"}), ("qkv", {"bqkv"})],
)
def test_attention_bias_chooses_the_bias_leaves(attention_bias, leaves):
    """True: biases on q, k, v and the output (Llama, GPT-2); "qkv": q, k, v only (Qwen2)."""
    from llmfn.model import init_params, param_shapes

    cfg = ModelConfig(hidden_size=16, num_heads=4, num_layers=1, attention_bias=attention_bias)
    attn = init_params(cfg)["layers", "0", "attn"]
    assert set(attn.keys()) - {"wqkv", "wo"} == leaves
    shapes = param_shapes(cfg)
    assert {key.split(".")[-1] for key in shapes if ".attn.b" in key} == leaves


def test_attention_bias_qkv_through_the_config_loader():
    from llmfn.config import ConfigError, load_config

    config = load_config(None, ["model.attention_bias=qkv"], {})
    assert config.model.attention_bias == "qkv"
    assert load_config(None, ["model.attention_bias=true"], {}).model.attention_bias is True
    with pytest.raises(ConfigError, match=r"model.attention_bias='q' is invalid: expected a bool"):
        load_config(None, ["model.attention_bias=q"], {})
