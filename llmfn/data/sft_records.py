"""Supervised fine-tuning records: JSONL lines -> text pieces marked "learn this" or not.

Each line is {"prompt": ..., "response": ...} or {"messages": [{"role": ..., "content": ...}]}
with roles system / user / assistant, and no other keys (an unknown key is an error, not
silently dropped). A conversation renders as plain text:

    System: {content}\\n        (no loss)
    User: {content}\\n          (no loss)
    Assistant: {content}<eos>\\n   (loss on "{content}<eos>" only)

`tokenize_example` encodes the pieces one by one, so the loss mask is exact at their borders.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llmfn.data.tokenizer import Tokenizer

ROLES = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
MESSAGE_KEYS = ("role", "content")

Piece = tuple[str, bool]  # (text, learn: the loss covers it)
EOS_PIECE = None  # stands for the end-of-text token in a rendered example


class RecordError(ValueError):
    """A malformed JSONL record; the message names the file and line."""


def _kind(value) -> str:
    """The JSON value's type as a Python name (null for None)."""
    return "null" if value is None else type(value).__name__


def _state(entry: dict, key: str) -> str:
    return _kind(entry[key]) if key in entry else "missing"


def _require_str(entry: dict, key: str, where: str) -> None:
    if not isinstance(entry.get(key), str):
        raise RecordError(f"{where}: '{key}' is {_state(entry, key)}, expected str")


def _check_keys(
    entry: dict, accepted: tuple[str, ...], where: str, kind: str, hint: str = ""
) -> None:
    """Every key of `entry` is one of `accepted`; the error names the others."""
    unexpected = [key for key in entry if key not in accepted]
    if unexpected:
        plural = "s" if len(unexpected) > 1 else ""
        raise RecordError(
            f"{where}: unexpected key{plural} {', '.join(map(repr, unexpected))}: {kind} holds "
            f"only {', '.join(accepted)}{hint}"
        )


def _messages(record: dict, where: str) -> list[dict]:
    if "messages" in record:
        _check_keys(record, ("messages",), where, "a messages record")
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            got = "an empty list" if messages == [] else _kind(messages)
            raise RecordError(
                f"{where}: 'messages' is {got}, expected a non-empty list of {{role, content}} objects"
            )
        return messages
    if "prompt" in record and "response" in record:
        system = ' (for a system prompt, write {"messages": [...]} with a role system message)'
        _check_keys(record, ("prompt", "response"), where, "a prompt/response record", system)
        for key in ("prompt", "response"):
            _require_str(record, key, where)
        return [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    raise RecordError(
        f'{where}: expected {{"prompt": str, "response": str}} or {{"messages": [...]}}, got keys {sorted(record)}'
    )


def _check_message(message, number: int, where: str) -> None:
    """A {"role": ..., "content": str} object; the error names the message and its field."""
    if not isinstance(message, dict):
        raise RecordError(
            f"{where}: message {number} is {_kind(message)}, expected an object {{role, content}}"
        )
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        got = repr(role) if isinstance(role, str) else _state(message, "role")
        raise RecordError(
            f"{where}: message {number}: 'role' is {got}, expected one of {', '.join(ROLES)}"
        )
    _require_str(message, "content", f"{where}: message {number}")
    _check_keys(message, MESSAGE_KEYS, f"{where}: message {number}", "a message")


def render(record: dict, where: str = "record") -> list[Piece | None]:
    """A record -> pieces (text, learn); None marks the end-of-text token after each answer."""
    pieces: list[Piece | None] = []
    messages = _messages(record, where)
    for number, message in enumerate(messages):
        _check_message(message, number, where)
        role, content = message["role"], message["content"]
        if role == "assistant":
            pieces += [(ROLES[role], False), (content, True), EOS_PIECE, ("\n", False)]
        else:
            pieces.append((ROLES[role] + content + "\n", False))
    if not any(piece is not None and piece[1] for piece in pieces):
        raise RecordError(f"{where}: no assistant message: nothing to learn")
    return pieces


def check_jsonl_path(path: str | Path) -> Path:
    """`path` when it is a file, else an OSError saying what it is instead."""
    path = Path(path)
    expected = "expected a JSONL file of prompt/response or messages records"
    if path.is_dir():
        raise IsADirectoryError(f"SFT data '{path}' is a folder: {expected}")
    if not path.is_file():
        raise FileNotFoundError(f"SFT data '{path}' does not exist ({expected})")
    return path


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-blank line of a JSONL file; where = "file:line". A UTF-8
    byte order mark at the start of the file is skipped."""
    path = check_jsonl_path(path)
    with open(path, "rb") as handle:  # bytes: a decoding error can then name its line
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RecordError(
                    f"{where}: invalid UTF-8 at byte {err.start + 1} of the line "
                    f"(0x{raw[err.start]:02x}: {err.reason}): save the file as UTF-8"
                ) from None
            if number == 1:
                line = line.removeprefix("\ufeff")  # as encoding="utf-8-sig" reads it
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise RecordError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise RecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def plain_text(pieces: list[Piece | None]) -> str:
    """The rendered text (for training a tokenizer on the data)."""
    return "".join(piece[0] for piece in pieces if piece is not None)


def tokenize_example(
    pieces: list[Piece | None], tokenizer: Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """pieces -> (ids int64 [n], learn bool [n]); a BOS first if the tokenizer has one."""
    texts = [piece[0] for piece in pieces if piece is not None]
    encoded = iter(tokenizer.encode_batch(texts))
    ids: list[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    learn: list[bool] = [False] * len(ids)
    for piece in pieces:
        if piece is None:
            if tokenizer.eos_id is None:
                continue
            piece_ids, piece_learn = [tokenizer.eos_id], True
        else:
            piece_ids, piece_learn = next(encoded), piece[1]
        ids += piece_ids
        learn += [piece_learn] * len(piece_ids)
    return np.asarray(ids, dtype=np.int64), np.asarray(learn, dtype=bool)
