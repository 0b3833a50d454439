"""A prepared token-bin folder (see `llmfn.data.prepare`), opened as memory maps.

bins = TokenBins.open("data/corpus")
bins.train[1000:1257]   # numpy uint16/uint32 view, read lazily from disk
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "llmfn-token-bin"  # meta.json's "format" in a folder that prepare wrote
SCAN_CHUNK = 1 << 24  # token ids checked per numpy call


def is_token_bin_folder(folder: Path) -> bool:
    """Whether `folder` holds a prepared dataset: a meta.json whose "format" is FORMAT."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


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


def _field(section: dict, key: str, meta_path: Path, expected: str, valid, label: str = ""):
    """section[key] when present and `valid(value)`, else an error naming the file and field."""
    name = label or key
    if key not in section:
        raise ValueError(f"{meta_path}: '{name}' is missing: expected {expected} (re-run prepare)")
    if not valid(section[key]):
        raise ValueError(
            f"{meta_path}: '{name}' is {section[key]!r}: expected {expected} (re-run prepare)"
        )
    return section[key]


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_size(value) -> bool:
    return _is_count(value) and value >= 1


def _is_file_name(value) -> bool:
    """A plain file name: no folder part, so it names a file inside the token-bin folder."""
    return isinstance(value, str) and value not in ("", ".", "..") and Path(value).name == value


def check_meta(meta, meta_path: Path) -> None:
    """The fields of a token-bin meta.json that reading the folder relies on, with their types."""
    if not isinstance(meta, dict):
        raise ValueError(
            f"{meta_path}: expected a JSON object, got {type(meta).__name__} (re-run prepare)"
        )
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    _field(meta, "dtype", meta_path, "uint16 or uint32", lambda v: v in ("uint16", "uint32"))
    for key in ("train_tokens", "val_tokens"):
        _field(meta, key, meta_path, "a whole number >= 0", _is_count)
    tokenizer = _field(
        meta, "tokenizer", meta_path, "an object with vocab_size", lambda v: isinstance(v, dict)
    )
    label = "tokenizer.vocab_size"
    _field(tokenizer, "vocab_size", meta_path, "a whole number >= 1", _is_size, label)
    if "file" in tokenizer:
        expected = "a file name in the folder (no path)"
        _field(tokenizer, "file", meta_path, expected, _is_file_name, "tokenizer.file")


def first_id_beyond(tokens: np.ndarray, vocab_size: int) -> int | None:
    """Position of the first id >= `vocab_size` in tokens [...] (read in chunks), or None."""
    if tokens.size == 0 or np.iinfo(tokens.dtype).max < vocab_size:
        return None  # every storable id fits
    flat = tokens.reshape(-1)
    for start in range(0, len(flat), SCAN_CHUNK):
        chunk = flat[start : start + SCAN_CHUNK]
        if chunk.max() >= vocab_size:
            return start + int(np.argmax(chunk >= vocab_size))
    return None


def id_beyond_error(path: Path, token: int, position: int, vocab_size: int) -> ValueError:
    return ValueError(
        f"{path}: token id {token} at position {position:,} is >= the vocabulary size "
        f"{vocab_size} in meta.json: the bins do not match their tokenizer (re-run prepare)"
    )


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
        if folder.is_file():
            raise NotADirectoryError(
                f"token-bin folder '{folder}' is a file: expected a folder written by "
                "`python -m llmfn.data.prepare` (to train on a text file, use data.module=text)"
            )
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
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{meta_path} cannot be read as JSON: {err}") from None
        check_meta(meta, meta_path)
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        train = _memmap(folder / "train.bin", dtype, meta["train_tokens"])
        val = _memmap(folder / "val.bin", dtype, meta["val_tokens"])
        return cls(folder, meta, train, val)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def tokenizer_path(self) -> Path | None:
        path = self.folder / self.meta["tokenizer"].get("file", "tokenizer.json")
        return path if path.is_file() else None
