"""Hugging Face transformers <-> llmfn: config maps, declarative weight-name maps, save/load.

    cfg, params = from_hf(hf_model)                    # LlamaForCausalLM, GPT2LMHeadModel, ...
    state_dict = to_hf_state_dict(params, cfg)         # HF names and layouts
    save_hf_pretrained(params, cfg, "out/")            # AutoModelForCausalLM.from_pretrained("out/")

Families: "llama", "mistral" (sliding window), "qwen2" (q/k/v bias, no o_proj bias:
attention_bias="qkv") and "gpt2" (LayerNorm, learned positions, Conv1D weights stored
[in, out]). `to_*` functions take a `family` argument; its default (`default_family`) is "gpt2"
for learned positions, "qwen2" for attention_bias="qkv" or a sliding window with attention
biases, "mistral" for a window without, "llama" otherwise.

Name maps go llmfn key -> HF key, with "{}" for the layer index. A tuple of HF keys is fused
in llmfn along dim 0: q/k/v -> `attn.wqkv`, gate/up -> `mlp.w13`.
transformers is a dev-only dependency, imported inside the functions that need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from tensordict import TensorDict

from llmfn.model import param_shapes
from llmfn.model_config import ModelConfig

_LLAMA_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.attn.wqkv": (
        "model.layers.{}.self_attn.q_proj.weight",
        "model.layers.{}.self_attn.k_proj.weight",
        "model.layers.{}.self_attn.v_proj.weight",
    ),
    "layers.{}.attn.wo": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.attn.bqkv": (
        "model.layers.{}.self_attn.q_proj.bias",
        "model.layers.{}.self_attn.k_proj.bias",
        "model.layers.{}.self_attn.v_proj.bias",
    ),
    "layers.{}.attn.bo": "model.layers.{}.self_attn.o_proj.bias",
    "layers.{}.mlp_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.mlp.w13": (
        "model.layers.{}.mlp.gate_proj.weight",
        "model.layers.{}.mlp.up_proj.weight",
    ),
    "layers.{}.mlp.w2": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.mlp.b13": ("model.layers.{}.mlp.gate_proj.bias", "model.layers.{}.mlp.up_proj.bias"),
    "layers.{}.mlp.b2": "model.layers.{}.mlp.down_proj.bias",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

_GPT2_NAMES = {
    "embed.weight": "transformer.wte.weight",
    "pos.weight": "transformer.wpe.weight",
    "layers.{}.attn_norm.weight": "transformer.h.{}.ln_1.weight",
    "layers.{}.attn_norm.bias": "transformer.h.{}.ln_1.bias",
    "layers.{}.attn.wqkv": "transformer.h.{}.attn.c_attn.weight",
    "layers.{}.attn.wo": "transformer.h.{}.attn.c_proj.weight",
    "layers.{}.attn.bqkv": "transformer.h.{}.attn.c_attn.bias",
    "layers.{}.attn.bo": "transformer.h.{}.attn.c_proj.bias",
    "layers.{}.mlp_norm.weight": "transformer.h.{}.ln_2.weight",
    "layers.{}.mlp_norm.bias": "transformer.h.{}.ln_2.bias",
    "layers.{}.mlp.w1": "transformer.h.{}.mlp.c_fc.weight",
    "layers.{}.mlp.w2": "transformer.h.{}.mlp.c_proj.weight",
    "layers.{}.mlp.b1": "transformer.h.{}.mlp.c_fc.bias",
    "layers.{}.mlp.b2": "transformer.h.{}.mlp.c_proj.bias",
    "final_norm.weight": "transformer.ln_f.weight",
    "final_norm.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class Family:
    """How one HF architecture stores an llmfn model."""

    name: str
    model_class: str  # the transformers *ForCausalLM class
    config_class: str  # its transformers config class
    names: dict[str, str | tuple[str, ...]]  # llmfn key -> HF key(s), "{}" = layer index
    conv1d: frozenset[str] = field(default_factory=frozenset)  # llmfn keys HF stores [in, out]
    zero_in_hf: frozenset[str] = field(default_factory=frozenset)  # llmfn leaves HF lacks (zeros)


FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", "LlamaConfig", _LLAMA_NAMES),
    "mistral": Family("mistral", "MistralForCausalLM", "MistralConfig", _LLAMA_NAMES),
    "qwen2": Family(
        "qwen2",
        "Qwen2ForCausalLM",
        "Qwen2Config",
        _LLAMA_NAMES,
        zero_in_hf=frozenset({"layers.{}.attn.bo"}),
    ),
    "gpt2": Family(
        "gpt2",
        "GPT2LMHeadModel",
        "GPT2Config",
        _GPT2_NAMES,
        conv1d=frozenset(
            {"layers.{}.attn.wqkv", "layers.{}.attn.wo", "layers.{}.mlp.w1", "layers.{}.mlp.w2"}
        ),
    ),
}
_FAMILY_OF_CLASS = {family.model_class: family for family in FAMILIES.values()}
_SUPPORTED_CLASSES = ", ".join(_FAMILY_OF_CLASS)
_IGNORED_HF_SUFFIXES = (
    "rotary_emb.inv_freq",
    ".attn.bias",
    ".attn.masked_bias",
)  # buffers, not weights

# HF activation name -> llmfn activation; llmfn -> HF per family.
_ACTIVATION_FROM_HF = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}
_ACTIVATION_TO_HF = {
    "silu": "silu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "relu": "relu",
}
_GPT2_ACTIVATION_TO_HF = {**_ACTIVATION_TO_HF, "gelu_tanh": "gelu_new"}
_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
LLMFN_MAX_SEQ_LEN = "llmfn_max_seq_len"  # HF config key: a dynamic-RoPE model's max_seq_len


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "llmfn.hf needs the `transformers` package (a dev dependency): pip install 'transformers>=4.57'"
        ) from error
    return transformers


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(
            f"family={name!r} is not supported: expected one of {', '.join(map(repr, FAMILIES))}"
        )
    return FAMILIES[name]


def check_model_type(model_type) -> None:
    """ValueError unless `model_type` (an HF config.json's) is one of FAMILIES; checked before
    transformers loads a folder, whose own error for an unknown type is several paragraphs."""
    if model_type not in FAMILIES:
        *others, last = FAMILIES
        raise ValueError(
            f"model_type {model_type!r} is not supported: expected {', '.join(others)} or {last}"
        )


def default_family(cfg: ModelConfig) -> str:
    """ "gpt2" for learned positions; "qwen2" for Qwen2's q/k/v-only biases
    (attention_bias="qkv"); with a sliding window "qwen2" if the attention has biases (Mistral
    has none; an all-zero output bias is dropped), else "mistral"; otherwise "llama" (which has
    the biases, no window)."""
    if cfg.position == "learned":
        return "gpt2"
    if cfg.attention_bias == "qkv":
        return "qwen2"
    if cfg.sliding_window is None:
        return "llama"
    return "qwen2" if cfg.attention_bias else "mistral"


# --- Names ------------------------------------------------------------------------------------
def _pattern(key: str) -> tuple[str, str | None]:
    """ "layers.3.attn.wqkv" -> ("layers.{}.attn.wqkv", "3"); other keys -> (key, None)."""
    parts = key.split(".")
    if parts[0] == "layers":
        return ".".join(["layers", "{}", *parts[2:]]), parts[1]
    return key, None


def _hf_names(family: Family, key: str) -> tuple[tuple[str, ...], str]:
    """llmfn key -> (its HF key(s), its pattern). Raises for keys the family cannot store."""
    pattern, layer = _pattern(key)
    if pattern not in family.names:
        raise ValueError(
            f"llmfn parameter {key!r} has no counterpart in HF {family.model_class} (family={family.name!r})"
        )
    names = family.names[pattern]
    names = names if isinstance(names, tuple) else (names,)
    return tuple(name.format(layer) for name in names), pattern


def _leaf_keys(params: TensorDict) -> list[str]:
    return [".".join(key) for key in params.keys(include_nested=True, leaves_only=True)]


def _nest(flat: dict[str, torch.Tensor]) -> TensorDict:
    """{"a.b.c": tensor} (in order) -> a nested TensorDict with the same key order."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return TensorDict(tree, batch_size=[])


# --- HF -> llmfn ------------------------------------------------------------------------------
def from_hf_state_dict(
    state_dict: dict[str, torch.Tensor], cfg: ModelConfig, family: str
) -> TensorDict:
    """An HF state dict (HF names and layouts) -> llmfn params for `cfg`, keys in init order.

    Copies every tensor (the result never aliases the HF model). Raises on a missing HF key, a
    shape mismatch, or an HF weight llmfn would drop.
    """
    fam = get_family(family)
    flat, used = {}, set()
    for key, expected in param_shapes(cfg).items():
        names, pattern = _hf_names(fam, key)
        if pattern in fam.zero_in_hf:
            like = state_dict[fam.names["embed.weight"]]
            flat[key] = torch.zeros(expected, dtype=like.dtype, device=like.device)
            continue
        missing = [name for name in names if name not in state_dict]
        if missing:
            raise KeyError(
                f"HF {fam.model_class} state dict has no {missing[0]!r} (needed for llmfn {key!r})"
            )
        parts = [state_dict[name].detach() for name in names]
        if pattern in fam.conv1d:
            parts = [part.t() for part in parts]
        value = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0].clone()
        if tuple(value.shape) != expected:
            raise ValueError(
                f"HF {' + '.join(names)}: shape {tuple(value.shape)} != llmfn {key!r} {expected}"
            )
        flat[key] = value.contiguous()
        used.update(names)
    if cfg.tie_embeddings:
        used.add("lm_head.weight")
    unused = [
        name for name in state_dict if name not in used and not name.endswith(_IGNORED_HF_SUFFIXES)
    ]
    if unused:
        raise ValueError(
            f"HF {fam.model_class} weights with no llmfn counterpart (they would be dropped): {unused}"
        )
    return _nest(flat)


