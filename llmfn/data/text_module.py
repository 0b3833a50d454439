"""`TextDataModule`: a text file, folder or glob, tokenized once into a cache, then sampled
like `TokenBinDataModule`.

`prepare()` (rank 0) runs the same code as the prepare CLI into
`{cache_dir}/{name}-{tokenizer}-{hash}/`, where the hash covers the files (path, size, mtime)
and the tokenizer settings: a changed file or setting prepares a new folder, an unchanged one
reuses the cache. The folder appears atomically, so concurrent or killed runs never see half
of it. `setup()` (every rank) only opens it. A cache_dir that the inputs would read back (inside
an input folder, or matched by an input glob) is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from llmfn.data.binarize import BINS_REVISION, FORMAT_VERSION, OUTPUT_FILES, prepare_bins
from llmfn.data.lifecycle import is_prepared, require_prepared
from llmfn.data.sources import check_not_read_back, resolve_inputs
from llmfn.data.token_bin_module import TokenBinDataModule
from llmfn.data.tokenizer import TRAINABLE, tokenizer_file


def select_evenly(files: list[Path], max_files: int | None) -> list[Path]:
    """At most `max_files` of `files`, spread evenly over the list (its order kept)."""
    if max_files is None or len(files) <= max_files:
        return list(files)
    if max_files <= 0:
        raise ValueError(f"max_files={max_files} is invalid: expected a positive number or None")
    picks = np.unique(np.linspace(0, len(files) - 1, max_files).round().astype(np.int64))
    return [files[i] for i in picks]


def tokenizer_label(spec: str) -> tuple[str, str]:
    """(short name for folder names, identity for cache keys): a file is identified by content."""
    if spec in TRAINABLE:
        return spec, spec
    path = tokenizer_file(spec)
    return "custom", hashlib.sha256(path.read_bytes()).hexdigest()


def cache_key(files: Iterable[Path], settings: dict) -> str:
    """A short hash of the files' paths, sizes and modification times plus `settings`."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "data"


class TextDataModule(TokenBinDataModule):
    """Text -> tokens (cached) -> random windows; batches as `TokenBinDataModule`."""

    def __init__(
        self,
        inputs: str | Path | Iterable[str | Path],
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        val_batches: int = 8,
        tokenizer: str = "bpe",
        vocab_size: int = 2048,
        val_fraction: float = 0.05,
        cache_dir: str | Path = ".cache/llmfn",
        max_files: int | None = None,
        errors: str = "strict",
        name: str | None = None,
        progress: bool = True,
    ):
        self.files = select_evenly(resolve_inputs(inputs), max_files)
        label, identity = tokenizer_label(tokenizer)
        self.prepare_options = {
            "tokenizer": tokenizer,
            "vocab_size": vocab_size,
            "val_fraction": val_fraction,
            "errors": errors,
        }
        settings = {"tokenizer": identity, "format": FORMAT_VERSION, "revision": BINS_REVISION}
        key = cache_key(self.files, {**self.prepare_options, **settings})
        if name is None:
            first = Path(str(inputs) if isinstance(inputs, str | Path) else self.files[0])
            name = "text-" + slug(first.stem or first.name)
        self.progress = progress
        folder = Path(cache_dir) / f"{name}-{label}-{key}"
        outputs = [f"{folder.name}/{output}" for output in OUTPUT_FILES]
        check_not_read_back(inputs, Path(cache_dir), outputs, "data.cache_dir")
        super().__init__(
            folder, seq_len=seq_len, batch_size=batch_size, seed=seed, val_batches=val_batches
        )

    def prepare(self) -> None:
        """Tokenize into the cache folder unless a complete one is there (idempotent)."""
        if is_prepared(self.path):
            return
        prepare_bins(
            self.files,
            self.path,
            if_exists="keep",
            progress=self.progress,
            errors_setting="data.errors=",
            val_fraction_setting="data.val_fraction=",
            **self.prepare_options,
        )

    def setup(self, *, rank: int = 0, world_size: int = 1) -> None:
        require_prepared(self.path)
        super().setup(rank=rank, world_size=world_size)

    def short_val_warning(self) -> str:
        """As `TokenBinDataModule`'s, naming data.val_fraction (not the cache)."""
        fraction = self.prepare_options["val_fraction"]
        if fraction == 0:
            return f"data.val_fraction={fraction} holds out no text: no validation batches, so no val_loss"
        return (
            f"data.val_fraction={fraction} holds out {len(self.bins.val)} tokens, fewer than one "
            f"window of {self.window} (max_seq_len + 1): no validation batches, so no val_loss "
            "(raise data.val_fraction)"
        )
