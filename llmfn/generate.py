"""Generation: a preallocated KV cache, sampling from an explicit key, a compiled decode step,
and the `python -m llmfn.generate` CLI.

    new_ids = generate(params, cfg, [[1, 2, 3], [4, 5]], max_new_tokens=20)     # greedy
    for step in stream(params, cfg, prompts, temperature=0.8, top_p=0.95, seed=0):
        ...                                          # step: one new id (or None) per prompt

Layout. Prompts are left-padded to a common length T and prefilled in one call. Cache slot s of
row b holds position s - pad_b (pad_b = T - len(prompt_b)); slots before pad_b are masked out
for the whole run, so the [B, max_len] key mask never changes. Each decode step writes one slot.

Speed. `decode_step` is pure (it returns a new cache). The generate loop owns its cache, so its
compiled step copies the new slot back into the old buffers; inductor turns that into an
in-place write. The step also samples, so one compiled call per token does all the work, and
its inputs have fixed shapes ([B, 1] tokens, 0-d slot, [B, max_len] mask): no recompiles.

Sampling is a pure function of (seed, slot): Gumbel-max with noise from the hash in
`llmfn.layers.dropout`, so the same seed gives the same tokens, compiled or not.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tensordict import TensorDict

from llmfn.layers.dropout import fold_in, uniform
from llmfn.layers.panel_matmul import PANEL_WIDTH, kernel_available, panel_weight
from llmfn.model import forward_cached, init_cache
from llmfn.model_config import ModelConfig
from llmfn.warning_format import use_one_line_warnings

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


# --- Sampling ---------------------------------------------------------------------------------
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
    """Standard Gumbel noise of `shape`, a pure function of the 0-d int64 key."""
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
    sampler: {"key", "temperature", "top_k", "top_p", "repetition_penalty", "eos_id",
    "vocab_limit"} 0-d tensors, "seen" [B, V] bool (ids in the prompt or generated),
    "finished" [B] bool.
    """
    ids = choose_tokens(logits, sampler, flags, fold_in(sampler["key"], slot))
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
) -> tuple[dict, SamplingFlags]:
    """The sampler state for left-padded prompts tokens [B, T] and its static flags.
    vocab_limit: sample only ids below it (None: any of the vocab_size ids)."""
    device = tokens.device
    scalar = lambda value, dtype: torch.tensor(value, dtype=dtype, device=device)  # noqa: E731
    flags = SamplingFlags(
        greedy=temperature == 0,
        top_k=top_k is not None,
        top_p=top_p is not None and top_p < 1.0,
        repetition_penalty=repetition_penalty != 1.0,
        vocab_limit=vocab_limit is not None and vocab_limit < vocab_size,
    )
    seen = torch.zeros(tokens.shape[0], vocab_size, dtype=torch.bool, device=device)
    if flags.repetition_penalty:
        real = slot_mask(pad_lengths, tokens.shape[1])
        seen = torch.zeros_like(seen, dtype=torch.long).scatter_add(1, tokens, real.long()) > 0
    sampler = {
        "key": scalar(seed, torch.long),
        "temperature": scalar(max(temperature, 1e-6), torch.float32),
        "top_k": scalar(top_k or 0, torch.long),
        "top_p": scalar(1.0 if top_p is None else top_p, torch.float32),
        "repetition_penalty": scalar(repetition_penalty, torch.float32),
        "eos_id": scalar(-1 if eos_id is None else eos_id, torch.long),
        "vocab_limit": scalar(vocab_size if vocab_limit is None else vocab_limit, torch.long),
        "seen": seen,
        "finished": torch.zeros(tokens.shape[0], dtype=torch.bool, device=device),
    }
    return sampler, flags