def _rope_parameters(hf_config) -> dict:
    """The HF RoPE dict (transformers 5 `rope_parameters`, or 4.x `rope_scaling` + `rope_theta`)."""
    params = dict(
        getattr(hf_config, "rope_parameters", None)
        or getattr(hf_config, "rope_scaling", None)
        or {}
    )
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def _rope_fields(hf_config) -> dict:
    """ModelConfig RoPE fields from an HF config's RoPE dict."""
    rope = _rope_parameters(hf_config)
    kind = rope["rope_type"]
    where = f"{type(hf_config).__name__}.rope_parameters"
    if kind not in _ROPE_TYPES:
        raise ValueError(
            f"{where}.rope_type={kind!r} is not supported: expected one of {', '.join(_ROPE_TYPES)}"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"{where}.partial_rotary_factor={rope['partial_rotary_factor']} is not supported: expected 1.0"
        )
    fields = {"rope_theta": float(rope["rope_theta"])}
    if kind == "default":
        return fields
    fields.update(rope_scaling=kind, rope_scaling_factor=float(rope["factor"]))
    if kind == "llama3":
        fields.update(
            rope_original_max_seq_len=int(rope["original_max_position_embeddings"]),
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
        )
    if kind == "dynamic":
        fields.update(_dynamic_context(hf_config))
    return fields


