"""`TokenBinDataModule`: random windows of `seq_len + 1` tokens from memory-mapped bins.

The windows of micro-batch `index` on `rank` are a pure function of (seed, index, rank,
world_size) (see `sampling.WindowSampler`): resuming needs no loader state, and the ranks of
one step never share a window. Validation is a fixed set of windows spread over val.bin.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from llmfn.data.lifecycle import NotSetUp
from llmfn.data.sampling import WindowSampler, spread_starts
from llmfn.data.token_bins import TokenBins, first_id_beyond, id_beyond_error
from llmfn.data.tokenizer import Tokenizer, load_tokenizer

SCAN_TOKENS = 1 << 28  # bins up to this size are scanned for bad ids at setup (~0.1 s when cached)


def gather_windows(tokens: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """tokens [N] (memmap), starts [B] -> int64 [B, window]: tokens[s : s + window] per row."""
    return tokens[starts[:, None] + np.arange(window)].astype(np.int64)


def lm_batch(windows: np.ndarray) -> dict[str, torch.Tensor]:
    """windows int64 [B, T + 1] -> {"inputs": [B, T], "targets": [B, T]} (targets = next token)."""
    # numpy copies: torch's intra-op threads make the same copy ~100x slower on a busy CPU
    inputs, targets = np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])
    return {"inputs": torch.from_numpy(inputs), "targets": torch.from_numpy(targets)}


class TokenBinDataModule:
    """Batches {"inputs", "targets"}: long [batch_size, seq_len] from a prepared folder."""

    def __init__(
        self,
        path: str | Path,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        val_batches: int = 8,
    ):
        if seq_len <= 0 or batch_size <= 0 or val_batches < 0:
            raise ValueError(
                f"TokenBinDataModule: seq_len={seq_len} and batch_size={batch_size} must be positive, val_batches={val_batches} >= 0"
            )
        self.path = Path(path)
        self.seq_len, self.batch_size, self.seed, self.num_val_batches = (
            seq_len,
            batch_size,
            seed,
            val_batches,
        )
        self.vocab_size: int | None = None
        self.tokenizer: Tokenizer | None = None
        self.steps_per_epoch: int | None = None
        self.bins: TokenBins | None = None

    @property
    def window(self) -> int:
        return self.seq_len + 1

    def prepare(self) -> None:
        """Nothing to build: check that the folder is a complete token-bin folder."""
        TokenBins.open(self.path)

    def setup(self, *, rank: int = 0, world_size: int = 1) -> None:
        self.bins = TokenBins.open(self.path)
        self.rank, self.world_size = rank, world_size
        self.vocab_size = self.bins.vocab_size
        self._check_ids()
        self.tokenizer = self._load_tokenizer()
        try:
            self.sampler = WindowSampler(
                len(self.bins.train), self.window, self.batch_size, world_size, self.seed
            )
            self.steps_per_epoch = self.sampler.steps_per_epoch  # too little data fails here
        except ValueError as err:
            raise ValueError(f"{self.path / 'train.bin'}: {err}") from None
        self.val_starts = self._val_starts()

    def _load_tokenizer(self) -> Tokenizer | None:
        """The tokenizer saved with the bins, which must have meta.json's vocabulary size; None
        (with a warning) when the folder holds none."""
        path = self.bins.tokenizer_path
        if path is None:
            warnings.warn(
                f"{self.path} holds no {self.bins.meta['tokenizer'].get('file', 'tokenizer.json')}: "
                "training works, but the run will have no tokenizer to generate text with "
                "(copy the one the bins were made with into the folder)",
                stacklevel=3,
            )
            return None
        tokenizer = load_tokenizer(path)
        if tokenizer.vocab_size != self.bins.vocab_size:
            raise ValueError(
                f"{path}: the tokenizer has {tokenizer.vocab_size} ids, but "
                f"{self.path / 'meta.json'}'s tokenizer.vocab_size is {self.bins.vocab_size}: it "
                "is not the tokenizer the bins were made with (copy that one into the folder, or "
                "re-run prepare)"
            )
        return tokenizer

    def _check_ids(self) -> None:
        """Ids >= vocab_size would index past the model's embedding: scan bins of up to
        SCAN_TOKENS now; the batches of larger ones are checked as they are read."""
        self.unscanned = set()
        for split, tokens in (("train", self.bins.train), ("val", self.bins.val)):
            if len(tokens) > SCAN_TOKENS:
                self.unscanned.add(split)
                continue
            bad = first_id_beyond(tokens, self.vocab_size)
            if bad is not None:
                path = self.path / f"{split}.bin"
                raise id_beyond_error(path, int(tokens[bad]), bad, self.vocab_size)

    def _windows(self, split: str, starts: np.ndarray) -> np.ndarray:
        """int64 [B, window] of `split`'s bin, with no id >= vocab_size (checked here for bins
        too large to scan at setup)."""
        tokens = self.bins.train if split == "train" else self.bins.val
        windows = gather_windows(tokens, starts, self.window)
        if split not in self.unscanned:
            return windows
        bad = first_id_beyond(windows, self.vocab_size)
        if bad is not None:
            row, col = divmod(bad, self.window)
            position = int(starts[row]) + col
            raise id_beyond_error(
                self.path / f"{split}.bin", int(windows[row, col]), position, self.vocab_size
            )
        return windows

    def short_val_warning(self) -> str:
        """What to say when val.bin holds less than one window (no validation batches)."""
        return (
            f"{self.path / 'val.bin'} holds {len(self.bins.val)} tokens, fewer than one window of {self.window}: "
            "no validation batches (prepare with a larger val fraction)"
        )

    def _val_starts(self) -> np.ndarray:
        count = self.num_val_batches * self.batch_size
        if count and len(self.bins.val) < self.window:
            warnings.warn(self.short_val_warning(), stacklevel=3)
            count = 0
        return (
            spread_starts(len(self.bins.val), self.window, count)
            if count
            else np.empty(0, np.int64)
        )

    def _require_setup(self) -> None:
        if self.bins is None:
            raise NotSetUp()

    def train_batch(self, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch `index` of this rank: {"inputs", "targets"} long [batch_size, seq_len]."""
        self._require_setup()
        starts = self.sampler.starts(index, self.rank)
        return lm_batch(self._windows("train", starts))

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The same `val_batches` batches every call (and on every rank)."""
        self._require_setup()
        for first in range(0, len(self.val_starts), self.batch_size):
            starts = self.val_starts[first : first + self.batch_size]
            yield lm_batch(self._windows("val", starts))