# --- The loop ---------------------------------------------------------------------------------
def decode_and_sample(params, cache, tokens, slot, pad_lengths, key_valid, sampler, cfg, flags):
    """One generation step: tokens [B, 1] at `slot` -> (next ids [B], new cache, new sampler)."""
    positions = slot_positions(slot, pad_lengths)
    logits, cache = decode_step(
        params, cache, tokens, slot, cfg, attention_mask=key_valid, positions=positions
    )
    ids, sampler = sample_step(logits, sampler, slot + 1, flags)
    return ids, cache, sampler


def donating_step(cfg: ModelConfig, flags: SamplingFlags, param_keys: tuple, cache_keys: tuple):
    """`decode_and_sample` over flat leaf lists that writes the new cache into the old buffers,
    which the caller gives up, and returns (ids, sampler). Compiled, the write becomes an
    in-place store of one slot (no cache copy). Flat lists of tensors make dynamo's per-call
    guards several times cheaper than TensorDict arguments."""

    def step(param_leaves, cache_leaves, tokens, slot, pad_lengths, key_valid, sampler):
        params = unflatten(param_keys, param_leaves)
        cache = unflatten(cache_keys, cache_leaves)
        ids, new_cache, sampler = decode_and_sample(
            params, cache, tokens, slot, pad_lengths, key_valid, sampler, cfg, flags
        )
        for name, buffer in zip(cache_keys, cache_leaves, strict=True):
            buffer.copy_(new_cache[name])
        return ids, sampler

    return step


def flat_leaves(tree: TensorDict) -> tuple[tuple[tuple[str, ...], ...], list[torch.Tensor]]:
    """A tree -> (its leaf keys, as tuples, and its leaves in that order)."""
    keys = tuple(tree.keys(include_nested=True, leaves_only=True))
    return keys, [tree[key] for key in keys]


def unflatten(keys: tuple, leaves: list[torch.Tensor]) -> TensorDict:
    """The inverse of `flat_leaves`."""
    tree = TensorDict({}, batch_size=[])
    for key, leaf in zip(keys, leaves, strict=True):
        tree[key] = leaf
    return tree


COMPILE_BACKEND = "inductor"  # tests swap in "eager" to check dynamo's side quickly
# No shape/stride/alignment asserts on the inputs of each call (a quarter of the generated
# wrapper's time at batch 1): dynamo's guards check every input on the first step of a loop,
# and the later steps pass the same tensors or same-shaped results of the previous step.
INDUCTOR_OPTIONS = {"size_asserts": False, "alignment_asserts": False}
FULL_GUARDS_EVERY_STEP = False  # tests set it to prove that no step would recompile


@functools.lru_cache(maxsize=32)
def compiled_step(
    cfg: ModelConfig, flags: SamplingFlags, keys: tuple, backend: str, signature: tuple
):
    """The compiled donating step for one (model config, sampling flags, param and cache keys,
    input signature): signature = (batch size, cache length, dtype, device), the things
    torch.compile specializes the graph to (dynamic=False).

    Each entry compiles its own copy of the step function (a fresh code object): dynamo caps
    the graphs of one function at `recompile_limit` (8), and with fullgraph=True the ninth
    batch size or cache length in a process would raise. One graph per entry instead, and the
    LRU bound keeps at most 32 of them."""
    step = donating_step(cfg, flags, *keys)
    options = INDUCTOR_OPTIONS if backend == "inductor" else None
    return torch.compile(
        own_code(step), fullgraph=True, dynamic=False, backend=backend, options=options
    )


