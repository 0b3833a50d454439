"""Tokenize text files into `train.bin` / `val.bin` token bins, streaming (`prepare_bins`; the
command line is `python -m llmfn.data.prepare`).

Output folder (written under a temporary name, renamed into place when complete):
    train.bin, val.bin   raw token ids, little-endian uint16 (vocabulary <= 65536) or uint32
    tokenizer.json       the tokenizer used (trained here for char/bpe), + tokenizer_config.json for BPE
    meta.json            tokenizer, dtype, token counts, source files with SHA-256 (written last)

Files are separated by the tokenizer's end-of-text id. The validation split takes `val_fraction`
of the text in blocks spread evenly through the corpus (not only its tail), cut at word borders
(a small corpus holds out more; a split that leaves no training tokens is an error).
The text is encoded in pieces of about SEGMENT_CHARS characters cut at word borders too, so the
ids are those of encoding each file whole, whatever the split. Memory is bounded by the
read/encode buffers, never by the corpus size.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llmfn.data.atomic import atomic_folder, check_writable
from llmfn.data.char_tokenizer import CharTokenizer
from llmfn.data.sources import (
    ERROR_POLICIES,
    InputError,
    check_output_apart,
    input_specs,
    read_segments,
    resolve_inputs,
    total_bytes,
)
from llmfn.data.token_bins import FORMAT, is_token_bin_folder
from llmfn.data.tokenizer import TRAINABLE, Tokenizer, build_tokenizer

FORMAT_VERSION = 1
BINS_REVISION = 2  # raised when the same inputs and settings give other bins (2: word-border cuts)
DTYPES = ("auto", "uint16", "uint32")
ENCODE_BATCH_CHARS = 4 << 20  # text encoded per batch (bounds memory)
SEGMENT_CHARS = 1 << 18  # text encoded as one piece (a batch's pieces are encoded in parallel)
VAL_BLOCKS = 32  # the validation split is spread over about this many blocks
MIN_BLOCK_CHARS, MAX_BLOCK_CHARS = 64, 1 << 20
DEFAULT_MAX_TOKENIZER_CHARS = 1_000_000_000
OUTPUT_FILES = ("train.bin", "val.bin", "meta.json", "tokenizer.json", "tokenizer_config.json")
MAX_UNKNOWN_SHARE = 0.001  # more unknown-token ids than this share of the tokens is warned about


@dataclass(frozen=True)
class SplitLayout:
    """Every `period` characters of the stream, the first `block` go to validation."""

    block: int
    period: int | None  # None = no validation split

    @classmethod
    def for_corpus(cls, corpus_chars: int, val_fraction: float) -> SplitLayout:
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} is invalid: expected a float in [0, 1)")
        if val_fraction == 0:
            return cls(block=MAX_BLOCK_CHARS, period=None)
        held_out = corpus_chars * val_fraction
        block = int(
            min(MAX_BLOCK_CHARS, max(MIN_BLOCK_CHARS, held_out / VAL_BLOCKS), max(1, held_out))
        )
        return cls(block=block, period=max(block + 1, round(block / val_fraction)))

    def is_val(self, offset: int) -> bool:
        return self.period is not None and offset % self.period < self.block

    def next_split(self, offset: int) -> int:
        """The first offset after `offset` where the stream changes split (train <-> val)."""
        if self.period is None:
            return sys.maxsize
        start = offset - offset % self.period
        return start + self.block if offset - start < self.block else start + self.period


def choose_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; an explicit choice that
    cannot hold the vocabulary is an error."""
    if requested not in DTYPES:
        raise ValueError(f"dtype={requested!r} is invalid: expected one of {', '.join(DTYPES)}")
    fits16 = vocab_size <= np.iinfo(np.uint16).max + 1
    if requested == "uint16" and not fits16:
        raise ValueError(
            f"a vocabulary of {vocab_size} ids does not fit --dtype uint16 (ids up to 65535): use --dtype uint32 or auto"
        )
    if requested == "auto":
        requested = "uint16" if fits16 else "uint32"
    return np.dtype(requested)


