"""`ModelConfig`: the architecture of a decoder, validated on construction.

Every other module reads the architecture from here; nothing here knows about training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
NORM_TYPES = ("rmsnorm", "layernorm")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("rope", "learned", "sinusoidal", "alibi", "none")
ROPE_SCALINGS = (None, "linear", "dynamic", "llama3")
ROPE_SCALING_FIELDS = {  # the fields each rope_scaling reads
    None: (),
    "linear": ("rope_scaling_factor",),
    "dynamic": ("rope_scaling_factor", "rope_original_max_seq_len"),
    "llama3": (
        "rope_scaling_factor",
        "rope_original_max_seq_len",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
    ),
}
BOOL_FIELDS = (
    "use_glu",
    "mlp_bias",
    "tie_embeddings",
    "use_moe",
    "activation_checkpointing",
)


def _fail(field: str, value, expected: str) -> None:
    raise ValueError(f"model.{field}={value!r} is invalid: expected {expected}")


def _check_choice(field: str, value, allowed: tuple) -> None:
    if value not in allowed:
        _fail(field, value, "one of " + ", ".join(repr(a) for a in allowed))


def _finite(value) -> bool:
    """A finite int or float (not a bool, a string or inf/nan)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_int(field: str, value, *, allow_zero: bool = False) -> None:
    ok = (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        _fail(field, value, "a non-negative integer" if allow_zero else "a positive integer")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    Defaults describe a small Llama-style model (RMSNorm, RoPE, SwiGLU, pre-norm).
    """

    vocab_size: int = 256
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None = MHA; < num_heads = GQA; 1 = MQA
    intermediate_size: int | None = None  # None = 8/3·hidden (GLU, rounded to 64) or 4·hidden
    max_seq_len: int = 256
    dropout: float = 0.0
    use_glu: bool = True
    activation: str = "silu"  # silu+glu = SwiGLU, gelu+glu = GeGLU
    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: str | None = None  # None | "linear" | "dynamic" | "llama3"
    rope_scaling_factor: float = 1.0
    rope_original_max_seq_len: int | None = None  # dynamic/llama3: the pre-scaling context
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    attention_bias: bool | str = False  # True: q/k/v and output biases; "qkv": q/k/v only
    mlp_bias: bool = False
    sliding_window: int | None = None
    tie_embeddings: bool = False
    use_moe: bool = False
    num_experts: int = 8
    top_k: int = 2
    num_shared_experts: int = 0
    moe_capacity_factor: float | None = None  # None = dropless; else overflow skips the expert
    moe_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    activation_checkpointing: bool = False
    loss_chunk_size: int = 0  # > 0: head + cross-entropy fused over chunks of this many tokens
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self._check_shape()
        self._check_scalars()
        self._check_choices()
        self._check_rope()
        if self.use_moe:
            self._check_moe()

    def _check_shape(self) -> None:
        """Sizes, and heads that divide the hidden size and each other."""
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
            _check_positive_int(name, getattr(self, name))
        for name in ("num_kv_heads", "intermediate_size", "sliding_window"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            _fail("hidden_size", self.hidden_size, f"a multiple of num_heads={self.num_heads}")
        if self.num_heads % self.kv_heads:
            _fail("num_kv_heads", self.num_kv_heads, f"a divisor of num_heads={self.num_heads}")

    def _check_scalars(self) -> None:
        """The scalars outside RoPE and MoE: the bool switches (a string such as "no" would be
        truthy), dropout, init_std, norm_eps, loss_chunk_size."""
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "a bool (True or False)")
        if not (isinstance(self.attention_bias, bool) or self.attention_bias == "qkv"):
            expected = "a bool (True: biases on q, k, v and the output) or 'qkv' (q, k, v only)"
            _fail("attention_bias", self.attention_bias, expected)
        if not (_finite(self.dropout) and 0.0 <= self.dropout < 1.0):
            _fail("dropout", self.dropout, "a float in [0, 1)")
        if not (_finite(self.init_std) and self.init_std >= 0):
            _fail("init_std", self.init_std, "a finite non-negative float")
        if not (_finite(self.norm_eps) and self.norm_eps > 0):
            _fail("norm_eps", self.norm_eps, "a finite positive float")
        _check_positive_int("loss_chunk_size", self.loss_chunk_size, allow_zero=True)

    def _check_choices(self) -> None:
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("norm_type", self.norm_type, NORM_TYPES)
        _check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        _check_choice("position", self.position, POSITIONS)
        _check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)

    def _check_rope(self) -> None:
        if self.position == "rope" and self.head_dim % 2:
            _fail(
                "hidden_size", self.hidden_size, f"an even head_dim for RoPE (got {self.head_dim})"
            )
        if not (_finite(self.rope_theta) and self.rope_theta > 0):
            _fail("rope_theta", self.rope_theta, "a finite positive float")
        if self.rope_original_max_seq_len is not None:
            _check_positive_int("rope_original_max_seq_len", self.rope_original_max_seq_len)
        self._check_unused_rope_fields()
        if self.rope_scaling is not None and not (
            _finite(self.rope_scaling_factor) and self.rope_scaling_factor >= 1.0
        ):
            _fail(
                "rope_scaling_factor",
                self.rope_scaling_factor,
                "a finite float >= 1 when rope_scaling is set",
            )
        if self.rope_scaling == "dynamic" and self.position == "rope" and self.head_dim < 4:
            # the grown base is theta · scale^(hd / (hd - 2)): hd = 2 divides by zero
            _fail(
                "hidden_size",
                self.hidden_size,
                f"head_dim >= 4 for dynamic RoPE (got {self.head_dim})",
            )
        if self.rope_scaling == "llama3":
            self._check_llama3()

    def _check_unused_rope_fields(self) -> None:
        """A scaling field the chosen rope_scaling does not read has no effect: one set anyway is
        a mistake (a forgotten or other rope_scaling), not something to ignore."""
        used = ROPE_SCALING_FIELDS[self.rope_scaling]
        for name in ROPE_SCALING_FIELDS["llama3"]:
            default = ModelConfig.__dataclass_fields__[name].default
            if name in used or getattr(self, name) == default:
                continue
            users = [kind for kind, fields in ROPE_SCALING_FIELDS.items() if name in fields]
            shown = "null" if default is None else default
            scaling = "null" if self.rope_scaling is None else self.rope_scaling
            _fail(
                name,
                getattr(self, name),
                f"{shown} (the default) while rope_scaling is {scaling}; it is read by "
                f"rope_scaling={' or '.join(users)}",
            )

    def _check_llama3(self) -> None:
        """Llama 3's band limits: 0 < low_freq_factor < high_freq_factor, both finite (the
        wavelength bands are original / factor)."""
        for name in ("rope_low_freq_factor", "rope_high_freq_factor"):
            if not (_finite(getattr(self, name)) and getattr(self, name) > 0):
                _fail(name, getattr(self, name), "a finite positive float for llama3 scaling")
        if not self.rope_low_freq_factor < self.rope_high_freq_factor:
            expected = f"< rope_high_freq_factor={self.rope_high_freq_factor} for llama3 scaling"
            _fail("rope_low_freq_factor", self.rope_low_freq_factor, expected)

    def _check_moe(self) -> None:
        _check_positive_int("num_experts", self.num_experts)
        _check_positive_int("top_k", self.top_k)
        _check_positive_int("num_shared_experts", self.num_shared_experts, allow_zero=True)
        if self.top_k > self.num_experts:
            _fail("top_k", self.top_k, f"<= num_experts={self.num_experts}")
        capacity = self.moe_capacity_factor
        if capacity is not None and not (_finite(capacity) and capacity > 0):
            _fail("moe_capacity_factor", capacity, "None (dropless) or a finite positive float")
        for name in ("moe_aux_loss_coef", "router_z_loss_coef"):
            if not (_finite(getattr(self, name)) and getattr(self, name) >= 0):
                _fail(name, getattr(self, name), "a finite non-negative float")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def qkv_bias(self) -> bool:
        """Whether the q/k/v projection has a bias (`attn.bqkv`)."""
        return self.attention_bias is not False

    @property
    def output_bias(self) -> bool:
        """Whether the attention's output projection has a bias (`attn.bo`)."""
        return self.attention_bias is True

    @property
    def ffn_size(self) -> int:
        """The MLP's hidden width (per expert for MoE)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.use_glu:
            return 64 * -(-int(8 * self.hidden_size / 3) // 64)
        return 4 * self.hidden_size

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
