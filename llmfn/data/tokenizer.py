"""The one tokenizer interface, loading a saved tokenizer, and building one from a config spec.

spec = "char" | "bpe" | "path/to/tokenizer.json" | "path/to/folder"   (data.tokenizer)
tok = build_tokenizer(spec, texts, vocab_size=2048)   # trains char/bpe on texts, or loads
tok = load_tokenizer("runs/x/tokenizer")              # a folder or a tokenizer.json file
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from llmfn.data import bpe_tokenizer, char_tokenizer
from llmfn.data.bpe_tokenizer import BPETokenizer
from llmfn.data.char_tokenizer import FORMAT as CHAR_FORMAT
from llmfn.data.char_tokenizer import CharTokenizer

TRAINABLE = ("char", "bpe")
# a trainable spec -> (the smallest vocabulary it trains with, why)
MIN_VOCAB_SIZES = {
    "char": (
        char_tokenizer.MIN_VOCAB_SIZE,
        f"{len(char_tokenizer.SPECIALS)} special tokens + 1 character",
    ),
    "bpe": (
        bpe_tokenizer.MIN_VOCAB_SIZE,
        f"{bpe_tokenizer.NUM_BYTES} bytes + {len(bpe_tokenizer.DEFAULT_SPECIALS)} special tokens",
    ),
}


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int | None
    eos_id: int | None
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, directory: str | Path) -> None: ...


def tokenizer_file(spec_or_dir: str | Path) -> Path:
    """The tokenizer.json that a folder or file path names; a clear error if there is none."""
    path = Path(spec_or_dir)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"tokenizer folder '{spec_or_dir}' holds no tokenizer.json: expected a "
                "tokenizer.json file or a folder holding one"
            )
        return path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer '{spec_or_dir}' not found: expected a tokenizer.json file or a folder holding one"
            + (
                " (or the name 'char' / 'bpe' where a tokenizer is trained)"
                if str(spec_or_dir) in TRAINABLE
                else ""
            )
        )
    return path


def load_tokenizer(spec_or_dir: str | Path) -> Tokenizer:
    """A saved tokenizer: a folder with tokenizer.json, or the file itself (llmfn char format
    or any HF tokenizer.json)."""
    path = tokenizer_file(spec_or_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"tokenizer file {path} cannot be read as JSON: {err}") from None
    if isinstance(data, dict) and data.get("type") == CHAR_FORMAT:
        return CharTokenizer.from_json(data, source=str(path))
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(
            f"tokenizer file {path} is neither an llmfn char tokenizer nor an HF tokenizer.json (no 'model' key)"
        )
    return BPETokenizer.from_file(path)


def build_tokenizer(
    spec: str,
    texts: Callable[[], Iterable[str]],
    *,
    vocab_size: int,
    show_progress: bool = False,
) -> Tokenizer:
    """ "char" or "bpe": train on `texts()` (a fresh iterator per call); else load the path."""
    if spec == "char":
        return CharTokenizer.train(texts(), max_vocab_size=vocab_size)
    if spec == "bpe":
        return BPETokenizer.train(texts(), vocab_size, show_progress=show_progress)
    return load_tokenizer(spec)