def own_code(fn):
    """A copy of the function `fn` with a code object of its own (dynamo caches per code
    object)."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


def device_memory(device: torch.device) -> int | None:
    """Total memory of a device in bytes (physical RAM for cpu), or None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return None


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of the KV cache `init_cache` allocates (measured on the meta device)."""
    cache = init_cache(cfg, batch, max_len, dtype=dtype, device="meta")
    return sum(t.numel() * t.element_size() for t in cache.values(True, True))


def check_cache_fits(
    cfg: ModelConfig, shape: torch.Size, max_new_tokens: int, dtype: torch.dtype, device
) -> None:
    """ValueError if the KV cache for prompts of shape [B, T] plus max_new_tokens would not fit
    in the device's whole memory: such a run can never start. Positions set no bound here
    (RoPE, ALiBi and sinusoidal models run past max_seq_len); only memory does."""
    batch, prompt_len = shape
    needed = cache_bytes(cfg, batch, cache_length(prompt_len, max_new_tokens), dtype)
    memory = device_memory(torch.device(device))
    if memory is not None and needed > memory:
        raise ValueError(
            f"generate: prompt length {prompt_len} + max_new_tokens={max_new_tokens} needs a KV "
            f"cache of {needed / 2**30:.1f} GiB for {batch} prompt(s), more than the "
            f"{memory / 2**30:.1f} GiB of memory on {device}: lower max_new_tokens "
            "(or the number of prompts per call)"
        )


def allocate_cache(
    cfg: ModelConfig, shape: torch.Size, max_len: int, dtype: torch.dtype, device
) -> TensorDict:
    """`init_cache` for prompts of shape [B, T]; a failed allocation is a ValueError naming
    the option to lower."""
    try:
        return init_cache(cfg, shape[0], max_len, dtype=dtype, device=device)
    except RuntimeError as err:  # torch.OutOfMemoryError, or the CPU allocator's RuntimeError
        if not isinstance(err, torch.OutOfMemoryError) and "allocate" not in str(err):
            raise
        raise ValueError(
            f"generate: the KV cache for {shape[0]} prompt(s) of {max_len} slots (prompt length "
            f"{shape[1]} + max_new_tokens, rounded up) does not fit in the free memory of "
            f"{device}: lower max_new_tokens (or the number of prompts per call)"
        ) from None


def check_options(
    max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id, vocab_limit=None
) -> None:
    checks = [
        ("max_new_tokens", max_new_tokens, isinstance(max_new_tokens, int) and max_new_tokens >= 1, "an int >= 1"),
        ("temperature", temperature, isinstance(temperature, int | float) and temperature >= 0, "a float >= 0 (0 = greedy)"),
        ("top_k", top_k, top_k is None or (isinstance(top_k, int) and top_k >= 1), "None or an int >= 1"),
        ("top_p", top_p, top_p is None or (isinstance(top_p, int | float) and 0 < top_p <= 1), "None or a float in (0, 1]"),
        ("repetition_penalty", repetition_penalty, isinstance(repetition_penalty, int | float) and repetition_penalty > 0, "a float > 0 (1 = off)"),
        ("eos_id", eos_id, eos_id is None or (isinstance(eos_id, int) and eos_id >= 0), "None or an int >= 0"),
        ("vocab_limit", vocab_limit, vocab_limit is None or (isinstance(vocab_limit, int) and vocab_limit >= 1), "None or an int >= 1"),
    ]  # fmt: skip
    for name, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"generate: {name}={value!r} is invalid: expected {expected}")


def stream(
    params: TensorDict,
    cfg: ModelConfig,
    prompts,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: int | None = None,
    vocab_limit: int | None = None,
    seed: int = 0,
    compile: bool = False,
) -> Iterator[list[int | None]]:
    """Yield, per step, one new id per prompt (None for rows already finished at EOS).

    prompts: a list of token-id lists (any lengths) or a [B, T] long tensor. Greedy when
    temperature is 0. Stops after max_new_tokens steps, or once every row has emitted eos_id.
    vocab_limit: sample only ids below it, e.g. the tokenizer's vocab_size when
    model.vocab_size is padded past it (None: any id; `stream_text` sets it).
    compile: run the decode step through torch.compile (compiled once per model config,
    sampling flags, batch size and cache length).
    """
    check_options(
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id, vocab_limit
    )
    device = params["embed", "weight"].device
    tokens, pad_lengths = pad_prompts(prompts)
    tokens, pad_lengths = tokens.to(device), pad_lengths.to(device)
    if tokens.max() >= cfg.vocab_size or tokens.min() < 0:
        raise ValueError(f"prompts: token ids must be in [0, model.vocab_size={cfg.vocab_size})")
    if cfg.position == "learned" and tokens.shape[1] + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"generate: prompt length {tokens.shape[1]} + max_new_tokens={max_new_tokens} "
            f"exceeds model.max_seq_len={cfg.max_seq_len} (learned positions)"
        )
    dtype = params["embed", "weight"].dtype
    check_cache_fits(cfg, tokens.shape, max_new_tokens, dtype, device)
    sampler, flags = init_sampler(
        tokens, pad_lengths, cfg.vocab_size, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, eos_id=eos_id, seed=seed, vocab_limit=vocab_limit,
    )  # fmt: skip
    return decode_loop(params, cfg, tokens, pad_lengths, sampler, flags, max_new_tokens, compile)


def decode_loop(
    params: TensorDict,
    cfg: ModelConfig,
    tokens: torch.Tensor,
    pad_lengths: torch.Tensor,
    sampler: dict,
    flags: SamplingFlags,
    max_new_tokens: int,
    compile: bool,
) -> Iterator[list[int | None]]:
    """The generator behind `stream`: prefill, then one decode step per yielded step."""
    device, prompt_len = tokens.device, tokens.shape[1]
    max_len = cache_length(prompt_len, max_new_tokens)
    with torch.no_grad():
        if device.type == "cpu":
            params = decode_weights(params)
        dtype = params["embed", "weight"].dtype
        cache = allocate_cache(cfg, tokens.shape, max_len, dtype, device)
        key_valid = slot_mask(pad_lengths, max_len)
        logits, cache = prefill(params, cache, tokens, pad_lengths, key_valid, cfg, last_only=True)
        slot = torch.tensor(prompt_len, device=device)
        finished_before = sampler["finished"]
        ids, sampler = sample_step(logits[:, -1], sampler, slot, flags)
    step = None
    if compile:
        param_keys, param_leaves = flat_leaves(params)
        cache_keys, cache_leaves = flat_leaves(cache)
        signature = (tokens.shape[0], max_len, cache_leaves[0].dtype, str(device))
        step = compiled_step(cfg, flags, (param_keys, cache_keys), COMPILE_BACKEND, signature)
    for i in range(max_new_tokens):  # no grad mode or compiler stance is held across a yield
        done = finished_before.tolist()
        yield [None if done[b] else token for b, token in enumerate(ids.tolist())]
        if i == max_new_tokens - 1 or bool(sampler["finished"].all()):
            return
        finished_before = sampler["finished"]
        inputs = (ids[:, None], slot, pad_lengths, key_valid, sampler)
        with torch.no_grad():
            if step is None:
                ids, cache, sampler = decode_and_sample(params, cache, *inputs, cfg, flags)
            else:
                ids, sampler = call_compiled(
                    step,
                    param_leaves,
                    cache_leaves,
                    inputs,
                    guarded=i == 0 or FULL_GUARDS_EVERY_STEP,
                )
        slot = slot + 1


def call_compiled(step, param_leaves: list, cache_leaves: list, inputs: tuple, *, guarded: bool):
    """Run the compiled donating step. Dynamo's guards run in full on the first step of a loop
    (picking or compiling the right graph); later steps of the same loop pass inputs of the
    same structure, shapes and dtypes, so they only check the guards that tell graphs apart.
    Tracing (only ever on a guarded call) captures scalar reads, so the cached attention can
    cut the cache to its written slots inside one graph (`layers.attention.written_slots`)."""
    if guarded:
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            return step(param_leaves, cache_leaves, *inputs)
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
        return step(param_leaves, cache_leaves, *inputs)


def generate(params: TensorDict, cfg: ModelConfig, prompts, **options) -> list[list[int]]:
    """The new ids of each prompt (up to and including eos_id, when it came).

    prompts: a list of token-id lists or a [B, T] long tensor. Options as in `stream`:
    max_new_tokens, temperature (0 = greedy), top_k, top_p, repetition_penalty, eos_id, seed,
    compile.
    """
    new_ids: list[list[int]] | None = None
    for step in stream(params, cfg, prompts, **options):
        new_ids = new_ids or [[] for _ in step]
        for row, token in zip(new_ids, step, strict=True):
            if token is not None:
                row.append(token)
    return new_ids


# --- Text: a tokenizer, stop strings, streaming -----------------------------------------------
def encode_prompt(tokenizer, text: str, index: int) -> list[int]:
    """Token ids of one prompt; an empty prompt starts from BOS (or EOS) if the tokenizer has one."""
    ids = tokenizer.encode(text)
    if ids:
        return ids
    start = tokenizer.bos_id if getattr(tokenizer, "bos_id", None) is not None else tokenizer.eos_id
    if start is None:
        raise ValueError(
            f"prompt {index} is empty and the tokenizer has no BOS or EOS id to start from"
        )
    return [start]


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters may still change: an incomplete UTF-8 character (decoded
    as U+FFFD) or the beginning of a stop string."""
    partial = max(
        (n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0
    )
    replacement = len(text) - len(text.rstrip("\ufffd"))
    return max(partial, replacement)


class TextRow:
    """The decoded text of one prompt's new tokens and how much of it was handed out."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.emitted = 0
        self.done = False

    def add(self, token: int) -> str:
        """Append a token -> the text that became final (a stop string ends the row, unprinted)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cuts = [
            i
            for i in (text.find(stop, max(0, self.emitted - len(stop))) for stop in self.stops)
            if i >= 0
        ]
        if cuts:
            self.done = True
            return self.take(text, min(cuts))
        return self.take(text, len(text) - held_back(text, self.stops))

    def finish(self) -> str:
        """The row ended (EOS or length): hand out what was held back."""
        self.done = True
        return self.take(self.tokenizer.decode(self.ids), None)

    def take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        piece = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


def stream_text(
    params: TensorDict,
    cfg: ModelConfig,
    tokenizer,
    prompts: Sequence[str],
    *,
    stop: Sequence[str] = (),
    **options,
) -> Iterator[tuple[int, str]]:
    """Yield (prompt index, text piece) as tokens arrive, for a list of prompt strings.

    A row ends at the tokenizer's EOS (or options["eos_id"]), at the first stop string (not
    included in the text), or after max_new_tokens. Only ids the tokenizer can decode are
    sampled (options["vocab_limit"] defaults to its vocab_size). Options as in `stream`; they
    are checked at the call, not at the first step.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    stops = [s for s in stop if s]
    ids = [encode_prompt(tokenizer, text, i) for i, text in enumerate(prompts)]
    eos_id = options.setdefault("eos_id", tokenizer.eos_id)
    options.setdefault("vocab_limit", getattr(tokenizer, "vocab_size", None))
    steps = stream(params, cfg, ids, **options)
    return text_pieces(steps, [TextRow(tokenizer, stops) for _ in prompts], eos_id)


def text_pieces(
    steps: Iterator[list[int | None]], rows: list[TextRow], eos_id: int | None
) -> Iterator[tuple[int, str]]:
    """The generator behind `stream_text`: (prompt index, text piece) from `stream`'s steps."""
    for step in steps:
        for index, (row, token) in enumerate(zip(rows, step, strict=True)):
            if row.done or token is None:
                continue
            piece = row.finish() if token == eos_id else row.add(token)
            if piece:
                yield index, piece
        if all(row.done for row in rows):
            return
    for index, row in enumerate(rows):
        piece = "" if row.done else row.finish()
        if piece:
            yield index, piece


def generate_text(
    params: TensorDict, cfg: ModelConfig, tokenizer, prompts: Sequence[str], **options
) -> list[str]:
    """The new text of each prompt string. Options as in `stream_text`."""
    texts = [""] * (1 if isinstance(prompts, str) else len(prompts))
    for index, piece in stream_text(params, cfg, tokenizer, prompts, **options):
        texts[index] += piece
    return texts


# --- CLI --------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmfn.generate",
        description="Generate text from an llmfn checkpoint (a step folder, checkpoint root or run folder).",
    )
    parser.add_argument("checkpoint", help="checkpoint folder (e.g. runs/<run>/checkpoints)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text (streamed output)")
    source.add_argument("--prompt-file", help="a text file with one prompt per line (batched)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="prompts per batch with --prompt-file"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (pays off for long runs)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, ... (default: cuda if available)"
    )
    return parser.parse_args(argv)


