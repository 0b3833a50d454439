"""Text from a stream of token ids: each prompt's new tokens decoded into pieces that are
handed out once they are final; a stop string ends a row (unprinted), and an incomplete UTF-8
character or the beginning of a stop string is held back until the next token.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence


def encode_prompt(tokenizer, text: str, index: int) -> list[int]:
    """Token ids of one prompt; an empty prompt starts from BOS (or EOS) if the tokenizer has one.
    Warns when characters of it encode to the tokenizer's unknown token (a char tokenizer's
    `<UNK>`, one id per unknown character): the model never sees them."""
    ids = tokenizer.encode(text)
    unk_id = getattr(tokenizer, "unk_id", None)
    unknown = ids.count(unk_id) if unk_id is not None else 0
    if unknown:
        warnings.warn(
            f"prompt {index}: {unknown} of its {len(ids)} tokens are the unknown token (id "
            f"{unk_id}): text the tokenizer's vocabulary lacks, which the model never sees",
            stacklevel=2,
        )
    if ids:
        return ids
    start = tokenizer.bos_id if getattr(tokenizer, "bos_id", None) is not None else tokenizer.eos_id
    if start is None:
        raise ValueError(
            f"prompt {index} is empty and the tokenizer has no BOS or EOS id to start from"
        )
    return [start]


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters may still change: an incomplete UTF-8 character (decoded
    as U+FFFD) or the beginning of a stop string."""
    partial = max(
        (n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0
    )
    replacement = len(text) - len(text.rstrip("\ufffd"))
    return max(partial, replacement)


class TextRow:
    """The decoded text of one prompt's new tokens and how much of it was handed out."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.emitted = 0
        self.done = False

    def add(self, token: int) -> str:
        """Append a token -> the text that became final (a stop string ends the row, unprinted)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cuts = [
            i
            for i in (text.find(stop, max(0, self.emitted - len(stop))) for stop in self.stops)
            if i >= 0
        ]
        if cuts:
            self.done = True
            return self.take(text, min(cuts))
        return self.take(text, len(text) - held_back(text, self.stops))

    def finish(self) -> str:
        """The row ended (EOS or length): hand out what was held back."""
        self.done = True
        return self.take(self.tokenizer.decode(self.ids), None)

    def take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        piece = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


def text_pieces(
    steps: Iterator[list[int | None]], rows: list[TextRow], eos_id: int | None
) -> Iterator[tuple[int, str]]:
    """The generator behind `stream_text`: (prompt index, text piece) from `stream`'s steps."""
    for step in steps:
        for index, (row, token) in enumerate(zip(rows, step, strict=True)):
            if row.done or token is None:
                continue
            piece = row.finish() if token == eos_id else row.add(token)
            if piece:
                yield index, piece
        if all(row.done for row in rows):
            return
    for index, row in enumerate(rows):
        piece = "" if row.done else row.finish()
        if piece:
            yield index, piece
