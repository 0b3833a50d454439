"""Generation: the decode loop over a preallocated KV cache (`stream`, `generate`), its
compiled step, text in and out (`stream_text`, `generate_text`), and the
`python -m llmfn.generate` CLI.

    new_ids = generate(params, cfg, [[1, 2, 3], [4, 5]], max_new_tokens=20)     # greedy
    for step in stream(params, cfg, prompts, temperature=0.8, top_p=0.95, seed=0):
        ...                                          # step: one new id (or None) per prompt

The parts it runs: `llmfn.cached_decode` (the prompt and cache layout, prefill, the decode
step, `decode_weights`), `llmfn.token_sampling` (the sampler) and `llmfn.streaming_text`
(token ids -> text pieces, stop strings).

Speed. `decode_step` is pure (it returns a new cache). The generate loop owns its cache, so its
compiled step copies the new slot back into the old buffers; inductor turns that into an
in-place write. The step also samples, so one compiled call per token does all the work, and
its inputs have fixed shapes ([B, 1] tokens, 0-d slot, [B, max_len] mask): no recompiles.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tensordict import TensorDict

from llmfn.cached_decode import (
    cache_length,
    decode_step,
    decode_weights,
    pad_prompts,
    prefill,
    slot_mask,
    slot_positions,
)
from llmfn.cli_output import closed_pipe_exit
from llmfn.devices import is_out_of_memory, resolve_device
from llmfn.model import init_cache
from llmfn.model_config import ModelConfig
from llmfn.streaming_text import TextRow, encode_prompt, text_pieces
from llmfn.token_sampling import SamplingFlags, init_sampler, sample_step
from llmfn.warning_format import use_one_line_warnings


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


CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def device_memory(device: torch.device) -> int | None:
    """Total memory of a device in bytes, or None where unknown. For cpu: physical RAM, or the
    container's memory limit (cgroup v2 or v1) where that is lower."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return None
    return min([physical, *cgroup_memory_limits()])


def cgroup_memory_limits(paths: Sequence[str] = CGROUP_MEMORY_LIMITS) -> list[int]:
    """The memory limits (bytes) of this process's cgroup files that exist and set one."""
    limits = []
    for path in paths:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (cgroup v2) means none
            limits.append(int(text))
    return limits


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
        if not is_out_of_memory(err):
            raise
        raise ValueError(
            f"generate: the KV cache for {shape[0]} prompt(s) of {max_len} slots (prompt length "
            f"{shape[1]} + max_new_tokens, rounded up) does not fit in the free memory of "
            f"{device}: lower max_new_tokens (or the number of prompts per call)"
        ) from None


FLOAT32_MAX = torch.finfo(torch.float32).max  # the sampler holds its options as float32


def is_finite_number(value) -> bool:
    """An int or float that stays finite as float32: inf (or 1e39) would turn logits into NaN
    and sample ids the tokenizer cannot decode."""
    return isinstance(value, int | float) and abs(value) <= FLOAT32_MAX


SEED_LIMIT = 2**63  # the sampler's key is an int64


