"""About how much memory a train step needs, and a warning at start when a CPU run will not fit.

On a GPU an oversized batch fails at once with an out-of-memory error; on a CPU it swaps, or
takes all of the machine's memory before the first step ends (a GPU config started on a
laptop). So a CPU run estimates first. The estimate is coarse: for the compiled 15M bench
model (fp32, T256) it gives 456 and 912 MB of activations and logits at B8 and B16, where
400-475 and 847-1,072 MB were measured above the state (docs/performance.md); it only has to
tell 4 GB from 40 GB.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llmfn.model_config import ModelConfig

STATE_BYTES_PER_PARAM = {"adamw": 16, "lion": 12, "sgd": 12}  # params, grads, moments (fp32)
EAGER_FACTOR = 1.8  # eager torch.func.grad's peak over the compiled step's (DESIGN.md §3)


def activation_values_per_token(cfg: ModelConfig) -> int:
    """Values one token keeps per layer for the backward: the residual stream twice, q, k, v,
    the attention output, the MLP's gate/up projection and activation (the block's input only,
    with activation checkpointing)."""
    if cfg.activation_checkpointing:
        return cfg.hidden_size
    mlp_width = cfg.ffn_size * ((cfg.top_k + cfg.num_shared_experts) if cfg.use_moe else 1)
    attention = (2 * cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim
    return 2 * cfg.hidden_size + attention + (3 if cfg.use_glu else 2) * mlp_width


def step_memory_bytes(
    cfg: ModelConfig,
    *,
    num_params: int,
    batch_size: int,
    optimizer: str,
    precision: str,
    compiled: bool,
) -> int:
    """About the peak memory of one train step on a micro-batch of batch_size x max_seq_len
    tokens: the train state, the activations kept for the backward, and the logits (with
    their float32 log-softmax and gradient) unless `loss_chunk_size` computes the loss in
    chunks."""
    tokens = batch_size * cfg.max_seq_len
    value_bytes = 4 if precision == "fp32" else 2
    activations = tokens * cfg.num_layers * activation_values_per_token(cfg) * value_bytes
    logit_rows = min(tokens, cfg.loss_chunk_size) if cfg.loss_chunk_size else tokens
    logits = logit_rows * cfg.vocab_size * (2 * value_bytes + 4)
    state = STATE_BYTES_PER_PARAM.get(optimizer, 16) * num_params
    return state + int((activations + logits) * (1 if compiled else EAGER_FACTOR))


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def cpu_memory_warning(
    config, num_params: int, device: torch.device, available: int | None = None
) -> str | None:
    """A warning when a CPU run's step needs more memory than the machine has available
    (config: an llmfn.config.Config of a text task, whose model is `config.model`; available:
    bytes, default `available_memory_bytes()`)."""
    if device.type != "cpu":
        return None
    available = available_memory_bytes() if available is None else available
    if available is None:
        return None
    needed = step_memory_bytes(
        config.model,
        num_params=num_params,
        batch_size=config.data.batch_size,
        optimizer=config.optim.name,
        precision=config.train.precision,
        compiled=config.train.compile,
    )
    if needed <= available:
        return None
    gib = 2**30
    return (
        f"warning: a train step needs about {needed / gib:.0f} GiB at data.batch_size="
        f"{config.data.batch_size} x model.max_seq_len={config.model.max_seq_len} "
        f"({num_params / 1e6:.0f}M parameters), more than the {available / gib:.0f} GiB this "
        "machine has available: lower data.batch_size (raise train.grad_accum_steps to keep "
        "the global batch) or model.max_seq_len, set model.activation_checkpointing=true, or "
        "train on a GPU"
    )
