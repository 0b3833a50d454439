"""Prefill and cached decode: left-padded prompts, the KV-cache slot layout, one pure decode
step, and the weight layout CPU decode multiplies fastest (`decode_weights`).

Layout. Prompts are left-padded to a common length T and prefilled in one call. Cache slot s of
row b holds position s - pad_b (pad_b = T - len(prompt_b)); slots before pad_b are masked out
for the whole run, so the [B, max_len] key mask never changes. Each decode step writes one slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDict

from llmfn.layers.panel_matmul import PANEL_WIDTH, kernel_available, panel_weight
from llmfn.model import forward_cached
from llmfn.model_config import ModelConfig

# Cache lengths are rounded up to this, so a new prompt length mostly reuses a compiled step.
CACHE_LEN_MULTIPLE = 64


# --- Prompts ----------------------------------------------------------------------------------
def pad_prompts(prompts, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of id lists (or a [B, T] tensor of real tokens) -> (tokens [B, T] long, left-padded
    with pad_id; pad_lengths [B] long)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.shape[1] == 0 or prompts.is_floating_point():
            raise ValueError(
                f"prompts: expected a [B, T] integer tensor with T >= 1, got {tuple(prompts.shape)}"
            )
        return prompts.long(), torch.zeros(
            prompts.shape[0], dtype=torch.long, device=prompts.device
        )
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts: expected a non-empty list of token-id lists or a [B, T] tensor")
    rows = []
    for i, prompt in enumerate(prompts):
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt
        if isinstance(ids, int | str) or not ids or not all(isinstance(t, int) for t in ids):
            raise ValueError(
                f"prompts[{i}]: expected a non-empty list of int token ids, got {prompt!r:.80}"
            )
        rows.append(list(ids))
    length = max(len(r) for r in rows)
    tokens = torch.tensor([[pad_id] * (length - len(r)) + r for r in rows], dtype=torch.long)
    return tokens, torch.tensor([length - len(r) for r in rows], dtype=torch.long)


def cache_length(prompt_len: int, max_new_tokens: int) -> int:
    """Slots needed for the prompt plus the new tokens, rounded up to CACHE_LEN_MULTIPLE."""
    needed = prompt_len + max_new_tokens
    return -(-needed // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE


def slot_mask(pad_lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """pad_lengths [B] -> [B, max_len] bool: True at slots holding a real token (slot >= pad)."""
    return torch.arange(max_len, device=pad_lengths.device)[None, :] >= pad_lengths[:, None]


def slot_positions(slots: torch.Tensor, pad_lengths: torch.Tensor) -> torch.Tensor:
    """slots [T] (or 0-d), pad_lengths [B] -> positions [B, T] = slot - pad, clamped at 0."""
    return (slots.reshape(1, -1) - pad_lengths[:, None]).clamp(min=0)


# --- The decode step --------------------------------------------------------------------------
def decode_step(
    params: TensorDict,
    cache: TensorDict,
    tokens: torch.Tensor,
    pos: torch.Tensor,
    cfg: ModelConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TensorDict]:
    """One token per row: tokens [B, 1] written at cache slot `pos` (0-d long) -> (logits [B, V],
    the new cache). Pure: the cache passed in is not modified.

    attention_mask: [B, max_len] over cache slots (0 = padding); positions: [B, 1] (default pos).
    """
    logits, cache = forward_cached(
        params, tokens, cfg, cache, pos, positions=positions, attention_mask=attention_mask
    )
    return logits[:, -1], cache


def prefill(
    params: TensorDict,
    cache: TensorDict,
    tokens: torch.Tensor,
    pad_lengths: torch.Tensor,
    key_valid: torch.Tensor,
    cfg: ModelConfig,
    *,
    last_only: bool = False,
) -> tuple[torch.Tensor, TensorDict]:
    """Left-padded prompts tokens [B, T] into slots 0..T-1 -> (logits [B, T, V], or [B, 1, V]
    with last_only, and the cache)."""
    start = torch.zeros((), dtype=torch.long, device=tokens.device)
    slots = torch.arange(tokens.shape[1], device=tokens.device)
    positions = slot_positions(slots, pad_lengths)
    logits, cache = forward_cached(
        params, tokens, cfg, cache, start, positions=positions, attention_mask=key_valid,
        last_logits_only=last_only,
    )  # fmt: skip
    return logits, cache


def decode_weights(params: TensorDict) -> TensorDict:
    """The params with every float32 matmul weight [out, in] in the layout CPU decode
    multiplies fastest (same values; `llmfn.layers.linear` runs any layout):

    - contiguous column panels [out // 8, in, 8] (`panel_weight`), which the panel kernel
      (`llmfn.layers.panel_matmul`) streams once per step for any number of rows;
    - a column-major copy (shape [out, in], strides (1, out)) where 8 does not divide `out`,
      or the kernel is not available here: F.linear then streams a row-major [in, out]
      matrix, which MKL does fastest for a few rows.

    Lookup tables (embed, pos) and 3-D leaves (expert weights, or panels already) are left as
    they are, and so are weights already in the target layout: converting costs about a dozen
    decode steps, so code that generates many times converts once,

        params = decode_weights(params)  # then generate(params, ...) copies nothing

    (`generate` does it on CPU; bench/decode_throughput.py has the speeds).
    """
    lookups = {("embed", "weight"), ("pos", "weight")}
    out = params.clone(recurse=False)
    for key, leaf in params.items(include_nested=True, leaves_only=True):
        if leaf.dim() != 2 or key in lookups:
            continue
        panels = leaf.dtype == torch.float32 and leaf.shape[0] % PANEL_WIDTH == 0
        if panels and kernel_available():
            out[key] = panel_weight(leaf)
        elif not leaf.t().is_contiguous():
            out[key] = leaf.t().contiguous().t()
    return out
