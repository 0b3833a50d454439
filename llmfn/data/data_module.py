"""The `DataModule` interface the training driver consumes, and `build_data_module(config)`.

data = build_data_module(config.data, seq_len=model.max_seq_len, seed=train.seed)
data.prepare()                                  # rank 0: heavy, idempotent, cached
data.setup(rank=rank, world_size=world_size)    # every rank, after prepare
batch = data.train_batch(step * grad_accum_steps + micro)   # pure in (seed, index, rank)
for batch in data.val_batches(): ...           # the same batches every call
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch

from llmfn.data.sft_module import SFTDataModule
from llmfn.data.stdlib_module import DEFAULT_MAX_FILES, StdlibDataModule
from llmfn.data.synthetic_module import RegressionDataModule, SyntheticDataModule
from llmfn.data.text_module import TextDataModule
from llmfn.data.token_bin_module import TokenBinDataModule
from llmfn.data.tokenizer import Tokenizer

MODULES = ("stdlib", "text", "token_bin", "sft", "synthetic", "regression")


@runtime_checkable
class DataModule(Protocol):
    vocab_size: int | None  # the tokenizer's, or None (regression)
    tokenizer: Tokenizer | None
    steps_per_epoch: int | None  # per-rank micro-batches in one pass over the train split

    def prepare(self) -> None: ...

    def setup(self, *, rank: int, world_size: int) -> None: ...

    def train_batch(self, index: int) -> dict[str, torch.Tensor]: ...

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]]: ...


def build_data_module(data_cfg, *, seq_len: int, seed: int) -> DataModule:
    """The module named by `data_cfg.module` (an `llmfn.config.DataConfig`)."""
    common = {
        "seq_len": seq_len,
        "batch_size": data_cfg.batch_size,
        "seed": seed,
        "val_batches": data_cfg.val_batches,
    }
    tokenized = {
        "tokenizer": data_cfg.tokenizer,
        "vocab_size": data_cfg.tokenizer_vocab_size,
        "val_fraction": data_cfg.val_fraction,
        "cache_dir": data_cfg.cache_dir,
    }
    errors = data_cfg.errors
    module = data_cfg.module
    if module == "stdlib":
        max_files = DEFAULT_MAX_FILES if data_cfg.max_files is None else data_cfg.max_files
        return StdlibDataModule(max_files=max_files, errors=errors, **tokenized, **common)
    if module in ("text", "token_bin", "sft") and not data_cfg.path:
        raise ValueError(f"data.module={module!r} needs data.path (a file, folder or glob to read)")
    if module == "text":
        return TextDataModule(
            data_cfg.path, max_files=data_cfg.max_files, errors=errors, **tokenized, **common
        )
    if module == "token_bin":
        return TokenBinDataModule(data_cfg.path, **common)
    if module == "sft":
        return SFTDataModule(data_cfg.path, pack=data_cfg.pack, **tokenized, **common)
    size = {"size": data_cfg.synthetic_size, "val_fraction": data_cfg.val_fraction}
    if module == "synthetic":
        return SyntheticDataModule(vocab_size=data_cfg.synthetic_vocab_size, **size, **common)
    if module == "regression":
        common.pop("seq_len")
        return RegressionDataModule(features=data_cfg.regression_features, **size, **common)
    raise ValueError(f"data.module={module!r} is invalid: expected one of {', '.join(MODULES)}")