def _dynamic_context(hf_config) -> dict:
    """Dynamic NTK: HF scales from max_position_embeddings, the original context. An llmfn
    export with rope_original_max_seq_len records its max_seq_len as `llmfn_max_seq_len` (HF
    has no such field), so the round trip keeps both; other models get max_seq_len = the
    original context."""
    max_seq_len = getattr(hf_config, LLMFN_MAX_SEQ_LEN, None)
    if max_seq_len is None:
        return {}
    return {
        "max_seq_len": max_seq_len,
        "rope_original_max_seq_len": hf_config.max_position_embeddings,
    }


def _activation_from_hf(hf_config, name: str) -> str:
    if name not in _ACTIVATION_FROM_HF:
        expected = ", ".join(_ACTIVATION_FROM_HF)
        raise ValueError(
            f"{type(hf_config).__name__} activation {name!r} is not supported: expected one of {expected}"
        )
    return _ACTIVATION_FROM_HF[name]


def _sliding_window_from_hf(hf_config, family: str) -> int | None:
    if family == "mistral":
        return hf_config.sliding_window
    if family != "qwen2" or not getattr(hf_config, "use_sliding_window", False):
        return None
    layer_types = set(getattr(hf_config, "layer_types", None) or ["sliding_attention"])
    if layer_types != {"sliding_attention"}:
        raise ValueError(
            f"Qwen2Config.layer_types={hf_config.layer_types} mixes full and sliding attention: llmfn "
            "needs one sliding_window for every layer (set max_window_layers=0 or use_sliding_window=False)"
        )
    return hf_config.sliding_window


