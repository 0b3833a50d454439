"""A character tokenizer: one id per Unicode character seen in a corpus.

Ids 0, 1, 2 are `<PAD>`, `<UNK>` and `<|endoftext|>`; characters follow, most frequent first
(ties by code point). A character that was never seen encodes to `<UNK>` instead of failing.
Saved as a small JSON file (`tokenizer.json` with `"type": "llmfn-char"`).

Encoding is vectorised: the text becomes a numpy array of code points, looked up in a table.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

PAD, UNK, EOS = "<PAD>", "<UNK>", "<|endoftext|>"
SPECIALS = (PAD, UNK, EOS)
FORMAT = "llmfn-char"
MAX_CODE_POINT = 0x110000
MIN_VOCAB_SIZE = len(SPECIALS) + 1  # the special tokens and one character


def _code_points(text: str) -> np.ndarray:
    """text -> uint32 code points [len(text)]."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)


def _checked_chars(chars, source: str) -> list[str]:
    """The 'chars' field of a saved tokenizer: a list of distinct single characters."""
    expected = "'chars' must be a list of single characters"
    if not isinstance(chars, list):
        got = "null" if chars is None else type(chars).__name__
        raise ValueError(f"{source}: {expected} (got {got})")
    first_seen: dict[str, int] = {}
    for index, char in enumerate(chars):
        if not isinstance(char, str) or len(char) != 1:
            raise ValueError(
                f"{source}: {expected} (entry {index} is {type(char).__name__} {char!r})"
            )
        if char in first_seen:
            raise ValueError(
                f"{source}: 'chars' lists {char!r} twice (entries {first_seen[char]} and {index})"
            )
        first_seen[char] = index
    return chars


class CharTokenizer:
    """Characters <-> ids. `chars[i]` is the character of id `len(SPECIALS) + i`."""

    pad_id, unk_id, eos_id, bos_id = 0, 1, 2, None

    def __init__(self, chars: Iterable[str]):
        self.chars = list(chars)
        for char in self.chars:
            if len(char) != 1:
                raise ValueError(
                    f"CharTokenizer: vocabulary entry {char!r} is not a single character"
                )
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("CharTokenizer: the vocabulary lists a character twice")
        self.vocab_size = len(SPECIALS) + len(self.chars)
        self._id_of_code = np.full(MAX_CODE_POINT, self.unk_id, dtype=np.int64)
        codes = np.fromiter((ord(c) for c in self.chars), dtype=np.int64, count=len(self.chars))
        self._id_of_code[codes] = np.arange(len(SPECIALS), self.vocab_size)
        self._text_of_id = list(SPECIALS) + self.chars
        self._text_of_id[self.pad_id] = ""  # padding decodes to nothing
        self._text_of_id[self.eos_id] = ""  # like skip_special_tokens in HF
        self._text_of_id[self.unk_id] = "\ufffd"  # the Unicode replacement character

    # --- building -----------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], max_vocab_size: int | None = None) -> CharTokenizer:
        """The characters of `texts`, most frequent first; at most `max_vocab_size` ids in all."""
        counts = np.zeros(MAX_CODE_POINT, dtype=np.int64)
        for text in texts:
            codes, freq = np.unique(_code_points(text), return_counts=True)
            counts[codes] += freq
        seen = np.flatnonzero(counts)
        ranked = [chr(code) for code in seen[np.lexsort((seen, -counts[seen]))]]
        if max_vocab_size is not None:
            if max_vocab_size < MIN_VOCAB_SIZE:
                raise ValueError(
                    f"CharTokenizer: max_vocab_size={max_vocab_size} must exceed the {len(SPECIALS)} special tokens"
                )
            ranked = ranked[: max_vocab_size - len(SPECIALS)]
        return cls(ranked)

    @classmethod
    def from_json(cls, data: dict, source: str = "<dict>") -> CharTokenizer:
        """The tokenizer of a saved `to_json()` dict; a ValueError naming `source` and the
        field for anything else."""
        if not isinstance(data, dict) or data.get("type") != FORMAT:
            raise ValueError(f"{source}: not a character tokenizer (expected 'type': '{FORMAT}')")
        if "specials" in data and data["specials"] != list(SPECIALS):
            raise ValueError(
                f"{source}: 'specials' is {json.dumps(data['specials'], ensure_ascii=False)}: "
                f"expected {json.dumps(list(SPECIALS))}"
            )
        if "chars" not in data:
            raise ValueError(f"{source}: 'chars' is missing: expected a list of single characters")
        return cls(_checked_chars(data["chars"], source))

    # --- the Tokenizer interface --------------------------------------------------------------
    def encode_array(self, text: str) -> np.ndarray:
        """text -> int64 ids [len(text)] (unseen characters -> `<UNK>`)."""
        return self._id_of_code[_code_points(text)]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_array(text) for text in texts]

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text; `<PAD>` and `<|endoftext|>` vanish, `<UNK>` becomes U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"CharTokenizer.decode: ids {bad[:5]} are outside [0, {self.vocab_size})"
            )
        table = self._text_of_id
        return "".join(table[i] for i in ids)

    def to_json(self) -> dict:
        return {"type": FORMAT, "version": 1, "specials": list(SPECIALS), "chars": self.chars}

    def save(self, directory: str | Path) -> None:
        """Write `directory/tokenizer.json` (creating the folder)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json(), ensure_ascii=False, indent=0)
        (directory / "tokenizer.json").write_text(text, encoding="utf-8")

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
