"""A prepared token-bin folder (see `llmfn.data.prepare`), opened as memory maps.

bins = TokenBins.open("data/corpus")
bins.train[1000:1257]   # numpy uint16/uint32 view, read lazily from disk
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmfn.data.binarize import FORMAT


def _memmap(path: Path, dtype: np.dtype, expected: int) -> np.ndarray:
    """The 1-d token array in `path`; its length must match meta.json."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the token-bin folder is incomplete (re-run prepare)"
        )
    size = path.stat().st_size
    if size % dtype.itemsize or size // dtype.itemsize != expected:
        raise ValueError(
            f"{path} holds {size} bytes, but meta.json promises {expected} tokens of {dtype.name}: the folder is corrupt (re-run prepare)"
        )
    if expected == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass(frozen=True)
class TokenBins:
    folder: Path
    meta: dict
    train: np.ndarray  # [train_tokens] memmap
    val: np.ndarray  # [val_tokens] memmap

    @classmethod
    def open(cls, folder: str | Path) -> TokenBins:
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            hint = (
                "the folder does not exist"
                if not folder.exists()
                else "no meta.json: not a prepared folder, or a half-written one"
            )
            raise FileNotFoundError(
                f"token-bin folder '{folder}': {hint} (create it with `python -m llmfn.data.prepare`)"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{meta_path} cannot be read as JSON: {err}") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
        if meta.get("dtype") not in ("uint16", "uint32"):
            raise ValueError(
                f"{meta_path}: dtype {meta.get('dtype')!r} is invalid: expected uint16 or uint32"
            )
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        train = _memmap(folder / "train.bin", dtype, int(meta["train_tokens"]))
        val = _memmap(folder / "val.bin", dtype, int(meta["val_tokens"]))
        return cls(folder, meta, train, val)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def tokenizer_path(self) -> Path | None:
        path = self.folder / self.meta["tokenizer"].get("file", "tokenizer.json")
        return path if path.is_file() else None