def _attention_bias_from_hf(hf_config, family: str) -> bool | str:
    """Qwen2: q/k/v biases only ("qkv"); Llama's attention_bias also puts one on o_proj."""
    if family == "qwen2":
        return "qkv"
    return bool(getattr(hf_config, "attention_bias", False))


def _llama_like_config(hf_config, family: str) -> ModelConfig:
    name = type(hf_config).__name__
    head_dim = (
        getattr(hf_config, "head_dim", None)
        or hf_config.hidden_size // hf_config.num_attention_heads
    )
    if head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise ValueError(
            f"{name}.head_dim={head_dim} is not supported: expected hidden_size / num_attention_heads"
        )
    kv_heads = hf_config.num_key_value_heads or hf_config.num_attention_heads
    fields = dict(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=None if kv_heads == hf_config.num_attention_heads else kv_heads,
        intermediate_size=hf_config.intermediate_size,
        max_seq_len=hf_config.max_position_embeddings,
        use_glu=True,
        activation=_activation_from_hf(hf_config, hf_config.hidden_act),
        norm_type="rmsnorm",
        norm_eps=hf_config.rms_norm_eps,
        position="rope",
        attention_bias=_attention_bias_from_hf(hf_config, family),
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        sliding_window=_sliding_window_from_hf(hf_config, family),
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        init_std=hf_config.initializer_range,
    )
    return ModelConfig(**{**fields, **_rope_fields(hf_config)})


def _gpt2_config(hf_config) -> ModelConfig:
    unsupported = {
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "add_cross_attention": False,
    }
    for name, expected in unsupported.items():
        if getattr(hf_config, name, expected) != expected:
            raise ValueError(
                f"GPT2Config.{name}={getattr(hf_config, name)!r} is not supported: expected {expected}"
            )
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.n_embd,
        num_layers=hf_config.n_layer,
        num_heads=hf_config.n_head,
        intermediate_size=hf_config.n_inner,
        max_seq_len=hf_config.n_positions,
        dropout=float(
            hf_config.resid_pdrop
        ),  # residual + embedding dropout; attention dropout has no twin
        use_glu=False,
        activation=_activation_from_hf(hf_config, hf_config.activation_function),
        norm_type="layernorm",
        norm_eps=hf_config.layer_norm_epsilon,
        position="learned",
        attention_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        init_std=hf_config.initializer_range,
    )