def read_prompts(path: str) -> list[str]:
    """The non-blank lines of a prompt file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompt-file {path} cannot be read: {err}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file {path} has no prompts (one prompt per non-blank line)")
    return prompts


def resolve_device(name: str | None) -> torch.device:
    """--device -> a device this machine has (default: cuda if available, else cpu)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type == "meta":
        raise ValueError(f"--device {name!r} is not a device name: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} but no CUDA device is available (use --device cpu)")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ValueError(
            f"--device {name!r} but this machine has {count} CUDA device(s): "
            f"cuda:0 to cuda:{count - 1}"
        )
    try:
        torch.empty(0, device=device)
    except Exception:  # an accelerator torch was not built for: several error types
        raise ValueError(f"--device {name!r} is not available on this machine") from None
    return device


def load_model(path: str, device: str | None):
    """(cfg, params, tokenizer) of a checkpoint; clear errors for a bad path, a device this
    machine lacks, or no tokenizer."""
    from llmfn.checkpoint import load_for_inference

    if not Path(path).exists():
        raise ValueError(
            f"checkpoint path {path} does not exist: expected a checkpoint or run folder"
        )
    cfg, params, tokenizer = load_for_inference(path, device=resolve_device(device))
    if tokenizer is None:
        raise ValueError(
            f"checkpoint {path} has no tokenizer/ folder: cannot turn text into token ids"
        )
    return cfg, params, tokenizer


