"""Tiny model configs shared by the tests of the functional transforms and the module bridge."""

from llmfn.model_config import ModelConfig

DENSE = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    max_seq_len=16,
)
MOE = DENSE.replace(
    use_moe=True,
    num_experts=4,
    top_k=2,
    num_shared_experts=1,
    dropout=0.1,
    position="learned",
    norm_type="layernorm",
)