def config_from_hf(hf_config) -> ModelConfig:
    """A transformers config (Llama, Mistral, Qwen2, GPT2) -> ModelConfig."""
    family = getattr(hf_config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(
            f"HF config model_type={family!r} ({type(hf_config).__name__}) is not supported: "
            f"expected one of {', '.join(map(repr, FAMILIES))}"
        )
    return _gpt2_config(hf_config) if family == "gpt2" else _llama_like_config(hf_config, family)


def from_hf(model) -> tuple[ModelConfig, TensorDict]:
    """A transformers causal LM -> (ModelConfig, params) with the same logits.

    Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel.
    Params are copies on the model's device and dtype.
    """
    class_name = type(model).__name__
    if class_name not in _FAMILY_OF_CLASS:
        raise TypeError(
            f"from_hf: {class_name} is not supported: expected one of {_SUPPORTED_CLASSES}"
        )
    family = _FAMILY_OF_CLASS[class_name].name
    cfg = config_from_hf(model.config)
    return cfg, from_hf_state_dict(model.state_dict(), cfg, family)


# --- llmfn -> HF ------------------------------------------------------------------------------
def _require(cfg: ModelConfig, family: str, **expected) -> None:
    for name, value in expected.items():
        actual = getattr(cfg, name)
        if actual != value:
            raise ValueError(
                f"model.{name}={actual!r} cannot be expressed as HF {family}: expected {value!r}"
            )


def _check_expressible(cfg: ModelConfig, family: str) -> None:
    _require(cfg, family, use_moe=False, norm_position="pre")
    if family == "gpt2":
        _require(
            cfg,
            family,
            norm_type="layernorm",
            position="learned",
            use_glu=False,
            attention_bias=True,
        )
        _require(cfg, family, mlp_bias=True, sliding_window=None)
        if cfg.kv_heads != cfg.num_heads:
            raise ValueError(
                f"model.num_kv_heads={cfg.num_kv_heads} cannot be expressed as HF gpt2: expected "
                f"None or num_heads={cfg.num_heads} (GPT-2 has no grouped-query attention)"
            )
        return
    _require(cfg, family, norm_type="rmsnorm", position="rope", use_glu=True)
    if family == "llama":
        _require(cfg, family, sliding_window=None)
        if cfg.attention_bias == "qkv":
            raise ValueError(
                "model.attention_bias='qkv' cannot be expressed as HF llama: expected True or "
                "False (Llama's attention_bias also puts a bias on o_proj); use --family qwen2"
            )
    elif family == "mistral":
        _require(cfg, family, attention_bias=False, mlp_bias=False)
    elif family == "qwen2":
        _require(cfg, family, mlp_bias=False)
        if not cfg.attention_bias:
            raise ValueError(
                "model.attention_bias=False cannot be expressed as HF qwen2: expected 'qkv' "
                "(or True with an all-zero output bias)"
            )


def _resolve_family(cfg: ModelConfig, family: str | None) -> Family:
    """The Family named `family` (default: `default_family(cfg)`), once cfg is known to fit it."""
    fam = get_family(family or default_family(cfg))
    _check_expressible(cfg, fam.name)
    return fam


def _rope_scaling_to_hf(cfg: ModelConfig) -> dict | None:
    if cfg.rope_scaling is None:
        return None
    rope = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
    if cfg.rope_scaling == "llama3":
        rope.update(
            original_max_position_embeddings=cfg.rope_original_max_seq_len or cfg.max_seq_len,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
        )
    return rope


def _token_id(default: int, cfg: ModelConfig) -> int | None:
    """An HF default special-token id, or None when it is outside the vocabulary."""
    return default if default < cfg.vocab_size else None


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """An llmfn tokenizer (`llmfn.data.Tokenizer`) -> the HF config's {"bos_token_id",
    "eos_token_id", "pad_token_id"}: its bos_id, eos_id and pad_id, None where it has no such
    token (all None for tokenizer=None). HF `generate` stops at eos_token_id."""
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }


def _llama_like_hf_fields(cfg: ModelConfig, family: str) -> dict:
    """The keyword arguments of the family's HF config (LlamaConfig, MistralConfig, Qwen2Config)."""
    # HF dynamic NTK scales from max_position_embeddings: that must be the original context.
    original = cfg.rope_original_max_seq_len if cfg.rope_scaling == "dynamic" else None
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        hidden_act=_ACTIVATION_TO_HF[cfg.activation],
        max_position_embeddings=original or cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope_theta,
        rope_scaling=_rope_scaling_to_hf(cfg),
        bos_token_id=_token_id(1, cfg),
        eos_token_id=_token_id(2, cfg),
    )
    if original:
        common[LLMFN_MAX_SEQ_LEN] = cfg.max_seq_len  # read back by `_dynamic_context`
    if family == "llama":
        common.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    elif family == "mistral":
        common.update(sliding_window=cfg.sliding_window, head_dim=cfg.head_dim)
    else:
        window = cfg.sliding_window is not None
        common.update(
            use_sliding_window=window, sliding_window=cfg.sliding_window, max_window_layers=0
        )
    return common