def print_stream(prompt: str, pieces: Iterator[tuple[int, str]]) -> None:
    """Echo the prompt, then each piece as it arrives; the line is ended even when a piece
    fails, so an error message starts on a line of its own."""
    print(prompt, end="", flush=True)
    try:
        for _, piece in pieces:
            print(piece, end="", flush=True)
    finally:
        print(flush=True)


def main(argv=None) -> int:
    from llmfn.checkpoint import CheckpointError

    use_one_line_warnings()
    args = parse_args(argv)
    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k or None,
        "top_p": None if args.top_p == 1.0 else args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
        "compile": args.compile,
    }
    try:
        check_options(
            args.max_new_tokens,
            args.temperature,
            options["top_k"],
            options["top_p"],
            args.repetition_penalty,
            None,
        )
        if args.batch_size < 1:
            raise ValueError(f"--batch-size={args.batch_size} is invalid: expected an int >= 1")
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompt_file)
        cfg, params, tokenizer = load_model(args.checkpoint, args.device)
        if args.prompt is not None:
            print_stream(args.prompt, stream_text(params, cfg, tokenizer, prompts, **options))
            return 0
        for first in range(0, len(prompts), args.batch_size):
            batch = prompts[first : first + args.batch_size]
            for offset, text in enumerate(generate_text(params, cfg, tokenizer, batch, **options)):
                print(
                    f"=== {first + offset + 1}: {batch[offset]}\n{batch[offset]}{text}\n",
                    flush=True,
                )
    except (ValueError, OSError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