class _Progress:
    """A tqdm bar over the bytes read (a no-op when disabled)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = tqdm(
            total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, file=sys.stderr
        )

    def __call__(self, num_bytes: int) -> None:
        self.bar.update(num_bytes)

    def close(self) -> None:
        self.bar.close()


def _corpus_texts(
    files, errors: str, errors_setting: str, max_chars: int, progress: _Progress
) -> Iterator[str]:
    """The corpus text (both splits: the tokenizer needs every character, the model is what the
    validation split is held out from), stopping after `max_chars` characters."""
    seen = 0
    for segment in read_segments(
        files,
        segment_chars=SEGMENT_CHARS,
        errors=errors,
        errors_setting=errors_setting,
        on_bytes=progress,
    ):
        if segment.text:
            yield segment.text
            seen += len(segment.text)
            if seen >= max_chars:
                break
    progress.close()


def _batches(segments: Iterable, max_chars: int) -> Iterator[list]:
    batch, size = [], 0
    for segment in segments:
        batch.append(segment)
        size += len(segment.text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_segments(tokenizer: Tokenizer, segments: list) -> list[np.ndarray]:
    """Token ids of each segment (int64), the end-of-text id appended after a document's end."""
    texts = [segment.text for segment in segments]
    encode_arrays = getattr(tokenizer, "encode_arrays", None)  # the fast path of our tokenizers
    if encode_arrays is not None:
        encoded = encode_arrays(texts)
    else:
        encoded = [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts)]
    eos = tokenizer.eos_id
    if eos is not None:
        encoded = [
            np.append(ids, eos) if seg.ends_document else ids
            for ids, seg in zip(encoded, segments, strict=True)
        ]
    return encoded


def _write_split(handle, arrays: list[np.ndarray], dtype: np.dtype) -> int:
    if not arrays:
        return 0
    ids = np.concatenate(arrays).astype(dtype.newbyteorder("<"), copy=False)
    ids.tofile(handle)
    return int(ids.size)


def _sources_digest(sources: list[dict]) -> str:
    digest = hashlib.sha256()
    for source in sources:
        digest.update(f"{source['path']}\0{source['sha256']}\n".encode())
    return digest.hexdigest()


