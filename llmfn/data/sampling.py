"""Which examples a micro-batch holds, as a pure function of (seed, index, rank, world_size).

No loader state: resuming at micro-batch `index` recomputes exactly the batches an
uninterrupted run would have seen. Every "epoch" visits a fresh pseudo-random permutation of
the slots (a keyed Feistel network); the `batch_size × world_size` slots of one step are
consecutive positions of that permutation, so they are distinct: ranks never share an
example within a step. The permutation of the current epoch is memoised when it is small
(<= MAX_CACHED_SLOTS); larger ones are evaluated for the batch only (O(batch) per call).

    sampler = SlotSampler(num_slots=10_000, batch_size=8, world_size=2, seed=0)
    sampler.slots(index=5, rank=1)  # -> int64 [8], distinct from rank 0's at index 5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

FEISTEL_ROUNDS = 4
MAX_CACHED_SLOTS = 1 << 24  # a memoised epoch permutation takes at most 64 MiB (uint32)
_U64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a strong 64-bit hash, elementwise (uint64 -> uint64)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


@lru_cache(maxsize=64)
def round_keys(seed: int, epoch: int, stream: int = 0) -> np.ndarray:
    """FEISTEL_ROUNDS + 1 uint64 keys from (seed, epoch, stream) (read-only, memoised)."""
    sequence = np.random.SeedSequence([seed & _U64, epoch & _U64, stream & _U64])
    keys = sequence.generate_state(FEISTEL_ROUNDS + 1, dtype=np.uint64)
    keys.flags.writeable = False
    return keys


def _feistel(x: np.ndarray, half_bits: int, keys: np.ndarray) -> np.ndarray:
    """A keyed bijection of [0, 4**half_bits) (uint64 -> uint64)."""
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    left, right = x >> shift, x & mask
    for key in keys[:FEISTEL_ROUNDS]:
        left, right = right, left ^ (_mix(right ^ key) & mask)
    return (left << shift) | right


def permute(positions: np.ndarray, size: int, keys: np.ndarray) -> np.ndarray:
    """positions (int, each in [0, size)) -> their images under a keyed permutation of
    [0, size): distinct positions give distinct results. Cycle-walks a Feistel network over
    the smallest power-of-4 domain >= size (at most 4·size, so a few walks on average)."""
    positions = np.asarray(positions, dtype=np.int64)
    if size <= 0 or positions.size and (positions.min() < 0 or positions.max() >= size):
        raise ValueError(f"permute: positions must lie in [0, {size})")
    half_bits = max(1, (int(size - 1).bit_length() + 1) // 2)
    out = _feistel(positions.astype(np.uint64), half_bits, keys)
    outside = out >= size
    while outside.any():
        out[outside] = _feistel(out[outside], half_bits, keys)
        outside = out >= size
    return out.astype(np.int64)


@lru_cache(maxsize=2)
def epoch_permutation(size: int, seed: int, epoch: int, stream: int) -> np.ndarray:
    """The whole permutation of [0, size) for one epoch (uint32, read-only, memoised)."""
    table = permute(np.arange(size), size, round_keys(seed, epoch, stream)).astype(np.uint32)
    table.flags.writeable = False
    return table


@dataclass(frozen=True)
class SlotSampler:
    """Micro-batches of `batch_size` slot ids per rank, drawn without replacement per epoch."""

    num_slots: int
    batch_size: int
    world_size: int = 1
    seed: int = 0
    stream: int = 0  # separates independent samplers that share a seed

    def __post_init__(self):
        if self.num_slots < self.per_step:
            raise ValueError(
                f"only {self.num_slots} examples for batch_size={self.batch_size} × world_size={self.world_size} "
                f"= {self.per_step} distinct examples per step: use more data or a smaller data.batch_size"
            )

    @property
    def per_step(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per rank in one pass (the last `num_slots % per_step` slots of each
        epoch's permutation are skipped; they differ from epoch to epoch)."""
        return self.num_slots // self.per_step

    def epoch_offset(self, index: int, modulus: int) -> int:
        """A number in [0, modulus) that changes with the epoch of `index`."""
        keys = round_keys(self.seed, index // self.steps_per_epoch, self.stream)
        return int(keys[FEISTEL_ROUNDS] % np.uint64(modulus))

    def slots(self, index: int, rank: int) -> np.ndarray:
        """int64 [batch_size]: the slots of micro-batch `index` on `rank`."""
        if not 0 <= rank < self.world_size:
            raise ValueError(
                f"rank={rank} is invalid: expected 0 <= rank < world_size={self.world_size}"
            )
        if index < 0:
            raise ValueError(f"batch index={index} is invalid: expected >= 0")
        epoch = index // self.steps_per_epoch
        first = (index % self.steps_per_epoch) * self.per_step + rank * self.batch_size
        if self.num_slots <= MAX_CACHED_SLOTS:
            table = epoch_permutation(self.num_slots, self.seed, epoch, self.stream)
            return table[first : first + self.batch_size].astype(np.int64)
        keys = round_keys(self.seed, epoch, self.stream)
        return permute(np.arange(first, first + self.batch_size), self.num_slots, keys)


@dataclass(frozen=True)
class WindowSampler:
    """Start offsets of random windows of `window` tokens in a stream of `num_tokens`.

    Windows of one epoch are non-overlapping (a grid of stride `window` whose offset changes
    every epoch), so ranks never share a token within a step; a stream too short for that
    falls back to stride 1 (distinct but overlapping windows)."""

    num_tokens: int
    window: int
    batch_size: int
    world_size: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.num_tokens < self.window:
            raise ValueError(
                f"only {self.num_tokens} tokens: fewer than one window of {self.window} (max_seq_len + 1)"
            )

    @property
    def stride(self) -> int:
        per_step = self.batch_size * self.world_size
        return self.window if (self.num_tokens - self.window + 1) // self.window >= per_step else 1

    @cached_property
    def slot_sampler(self) -> SlotSampler:
        num_slots = (self.num_tokens - self.window + 1) // self.stride
        if num_slots < self.batch_size * self.world_size:
            raise ValueError(
                f"only {num_slots} distinct windows of {self.window} tokens (max_seq_len + 1) fit in "
                f"{self.num_tokens} tokens, fewer than batch_size={self.batch_size} × world_size="
                f"{self.world_size}: use more data, a shorter max_seq_len or a smaller data.batch_size"
            )
        return SlotSampler(num_slots, self.batch_size, self.world_size, self.seed)

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per rank in one pass over the tokens. With stride 1 the windows
        overlap: a pass is ceil(num_tokens / (window × batch_size × world_size)) steps, not
        one over every window (which would read each token about `window` times)."""
        sampler = self.slot_sampler  # too little data fails here
        if self.stride == self.window:
            return sampler.steps_per_epoch
        return max(1, math.ceil(self.num_tokens / (self.window * sampler.per_step)))

    def starts(self, index: int, rank: int) -> np.ndarray:
        """int64 [batch_size]: window starts of micro-batch `index` on `rank`."""
        sampler = self.slot_sampler
        return sampler.epoch_offset(index, self.stride) + sampler.slots(index, rank) * self.stride


def spread_starts(num_tokens: int, window: int, count: int) -> np.ndarray:
    """int64 [count]: `count` window starts spread evenly over the stream (the fixed validation
    set); overlapping, or repeated, only when the stream is too short for distinct ones."""
    if num_tokens < window:
        raise ValueError(
            f"only {num_tokens} tokens: fewer than one window of {window} (max_seq_len + 1)"
        )
    return np.linspace(0, num_tokens - window, count).round().astype(np.int64)
