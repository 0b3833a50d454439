"""Synthetic data, generated from the seed in memory: no files, no tokenizer.

`SyntheticDataModule`: token sequences from a random Markov chain in which every token has
`branching` equally likely successors; the best possible loss is ln(branching) (1.386 for 4),
far below the ln(vocab_size) of guessing, so a model visibly learns.
`RegressionDataModule`: x ~ N(0, 1) [features], y = f(x) + 0.1·noise [1], where f is a random
smooth function (a fixed random tanh network, scaled to unit variance); the best possible mean
squared error is 0.01, while a linear fit stays far above it.

Both hold `synthetic_size` examples, hold out `val_fraction` of them (at least one batch), and
sample like the other modules: micro-batch `index` on `rank` is a pure function of
(seed, index, rank, world_size).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from llmfn.data.lifecycle import NotSetUp
from llmfn.data.sampling import SlotSampler
from llmfn.data.token_bin_module import lm_batch

BRANCHING = 4
REGRESSION_NOISE = 0.1
TEACHER_WIDTH = 32


def held_out_count(size: int, batch_size: int, val_fraction: float) -> int:
    """val_fraction of `size` examples, at least one batch."""
    return max(batch_size, round(size * val_fraction))


def min_size(batch_size: int, val_fraction: float) -> int:
    """The fewest examples that leave a training batch beside the validation ones."""
    size = 2 * batch_size
    while size - held_out_count(size, batch_size, val_fraction) < batch_size:
        size += 1
    return size


def split_count(size: int, batch_size: int, val_fraction: float, val_batches: int) -> int:
    """Examples held out for validation: val_fraction of them, at least one batch (if wanted)."""
    if val_batches == 0 or val_fraction == 0:
        return 0
    held = held_out_count(size, batch_size, val_fraction)
    if size - held < batch_size:
        needed = min_size(batch_size, val_fraction)
        raise ValueError(
            f"data.synthetic_size={size} is too small: needs at least {needed} examples "
            f"(a training batch of data.batch_size={batch_size}, plus data.val_fraction="
            f"{val_fraction} of them, at least one batch, held out for validation)"
        )
    return held


def markov_sequences(
    count: int, length: int, vocab_size: int, rng: np.random.Generator, branching: int = BRANCHING
) -> np.ndarray:
    """int64 [count, length]: walks of a random chain, each token followed by one of `branching`
    successors (fixed per token, drawn from `rng`)."""
    successors = rng.integers(0, vocab_size, size=(vocab_size, branching))
    out = np.empty((count, length), dtype=np.int64)
    out[:, 0] = rng.integers(0, vocab_size, size=count)
    choices = rng.integers(0, branching, size=(count, length))
    for t in range(1, length):
        out[:, t] = successors[out[:, t - 1], choices[:, t]]
    return out


class _InMemoryModule:
    """Shared sampling over in-memory train/val example arrays."""

    tokenizer = None

    def __init__(
        self, *, batch_size: int, seed: int, size: int, val_fraction: float, val_batches: int
    ):
        if size <= 0 or batch_size <= 0:
            raise ValueError(
                f"synthetic data: synthetic_size={size} and batch_size={batch_size} must be positive"
            )
        self.batch_size, self.seed, self.size, self.num_val_batches = (
            batch_size,
            seed,
            size,
            val_batches,
        )
        self.num_val = split_count(size, batch_size, val_fraction, val_batches)
        self.steps_per_epoch: int | None = None
        self.sampler: SlotSampler | None = None

    def _examples(self) -> dict[str, np.ndarray]:  # each [size, ...]
        raise NotImplementedError

    def _batch(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Nothing to prepare: the data is generated in setup()."""

    def setup(self, *, rank: int = 0, world_size: int = 1) -> None:
        data = self._examples()
        self.val = {name: array[: self.num_val] for name, array in data.items()}
        self.train = {name: array[self.num_val :] for name, array in data.items()}
        self.rank = rank
        self.sampler = SlotSampler(self.size - self.num_val, self.batch_size, world_size, self.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch

    def train_batch(self, index: int) -> dict[str, torch.Tensor]:
        if self.sampler is None:
            raise NotSetUp()
        rows = self.sampler.slots(index, self.rank)
        return self._batch({name: array[rows] for name, array in self.train.items()})

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Up to `val_batches` full batches of the held-out examples, the same every call."""
        if self.sampler is None:
            raise NotSetUp()
        count = min(self.num_val // self.batch_size, self.num_val_batches)
        for first in range(0, count * self.batch_size, self.batch_size):
            yield self._batch(
                {name: array[first : first + self.batch_size] for name, array in self.val.items()}
            )


class SyntheticDataModule(_InMemoryModule):
    """{"inputs", "targets"} long [batch_size, seq_len] from a random Markov chain."""

    def __init__(
        self,
        *,
        vocab_size: int,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        size: int = 4096,
        val_fraction: float = 0.05,
        val_batches: int = 8,
    ):
        super().__init__(
            batch_size=batch_size,
            seed=seed,
            size=size,
            val_fraction=val_fraction,
            val_batches=val_batches,
        )
        self.vocab_size, self.seq_len = vocab_size, seq_len

    def _examples(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 1])
        return {"tokens": markov_sequences(self.size, self.seq_len + 1, self.vocab_size, rng)}

    def _batch(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return lm_batch(rows["tokens"])


class RegressionDataModule(_InMemoryModule):
    """{"x": float [batch_size, features], "y": float [batch_size, 1]}: y = f(x) + noise."""

    vocab_size = None

    def __init__(
        self,
        *,
        features: int,
        batch_size: int,
        seed: int = 0,
        size: int = 4096,
        val_fraction: float = 0.05,
        val_batches: int = 8,
    ):
        super().__init__(
            batch_size=batch_size,
            seed=seed,
            size=size,
            val_fraction=val_fraction,
            val_batches=val_batches,
        )
        self.features = features

    def _examples(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 2])
        hidden = rng.normal(size=(self.features, TEACHER_WIDTH)) * 2 / np.sqrt(self.features)
        out = rng.normal(size=(TEACHER_WIDTH, 1))
        x = rng.normal(size=(self.size, self.features))
        clean = np.tanh(x @ hidden) @ out
        clean = (clean - clean.mean()) / clean.std()
        y = clean + REGRESSION_NOISE * rng.normal(size=(self.size, 1))
        return {
            "x": x.astype(np.float32),
            "y": y.astype(np.float32),
            "clean": clean.astype(np.float32),
        }

    def _batch(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor(rows["x"]), "y": torch.tensor(rows["y"])}  # copies
