"""The sampler: the next token of each row, from logits [B, V], the sampler state and a key.

Sampling is a pure function of (seed, prompt index, token number): Gumbel-max with noise from
the hash in `llmfn.layers.dropout`, so the same seed gives the same tokens, compiled or not,
whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses

import torch

from llmfn.cached_decode import slot_mask
from llmfn.layers.dropout import fold_in, uniform


@dataclasses.dataclass(frozen=True)
class SamplingFlags:
    """The static choices of a sampler (the values are tensors, so they never recompile)."""

    greedy: bool
    top_k: bool
    top_p: bool
    repetition_penalty: bool
    vocab_limit: bool = False


def penalize_repeats(
    logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """logits [B, V], seen [B, V] bool: divide positive / multiply negative logits of seen ids
    by `penalty` (CTRL, as HF's RepetitionPenaltyLogitsProcessor)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """logits [B, V] -> logits with -inf outside the top_k (0-d long) largest and outside the
    smallest set whose probability reaches top_p (0-d float); top_k first, as HF. Ties at the
    threshold are kept; the most likely token always is."""
    vocab = logits.shape[-1]
    ascending = logits.sort(dim=-1).values
    threshold = ascending[:, :1]
    if top_k is not None:
        first_kept = (vocab - top_k.clamp(1, vocab)).expand(logits.shape[0], 1)
        threshold = ascending.gather(-1, first_kept)
        ascending = ascending.masked_fill(ascending < threshold, float("-inf"))
    if top_p is not None:
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        removed = (cumulative <= 1 - top_p).sum(dim=-1, keepdim=True).clamp(max=vocab - 1)
        threshold = torch.maximum(threshold, ascending.gather(-1, removed))
    return logits.masked_fill(logits < threshold, float("-inf"))


def limit_vocab(logits: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> -inf at ids >= limit (0-d long): e.g. the padding rows of a model
    vocabulary larger than its tokenizer's, which the tokenizer cannot decode."""
    ids = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids >= limit, float("-inf"))


def gumbel_noise(key: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Standard Gumbel noise of `shape` [B, V], a pure function of the int64 keys [B] (row b's
    noise depends on key[b] alone)."""
    u = uniform(key, shape).add(0.5 / (1 << 24))  # in (0, 1): never log(0)
    return -torch.log(-torch.log(u))


def choose_tokens(
    logits: torch.Tensor, sampler: dict, flags: SamplingFlags, key: torch.Tensor
) -> torch.Tensor:
    """logits [B, V] -> next ids [B] long, below the vocab limit: greedy, or a sample after
    penalty, temperature, top-k and top-p (Gumbel-max: argmax(logits / T + Gumbel) ~
    softmax(logits / T))."""
    logits = logits.float()
    if flags.vocab_limit:
        logits = limit_vocab(logits, sampler["vocab_limit"])
    if flags.repetition_penalty:
        logits = penalize_repeats(logits, sampler["seen"], sampler["repetition_penalty"])
    if flags.greedy:
        return logits.argmax(dim=-1)
    logits = logits / sampler["temperature"]
    if flags.top_k or flags.top_p:
        logits = filter_top_k_top_p(
            logits,
            sampler["top_k"] if flags.top_k else None,
            sampler["top_p"] if flags.top_p else None,
        )
    return (logits + gumbel_noise(key, logits.shape)).argmax(dim=-1)


def sample_step(
    logits: torch.Tensor, sampler: dict, slot: torch.Tensor, flags: SamplingFlags
) -> tuple[torch.Tensor, dict]:
    """Pick the token for cache slot `slot` -> (ids [B] long, updated sampler).

    Rows already finished get eos_id again; a row finishes when it emits eos_id (-1 = never).
    sampler: {"temperature", "top_k", "top_p", "repetition_penalty", "eos_id", "vocab_limit",
    "first_new_slot"} 0-d tensors, "key" [B] long (one per row), "seen" [B, V] bool (ids in the
    prompt or generated), "finished" [B] bool. The noise of a row's n-th new token is keyed by
    (its row key, n) alone, so it does not depend on the other rows or the padding.
    """
    step_keys = fold_in(sampler["key"], slot - sampler["first_new_slot"])
    ids = choose_tokens(logits, sampler, flags, step_keys)
    eos = sampler["eos_id"]
    ids = torch.where(sampler["finished"], eos.clamp(min=0), ids)
    seen = (
        sampler["seen"].scatter(1, ids[:, None], True)
        if flags.repetition_penalty
        else sampler["seen"]
    )
    return ids, {**sampler, "seen": seen, "finished": sampler["finished"] | (ids == eos)}


def init_sampler(
    tokens: torch.Tensor,
    pad_lengths: torch.Tensor,
    vocab_size: int,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    eos_id: int | None,
    seed: int,
    vocab_limit: int | None = None,
    prompt_offset: int = 0,
) -> tuple[dict, SamplingFlags]:
    """The sampler state for left-padded prompts tokens [B, T] and its static flags.
    vocab_limit: sample only ids below it (None: any of the vocab_size ids).
    Row b samples with the key fold_in(seed, prompt_offset + b): a prompt's sample depends on
    the seed and its index in the whole list, not on how the list was cut into batches."""
    device = tokens.device
    scalar = lambda value, dtype: torch.tensor(value, dtype=dtype, device=device)  # noqa: E731
    flags = SamplingFlags(
        greedy=temperature == 0,
        top_k=top_k is not None,
        top_p=top_p is not None and top_p < 1.0,
        repetition_penalty=repetition_penalty != 1.0,
        vocab_limit=vocab_limit is not None and vocab_limit < vocab_size,
    )
    rows = torch.arange(tokens.shape[0], device=device)
    seen = torch.zeros(tokens.shape[0], vocab_size, dtype=torch.bool, device=device)
    if flags.repetition_penalty:
        real = slot_mask(pad_lengths, tokens.shape[1])
        seen = torch.zeros_like(seen, dtype=torch.long).scatter_add(1, tokens, real.long()) > 0
    sampler = {
        "key": fold_in(scalar(seed, torch.long), prompt_offset + rows),
        "temperature": scalar(max(temperature, 1e-6), torch.float32),
        "top_k": scalar(top_k or 0, torch.long),
        "top_p": scalar(1.0 if top_p is None else top_p, torch.float32),
        "repetition_penalty": scalar(repetition_penalty, torch.float32),
        "eos_id": scalar(-1 if eos_id is None else eos_id, torch.long),
        "vocab_limit": scalar(vocab_size if vocab_limit is None else vocab_limit, torch.long),
        "first_new_slot": scalar(tokens.shape[1], torch.long),
        "seen": seen,
        "finished": torch.zeros(tokens.shape[0], dtype=torch.bool, device=device),
    }
    return sampler, flags