def _gpt2_hf_fields(cfg: ModelConfig) -> dict:
    """The keyword arguments of GPT2Config."""
    return dict(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size,
        activation_function=_GPT2_ACTIVATION_TO_HF[cfg.activation],
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=0.0,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=_token_id(50256, cfg),
        eos_token_id=_token_id(50256, cfg),
    )


def to_hf_config(
    cfg: ModelConfig, family: str | None = None, *, token_ids: dict[str, int | None] | None = None
):
    """ModelConfig -> a transformers config (LlamaConfig, MistralConfig, Qwen2Config or GPT2Config).

    family defaults to `default_family(cfg)`; raises if cfg has a feature the family lacks.
    token_ids: bos/eos/pad_token_id, e.g. `special_token_ids(tokenizer)`; without it the HF
    family's defaults (Llama's bos 1 / eos 2, GPT-2's 50256), which fit only a tokenizer that
    uses them.
    """
    fam = _resolve_family(cfg, family)
    if fam.name == "gpt2":
        fields = _gpt2_hf_fields(cfg)
    else:
        fields = _llama_like_hf_fields(cfg, fam.name)
    fields.update(token_ids or {})
    hf_config = getattr(_transformers(), fam.config_class)(**fields)
    hf_config.architectures = [fam.model_class]
    return hf_config


def to_hf_state_dict(
    params: TensorDict, cfg: ModelConfig, family: str | None = None
) -> dict[str, torch.Tensor]:
    """llmfn params -> {HF name: tensor}, loadable with `hf_model.load_state_dict(sd)` (strict).

    Fused weights are split; GPT-2 Conv1D weights are transposed to [in, out]. Every tensor is
    a contiguous copy. With tie_embeddings, "lm_head.weight" is the embedding tensor itself (as
    in HF's own state_dict); `save_hf_pretrained` leaves it out of the file.
    """
    fam = _resolve_family(cfg, family)
    state_dict = {}
    for key in _leaf_keys(params):
        value = params.get(tuple(key.split(".")))
        names, pattern = _hf_names(fam, key)
        if pattern in fam.zero_in_hf:
            if value.count_nonzero():
                raise ValueError(
                    f"llmfn {key!r} is nonzero but HF {fam.model_class} has no such weight: "
                    "model.attention_bias=true trains an output bias; train with "
                    "model.attention_bias=qkv (q/k/v biases only) to export as Qwen2"
                )
            continue
        if len(names) == 1:
            parts = [value]
        elif pattern.endswith("qkv"):
            q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
            parts = value.split([q_rows, kv_rows, kv_rows], dim=0)
        else:
            parts = value.chunk(len(names), dim=0)
        for name, part in zip(names, parts, strict=True):
            part = part.t() if pattern in fam.conv1d else part
            state_dict[name] = part.contiguous().clone()
    if cfg.tie_embeddings:
        state_dict["lm_head.weight"] = state_dict[fam.names["embed.weight"]]
    return state_dict


def save_hf_pretrained(
    params: TensorDict,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    family: str | None = None,
    *,
    token_ids: dict[str, int | None] | None = None,
) -> None:
    """Write out_dir/config.json and out_dir/model.safetensors for
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)`. token_ids: as in
    `to_hf_config` (pass `special_token_ids(tokenizer)` so HF generate stops at its EOS)."""
    from safetensors.torch import save_file

    hf_config = to_hf_config(cfg, family, token_ids=token_ids)
    dtype = next(iter(params.values(include_nested=True, leaves_only=True))).dtype
    setattr(
        hf_config,
        "dtype" if hasattr(hf_config, "dtype") else "torch_dtype",
        str(dtype).removeprefix("torch."),
    )
    state_dict = to_hf_state_dict(params, cfg, family)
    if cfg.tie_embeddings:
        del state_dict["lm_head.weight"]  # HF re-ties it on load
    os.makedirs(out_dir, exist_ok=True)
    hf_config.save_pretrained(out_dir)
    tensors = {name: tensor.detach().cpu() for name, tensor in state_dict.items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
