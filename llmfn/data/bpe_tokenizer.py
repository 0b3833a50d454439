"""Byte-level BPE on the HF `tokenizers` library, and a wrapper for any HF `tokenizer.json`.

A byte-level tokenizer round-trips any UTF-8 text exactly: no normaliser, no lowercasing, no
prefix space. `BPETokenizer.train(texts, vocab_size)` learns merges (the library's parallel
trainer); `BPETokenizer.from_file(path)` loads any `tokenizer.json` (BPE, WordPiece, Unigram...).

Text is always encoded as plain text: a special token's string inside the text (say a file that
contains "<|endoftext|>") is split like any other text, never turned into the special id, so
data cannot inject control tokens. Special ids are added by the code that needs them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
DEFAULT_SPECIALS = (EOS_TOKEN, PAD_TOKEN)
NUM_BYTES = 256
MIN_VOCAB_SIZE = NUM_BYTES + len(DEFAULT_SPECIALS)  # what `train` needs with the default specials

# When a tokenizer.json comes without a tokenizer_config.json, these names are recognised.
EOS_NAMES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[CLS]")
PAD_NAMES = (PAD_TOKEN, "<pad>", "<|padding|>", "[PAD]", "<PAD>")
ROLES = ("eos_token", "bos_token", "pad_token")  # the special tokens a tokenizer_config.json names


def _token_text(entry, role: str, config_path: Path) -> str | None:
    """A tokenizer_config.json token entry: null, "text" or {"content": "text", ...}."""
    text = entry.get("content") if isinstance(entry, dict) else entry
    if text is not None and not isinstance(text, str):
        raise ValueError(
            f"{config_path}: '{role}' is {json.dumps(entry)}: expected a token string, "
            '{"content": "<token>"} or null'
        )
    return text


def read_tokenizer_config(config_path: Path) -> dict:
    """The JSON object in a tokenizer_config.json; a ValueError naming the file otherwise."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path}: cannot be read as JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return config


class BPETokenizer:
    """The `Tokenizer` interface over a `tokenizers.Tokenizer`."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
    ):
        self.backend = tokenizer
        self.backend.encode_special_tokens = True  # special strings in text stay text
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token = eos_token if eos_token is not None else self._first_known(EOS_NAMES)
        self.bos_token = bos_token if bos_token is not None else self._first_known(BOS_NAMES)
        self.pad_token = pad_token if pad_token is not None else self._first_known(PAD_NAMES)
        self.eos_id = self._id_of(self.eos_token, "eos_token")
        self.bos_id = self._id_of(self.bos_token, "bos_token")
        self.pad_id = self._id_of(self.pad_token, "pad_token")
        # the id text outside the vocabulary encodes to (WordPiece, WordLevel, a BPE without
        # byte fallback); None for byte-level BPE, which has an id for every byte
        unk_token = getattr(tokenizer.model, "unk_token", None)
        self.unk_id = tokenizer.token_to_id(unk_token) if unk_token else None

    def _first_known(self, names: tuple[str, ...]) -> str | None:
        return next((name for name in names if self.backend.token_to_id(name) is not None), None)

    def _id_of(self, token: str | None, role: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer: {role} {token!r} is not in the vocabulary")
        return token_id

    # --- building -----------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        special_tokens: tuple[str, ...] = DEFAULT_SPECIALS,
        show_progress: bool = False,
    ) -> BPETokenizer:
        """Learn a byte-level BPE of at most `vocab_size` ids (256 bytes + specials + merges)."""
        minimum = NUM_BYTES + len(special_tokens)
        if vocab_size < minimum:
            raise ValueError(
                f"BPE vocab_size={vocab_size} is too small: byte-level BPE needs at least {minimum} (256 bytes + {len(special_tokens)} special tokens)"
            )
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        eos = EOS_TOKEN if EOS_TOKEN in special_tokens else None
        pad = PAD_TOKEN if PAD_TOKEN in special_tokens else None
        return cls(tokenizer, eos_token=eos, pad_token=pad)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """Load an HF `tokenizer.json`; special tokens from a `tokenizer_config.json` beside it
        (eos_token, bos_token, pad_token), else from well-known names (see EOS_NAMES...)."""
        path = Path(path)
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # the library raises a bare Exception for malformed files
            raise ValueError(f"{path}: not a valid HF tokenizer.json ({err})") from None
        roles = {}
        config_path = path.parent / "tokenizer_config.json"
        if config_path.is_file():
            config = read_tokenizer_config(config_path)
            for role in ROLES:
                text = _token_text(config.get(role), role, config_path)
                if text is not None and tokenizer.token_to_id(text) is not None:
                    roles[role] = text
        return cls(tokenizer, **roles)

    # --- the Tokenizer interface --------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes in parallel threads (the library's batch encoder)."""
        return [
            encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)
        ]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """texts -> int64 id arrays, encoded in parallel."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text, special tokens skipped."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"BPETokenizer.decode: ids {bad[:5]} are outside [0, {self.vocab_size})"
            )
        return self.backend.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        """Write `directory/tokenizer.json` (HF format) and `tokenizer_config.json` naming the
        special tokens, so `transformers.AutoTokenizer.from_pretrained(directory)` loads it too
        and encodes as here (special tokens' strings in text stay text)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": True,  # transformers, too, encodes "<|endoftext|>" as text
        }
        for role, token in (
            ("eos_token", self.eos_token),
            ("bos_token", self.bos_token),
            ("pad_token", self.pad_token),
        ):
            if token is not None:
                config[role] = token
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2), encoding="utf-8"
        )

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id}, bos_id={self.bos_id})"