def check_options(
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    repetition_penalty,
    eos_id,
    vocab_limit=None,
    seed=0,
    prompt_offset=0,
) -> None:
    """ValueError naming the first option out of range, as its Python parameter (`top_p=0.0`)."""
    checks = [
        ("max_new_tokens", max_new_tokens, isinstance(max_new_tokens, int) and max_new_tokens >= 1, "an int >= 1"),
        ("temperature", temperature, is_finite_number(temperature) and temperature >= 0, "a finite float >= 0 (0 = greedy)"),
        ("top_k", top_k, top_k is None or (isinstance(top_k, int) and top_k >= 1), "None or an int >= 1"),
        ("top_p", top_p, top_p is None or (isinstance(top_p, int | float) and 0 < top_p <= 1), "None or a float in (0, 1]"),
        ("repetition_penalty", repetition_penalty, is_finite_number(repetition_penalty) and repetition_penalty > 0, "a finite float > 0 (1 = off)"),
        ("eos_id", eos_id, eos_id is None or (isinstance(eos_id, int) and eos_id >= 0), "None or an int >= 0"),
        ("vocab_limit", vocab_limit, vocab_limit is None or (isinstance(vocab_limit, int) and vocab_limit >= 1), "None or an int >= 1"),
        ("seed", seed, isinstance(seed, int) and 0 <= seed < SEED_LIMIT, "an int in [0, 2**63)"),
        ("prompt_offset", prompt_offset, isinstance(prompt_offset, int) and 0 <= prompt_offset < 2**31, "an int in [0, 2**31)"),
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
    prompt_offset: int = 0,
    compile: bool = False,
) -> Iterator[list[int | None]]:
    """Yield, per step, one new id per prompt (None for rows already finished at EOS).

    prompts: a list of token-id lists (any lengths) or a [B, T] long tensor. Greedy when
    temperature is 0. Stops after max_new_tokens steps, or once every row has emitted eos_id.
    vocab_limit: sample only ids below it, e.g. the tokenizer's vocab_size when
    model.vocab_size is padded past it (None: any id; `stream_text` sets it).
    seed: an int in [0, 2**63): the same seed gives the same samples. Each prompt samples with
    its own key, (seed, prompt_offset + its index in `prompts`), so its sample does not depend on
    the other prompts of the batch; prompt_offset: the index of prompts[0] in a longer list that
    is generated in batches (a prompt then samples the same whatever the batch size).
    compile: run the decode step through torch.compile (compiled once per model config,
    sampling flags, batch size and cache length).
    """
    check_options(
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        eos_id,
        vocab_limit,
        seed,
        prompt_offset,
    )
    device = params["embed", "weight"].device
    tokens, pad_lengths = pad_prompts(prompts)
    tokens, pad_lengths = tokens.to(device), pad_lengths.to(device)
    if tokens.max() >= cfg.vocab_size or tokens.min() < 0:
        raise ValueError(f"prompts: token ids must be in [0, model.vocab_size={cfg.vocab_size})")
    if cfg.position == "learned" and tokens.shape[1] + max_new_tokens - 1 > cfg.max_seq_len:
        raise ValueError(  # the last new token is never fed back: it needs no position
            f"generate: prompt length {tokens.shape[1]} + max_new_tokens={max_new_tokens} - 1 "
            f"exceeds model.max_seq_len={cfg.max_seq_len} (learned positions)"
        )
    dtype = params["embed", "weight"].dtype
    check_cache_fits(cfg, tokens.shape, max_new_tokens, dtype, device)
    sampler, flags = init_sampler(
        tokens, pad_lengths, cfg.vocab_size, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, eos_id=eos_id, seed=seed, vocab_limit=vocab_limit,
        prompt_offset=prompt_offset,
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
    prompt_offset, compile.
    """
    new_ids: list[list[int]] | None = None
    for step in stream(params, cfg, prompts, **options):
        new_ids = new_ids or [[] for _ in step]
        for row, token in zip(new_ids, step, strict=True):
            if token is not None:
                row.append(token)
    return new_ids


# --- Text: a tokenizer, stop strings, streaming -----------------------------------------------
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
    offset = options.get("prompt_offset", 0)  # warnings number prompts as in the whole list
    first = offset if isinstance(offset, int) else 0  # (`stream` names a bad prompt_offset)
    ids = [encode_prompt(tokenizer, text, first + i) for i, text in enumerate(prompts)]
    eos_id = options.setdefault("eos_id", tokenizer.eos_id)
    options.setdefault("vocab_limit", getattr(tokenizer, "vocab_size", None))
    steps = stream(params, cfg, ids, **options)
    return text_pieces(steps, [TextRow(tokenizer, stops) for _ in prompts], eos_id)


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
    parser.add_argument(
        "--seed", type=int, default=0, help="a prompt samples the same whatever the --batch-size"
    )
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
        "--device",
        default="auto",
        help="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps",
    )
    return parser.parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """ValueError naming the first flag whose value is out of range, in the flag's own terms
    (0 turns --top-k off and 1 --top-p; `check_options` names the Python parameters)."""
    checks = [
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "an int >= 1"),
        ("--temperature", args.temperature, is_finite_number(args.temperature) and args.temperature >= 0, "a finite float >= 0 (0 = greedy)"),
        ("--top-k", args.top_k, args.top_k >= 0, "an int >= 0 (0 = off)"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "a float in (0, 1]"),
        ("--repetition-penalty", args.repetition_penalty, is_finite_number(args.repetition_penalty) and args.repetition_penalty > 0, "a finite float > 0 (1 = off)"),
        ("--seed", args.seed, 0 <= args.seed < SEED_LIMIT, "an int in [0, 2**63)"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, "an int >= 1"),
    ]  # fmt: skip
    for flag, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"{flag} {value} is invalid: expected {expected}")


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


def load_model(path: str, device: str):
    """(cfg, params, tokenizer) of a checkpoint; clear errors for a bad path, a device this
    machine lacks, or no tokenizer."""
    from llmfn.checkpoint import load_for_inference
    from llmfn.tasks import language_model_checkpoint

    if not Path(path).exists():
        raise ValueError(
            f"checkpoint path {path} does not exist: expected a checkpoint or run folder"
        )
    folder = language_model_checkpoint(path, "generated from")
    cfg, params, tokenizer = load_for_inference(
        folder, device=resolve_device(device, option="--device"), verify=False
    )
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
        check_flags(args)
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompt_file)
        cfg, params, tokenizer = load_model(args.checkpoint, args.device)
        if args.prompt is not None:
            print_stream(args.prompt, stream_text(params, cfg, tokenizer, prompts, **options))
            return 0
        for first in range(0, len(prompts), args.batch_size):
            batch = prompts[first : first + args.batch_size]
            texts = generate_text(params, cfg, tokenizer, batch, prompt_offset=first, **options)
            for offset, text in enumerate(texts):
                print(
                    f"=== {first + offset + 1}: {batch[offset]}\n{batch[offset]}{text}\n",
                    flush=True,
                )
    except BrokenPipeError:  # the reader stopped early: | head
        return closed_pipe_exit()
    except (ValueError, OSError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