def _listing(folder: Path) -> str:
    names = sorted(path.name for path in folder.iterdir())
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def check_replaceable(out_dir: Path, overwrite_setting: str = "--overwrite") -> None:
    """--overwrite replaces an empty folder or one that prepare wrote, nothing else.
    `overwrite_setting` spells the option for messages."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        kind = "a symbolic link" if out_dir.is_symlink() else "a file"
        holds = f"is {kind}"
    elif not any(out_dir.iterdir()) or is_token_bin_folder(out_dir):
        return
    else:
        holds = f'holds {_listing(out_dir)}, not a prepared dataset (no meta.json of "{FORMAT}")'
    raise FileExistsError(
        f"--out '{out_dir}' {holds}: {overwrite_setting} replaces only a folder written by prepare; "
        "choose another folder"
    )


def _unknown_count(encoded: list[np.ndarray], unk_id: int | None) -> int:
    if unk_id is None:
        return 0
    return sum(int(np.count_nonzero(ids == unk_id)) for ids in encoded)


def _coverage_fix(
    spec: str, vocab_size: int, capped: bool, max_chars: int, corpus_bytes: int
) -> str:
    """How to give the tokenizer the characters it lacks. capped: it has `vocab_size` ids."""
    if spec not in TRAINABLE:
        return f"the tokenizer '{spec}' lacks characters of this text: train one (char or bpe)"
    flags = []
    if capped:
        flags.append(f"--vocab-size (now {vocab_size}; data.tokenizer_vocab_size in a config)")
    if max_chars < corpus_bytes or not flags:
        flags.append(f"--max-tokenizer-chars (now {max_chars:,})")
    return f"raise {' or '.join(flags)}, or use --tokenizer bpe"


def _warn_unknown(unknown: int, total: int, fix: str) -> None:
    """Warn when more than MAX_UNKNOWN_SHARE of the tokens are the unknown token."""
    if total and unknown / total > MAX_UNKNOWN_SHARE:
        warnings.warn(
            f"{unknown / total:.1%} of the tokens ({unknown:,} of {total:,}) are the unknown "
            f"token <UNK>: {fix}",
            stacklevel=3,
        )


def check_train_tokens(
    counts: dict[str, int], val_fraction: float, corpus_bytes: int, setting: str
) -> None:
    """An InputError naming the val_fraction `setting` ("--val-fraction ", "data.val_fraction=")
    when the validation split took every token."""
    if counts["train"] == 0:
        raise InputError(
            f"{setting}{val_fraction} leaves nothing to train on: all {counts['val']:,} tokens "
            f"of this {corpus_bytes:,}-byte input went to validation (a validation block runs on "
            "to the next word border or the end of its file): lower "
            f"{setting.rstrip('= ')} (0 holds out nothing) or give more text"
        )


def tokenizer_kind(tokenizer: Tokenizer) -> str:
    return "char" if isinstance(tokenizer, CharTokenizer) else "hf"


def prepare_bins(
    inputs: str | Path | Iterable[str | Path],
    out_dir: str | Path,
    *,
    tokenizer: str = "bpe",
    vocab_size: int = 8192,
    val_fraction: float = 0.005,
    errors: str = "strict",
    dtype: str = "auto",
    if_exists: str = "error",
    max_tokenizer_chars: int = DEFAULT_MAX_TOKENIZER_CHARS,
    progress: bool = True,
    errors_setting: str = "--errors ",
    val_fraction_setting: str = "val_fraction=",
    overwrite_setting: str = 'if_exists="replace"',
) -> dict:
    """Tokenize `inputs` (files, folders, globs) into `out_dir`; returns the meta.json dict.

    tokenizer: "char" | "bpe" (trained on the corpus, at most `max_tokenizer_chars`
    characters, `vocab_size` ids) or a tokenizer.json path / folder. if_exists, when `out_dir`
    exists: "error" | "replace" | "keep" (keep: another writer's complete folder wins).
    errors_setting, val_fraction_setting, overwrite_setting: how the caller's user spells
    these options in messages ("--errors ", "--val-fraction ", "--overwrite" on the command line).
    Validation that leaves no training tokens is an InputError (nothing is written).
    """
    out_dir = Path(out_dir)
    if errors not in ERROR_POLICIES:
        raise ValueError(
            f"errors={errors!r} is invalid: expected one of {', '.join(ERROR_POLICIES)}"
        )
    inputs = input_specs(inputs)
    files = resolve_inputs(inputs)
    check_output_apart(inputs, files, out_dir, OUTPUT_FILES)  # replacing it could delete inputs
    check_writable(out_dir, if_exists, overwrite_setting)
    if if_exists == "replace":
        check_replaceable(out_dir, overwrite_setting)
    corpus_bytes = total_bytes(files)
    if corpus_bytes == 0:
        raise InputError(f"the input is empty: {len(files)} file(s), 0 bytes of text")
    layout = SplitLayout.for_corpus(corpus_bytes, val_fraction)

    def texts() -> Iterator[str]:
        bar = _Progress(corpus_bytes, f"training {tokenizer} tokenizer", progress)
        return _corpus_texts(files, errors, errors_setting, max_tokenizer_chars, bar)

    tok = build_tokenizer(tokenizer, texts, vocab_size=vocab_size)
    bin_dtype = choose_dtype(tok.vocab_size, dtype)

    digests: dict[Path, str] = {}
    counts = {"train": 0, "val": 0, "unknown": 0, "documents": 0}
    bar = _Progress(corpus_bytes, "tokenizing", progress)
    with atomic_folder(out_dir, if_exists=if_exists, flag=overwrite_setting) as tmp:
        with open(tmp / "train.bin", "wb") as train_file, open(tmp / "val.bin", "wb") as val_file:
            segments = read_segments(
                files,
                segment_chars=SEGMENT_CHARS,
                next_split=layout.next_split,
                errors=errors,
                errors_setting=errors_setting,
                on_bytes=bar,
                digests=digests,
            )
            for batch in _batches(segments, ENCODE_BATCH_CHARS):
                encoded = _encode_segments(tok, batch)
                counts["documents"] += sum(segment.ends_document for segment in batch)
                counts["unknown"] += _unknown_count(encoded, getattr(tok, "unk_id", None))
                is_val = [layout.is_val(segment.offset) for segment in batch]
                counts["train"] += _write_split(
                    train_file,
                    [e for e, v in zip(encoded, is_val, strict=True) if not v],
                    bin_dtype,
                )
                counts["val"] += _write_split(
                    val_file, [e for e, v in zip(encoded, is_val, strict=True) if v], bin_dtype
                )
        bar.close()
        if counts["train"] + counts["val"] == 0:
            raise InputError(f"the input holds no text once decoded ({len(files)} file(s))")
        check_train_tokens(counts, val_fraction, corpus_bytes, val_fraction_setting)
        capped = tok.vocab_size >= vocab_size
        fix = _coverage_fix(tokenizer, vocab_size, capped, max_tokenizer_chars, corpus_bytes)
        _warn_unknown(counts["unknown"], counts["train"] + counts["val"], fix)
        tok.save(tmp)
        sources = [
            {"path": str(path), "bytes": path.stat().st_size, "sha256": digests[path]}
            for path in files
        ]
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "tokenizer": {
                "spec": tokenizer if tokenizer in TRAINABLE else str(Path(tokenizer)),
                "kind": tokenizer_kind(tok),
                "file": "tokenizer.json",
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
                "bos_id": tok.bos_id,
                "pad_id": tok.pad_id,
            },
            "dtype": bin_dtype.name,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "val_fraction": val_fraction,
            "val_block_chars": layout.block if layout.period else 0,
            "errors": errors,
            "documents": counts["documents"],  # the files that hold text
            "bytes": corpus_bytes,
            "sources_sha256": _sources_digest(sources),
            "sources": sources,
        }
        (tmp / "meta.json").write_text(
            json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8"
        )
    return meta
