"""`SFTDataModule`: JSONL conversations -> fixed-shape rows with a loss mask on the answers.

`prepare()` (rank 0) trains or loads the tokenizer and tokenizes every record into
`{cache_dir}/sft-{name}-{tokenizer}-{hash}/` (atomically). `setup()` splits the examples
(every 1/val_fraction-th is held out) and lays them into rows of `seq_len + 1` tokens:
packed (whole examples placed one after another, a new row when the next does not fit) or
padded (one example per row). Examples longer than a row are truncated. Batches:

    {"inputs": long [B, T], "targets": long [B, T]}   targets = next token, -100 off the answers
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from llmfn.data.atomic import atomic_folder
from llmfn.data.lifecycle import NotSetUp, is_prepared, require_prepared
from llmfn.data.sampling import SlotSampler
from llmfn.data.sft_records import (
    check_jsonl_path,
    plain_text,
    read_records,
    render,
    tokenize_example,
)
from llmfn.data.text_module import cache_key, slug, tokenizer_label
from llmfn.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer

IGNORE_INDEX = -100
FORMAT = "llmfn-sft"
FORMAT_VERSION = 1


def held_out(count: int, fraction: float) -> np.ndarray:
    """bool [count]: every 1/fraction-th example, spread evenly (floor(count·fraction) of them)."""
    index = np.arange(count)
    return np.floor((index + 1) * fraction) > np.floor(index * fraction)


def pack_rows(
    examples: list[tuple[np.ndarray, np.ndarray]], window: int, pad_id: int, pack: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, learn) examples -> (ids int64 [R, window], learn bool [R, window], truncated).

    pack: examples follow each other in a row while they fit whole; else one per row. The
    rest of a row is `pad_id` with learn False."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    used, truncated = window, 0  # `used` of the current row; start "full" to open a row
    for ids, learn in examples:
        if len(ids) > window:
            ids, learn, truncated = ids[:window], learn[:window], truncated + 1
        if not pack or used + len(ids) > window:
            rows.append([])
            used = 0
        rows[-1].append((ids, learn))
        used += len(ids)
    out_ids = np.full((len(rows), window), pad_id, dtype=np.int64)
    out_learn = np.zeros((len(rows), window), dtype=bool)
    for row, parts in enumerate(rows):
        ids = np.concatenate([p[0] for p in parts])
        out_ids[row, : len(ids)] = ids
        out_learn[row, : len(ids)] = np.concatenate([p[1] for p in parts])
    return out_ids, out_learn, truncated


def sft_batch(ids: np.ndarray, learn: np.ndarray) -> dict[str, torch.Tensor]:
    """rows [B, T + 1] -> {"inputs": [B, T], "targets": [B, T]}; a target is kept only where
    the token it predicts is learned."""
    targets = np.where(learn[:, 1:], ids[:, 1:], IGNORE_INDEX)
    return {
        "inputs": torch.from_numpy(np.ascontiguousarray(ids[:, :-1])),
        "targets": torch.from_numpy(targets),
    }


class SFTDataModule:
    def __init__(
        self,
        path: str | Path,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        val_batches: int = 8,
        tokenizer: str = "bpe",
        vocab_size: int = 2048,
        val_fraction: float = 0.05,
        cache_dir: str | Path = ".cache/llmfn",
        pack: bool = True,
    ):
        self.source = check_jsonl_path(path)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} is invalid: expected a float in [0, 1)")
        self.seq_len, self.batch_size, self.seed, self.num_val_batches = (
            seq_len,
            batch_size,
            seed,
            val_batches,
        )
        self.tokenizer_spec, self.tokenizer_vocab_size = tokenizer, vocab_size
        self.val_fraction, self.pack = val_fraction, pack
        label, identity = tokenizer_label(tokenizer)
        key = cache_key(
            [self.source],
            {"tokenizer": identity, "vocab_size": vocab_size, "format": FORMAT_VERSION},
        )
        self.path = Path(cache_dir) / f"sft-{slug(self.source.stem)}-{label}-{key}"
        self.vocab_size: int | None = None
        self.tokenizer: Tokenizer | None = None
        self.steps_per_epoch: int | None = None
        self.train_rows: tuple[np.ndarray, np.ndarray] | None = None

    # --- prepare: tokenizer + tokenized examples, once ---------------------------------------
    def prepare(self) -> None:
        if is_prepared(self.path):
            return
        examples = [render(record, where) for where, record in read_records(self.source)]
        if not examples:
            raise ValueError(f"SFT data '{self.source}' holds no records")
        tokenizer = build_tokenizer(
            self.tokenizer_spec,
            lambda: (plain_text(pieces) for pieces in examples),
            vocab_size=self.tokenizer_vocab_size,
        )
        encoded = [tokenize_example(pieces, tokenizer) for pieces in examples]
        lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
        with atomic_folder(self.path, if_exists="keep") as tmp:
            np.save(tmp / "ids.npy", np.concatenate([ids for ids, _ in encoded]))
            np.save(tmp / "learn.npy", np.concatenate([learn for _, learn in encoded]))
            np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
            tokenizer.save(tmp)
            meta = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "source": str(self.source),
                "examples": len(encoded),
                "tokens": int(lengths.sum()),
                "vocab_size": tokenizer.vocab_size,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")

    # --- setup: split, lay out rows -----------------------------------------------------------
    def _examples(self) -> list[tuple[np.ndarray, np.ndarray]]:
        ids, learn = np.load(self.path / "ids.npy"), np.load(self.path / "learn.npy")
        offsets = np.load(self.path / "offsets.npy")
        return [(ids[a:b], learn[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    def setup(self, *, rank: int = 0, world_size: int = 1) -> None:
        require_prepared(self.path, "prepared SFT data")
        self.rank, self.world_size = rank, world_size
        self.tokenizer = load_tokenizer(self.path)
        self.vocab_size = self.tokenizer.vocab_size
        pad = next((i for i in (self.tokenizer.pad_id, self.tokenizer.eos_id) if i is not None), 0)
        examples = self._examples()
        is_val = held_out(len(examples), self.val_fraction)
        window = self.seq_len + 1
        train_ids, train_learn, train_truncated = pack_rows(
            [e for e, v in zip(examples, is_val, strict=True) if not v], window, pad, self.pack
        )
        val_ids, val_learn, val_truncated = pack_rows(
            [e for e, v in zip(examples, is_val, strict=True) if v], window, pad, self.pack
        )
        truncated = train_truncated + val_truncated
        if truncated:
            warnings.warn(
                f"{self.source}: {truncated} examples are longer than seq_len + 1 = {window} tokens and were truncated",
                stacklevel=2,
            )
        if len(train_learn) and not train_learn[:, 1:].any():  # every target would be -100
            cause = (
                f"remain after truncating examples to seq_len+1={window} tokens: raise "
                "model.max_seq_len or shorten the prompts"
                if train_truncated
                else "to learn: every response is empty"
            )
            raise ValueError(f"{self.source}: no response tokens {cause}")
        self.train_rows, self.val_rows = (train_ids, train_learn), (val_ids, val_learn)
        self.pad_id = pad
        try:
            self.sampler = SlotSampler(len(train_ids), self.batch_size, world_size, self.seed)
        except ValueError as err:
            raise ValueError(
                f"{self.source} ({'packed' if self.pack else 'padded'} rows of {window} tokens): {err}"
            ) from None
        self.steps_per_epoch = self.sampler.steps_per_epoch

    # --- batches -------------------------------------------------------------------------------
    def train_batch(self, index: int) -> dict[str, torch.Tensor]:
        if self.train_rows is None:
            raise NotSetUp()
        rows = self.sampler.slots(index, self.rank)
        return sft_batch(self.train_rows[0][rows], self.train_rows[1][rows])

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Up to `val_batches` batches of the held-out rows, in order; a short last batch is
        filled with padding rows that carry no loss (so shapes stay fixed)."""
        if self.train_rows is None:
            raise NotSetUp()
        ids, learn = self.val_rows
        for first in range(
            0, min(len(ids), self.num_val_batches * self.batch_size), self.batch_size
        ):
            rows_ids, rows_learn = (
                ids[first : first + self.batch_size],
                learn[first : first + self.batch_size],
            )
            missing = self.batch_size - len(rows_ids)
            if missing:
                rows_ids = np.concatenate(
                    [rows_ids, np.full((missing, ids.shape[1]), self.pad_id, dtype=np.int64)]
                )
                rows_learn = np.concatenate(
                    [rows_learn, np.zeros((missing, ids.shape[1]), dtype=bool)]
                )
            yield sft_batch(rows_ids, rows_learn)
