"""Text inputs: which files a path, folder or glob names, and reading them as a stream.

`read_segments` yields the corpus as pieces of about `segment_chars` characters, never crossing
a file, so memory stays bounded whatever the file sizes. Pieces are cut at word borders (before
a space that follows a word, or after a newline between two lines of text), where a byte-level
BPE's pre-tokeniser splits anyway: encoding the pieces one by one gives the ids of encoding the
file whole. Only a stretch of `SNAP_CHARS` characters without such a border is cut mid-word.
Files are read as bytes and decoded incrementally, which also yields their SHA-256.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import hashlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llmfn.data.token_bins import FORMAT, is_token_bin_folder

READ_BYTES = 1 << 20  # bytes read per system call
ERROR_POLICIES = ("strict", "replace", "ignore")
SKIPPED_DIRS = ("__pycache__",)
SNAP_CHARS = 256  # how far past a wanted cut a word border is looked for
# A word border: before a space that follows a word, or after a newline between two lines
# of text. GPT-2 and Llama-3 style pre-tokenisers never put one token across it.
WORD_BORDER = re.compile(r"(?<=\S) |(?<=\S\n)(?=\S)")


class InputError(ValueError):
    """Bad input text: missing or empty files, undecodable bytes. The message names the file."""


def _is_glob(spec: str) -> bool:
    return any(char in spec for char in "*?[")


def _skip_reason(path: Path, is_dir: bool) -> str | None:
    """Why a folder walk skips `path`, or None when it is read."""
    if path.name.startswith("."):
        return "hidden files and folders"
    if is_dir and path.name in SKIPPED_DIRS:
        return f"{'/'.join(SKIPPED_DIRS)} folders"
    if is_dir and is_token_bin_folder(path):
        return f'folders holding a prepared dataset (a meta.json of "{FORMAT}")'
    return None


def _folder_files(folder: Path) -> tuple[list[Path], dict[str, list[Path]]]:
    """(every regular file under `folder`, recursively, sorted by path as a glob's matches are;
    the skipped entries by reason: hidden files and folders, __pycache__, prepared datasets)."""
    if is_token_bin_folder(folder):
        return [], {_skip_reason(folder, is_dir=True): [folder]}
    found, skipped = [], {}
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for names, is_dir in ((dirnames, True), (filenames, False)):
            kept = []
            for name in names:
                reason = _skip_reason(here / name, is_dir)
                if reason is None:
                    kept.append(name)
                else:
                    skipped.setdefault(reason, []).append(here / name)
            names[:] = kept  # os.walk does not enter the folders removed from dirnames
        found += [here / name for name in filenames]
    return sorted(found), skipped


def _no_files_error(folder: str, skipped: dict[str, list[Path]]) -> InputError:
    """The error for an input folder in which a walk found nothing to read, saying why."""
    paths = [path for paths in skipped.values() for path in paths]
    if paths == [Path(folder)]:
        return InputError(
            f"input folder '{folder}' is a prepared dataset (its meta.json is of \"{FORMAT}\"), "
            "not text: give the text files it was made from"
        )
    if not paths:
        return InputError(f"input folder '{folder}' holds no files")
    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
    return InputError(
        f"input folder '{folder}' holds no files to read: {', '.join(skipped)} are skipped "
        f"({paths[0]}{more})"
    )


def input_specs(specs: str | Path | Iterable[str | Path]) -> list[str | Path]:
    return [specs] if isinstance(specs, str | Path) else list(specs)


def resolve_inputs(specs: str | Path | Iterable[str | Path]) -> list[Path]:
    """The files named by paths, folders (recursive) and globs (`**` allowed), in order, each
    once (a file named twice, however spelled, keeps its first place and spelling).

    Raises InputError naming the spec when nothing matches."""
    specs = input_specs(specs)
    if not specs:
        raise InputError("no input given: expected a text file, a folder or a glob")
    files: list[Path] = []
    for spec in specs:
        text = str(spec)
        if _is_glob(text):
            matched = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matched:
                raise InputError(f"input glob '{text}' matches no files")
            files += matched
        elif Path(text).is_dir():
            matched, skipped = _folder_files(Path(text))
            if not matched:
                raise _no_files_error(text, skipped)
            files += matched
        elif Path(text).is_file():
            files.append(Path(text))
        else:
            raise InputError(
                f"input '{text}' does not exist (expected a text file, a folder or a glob)"
            )
    unique: dict[Path, Path] = {}
    for path in files:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _glob_matches(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Whether path `parts` match glob `pattern` parts as `glob.glob(recursive=True)` would:
    `**` spans any number of folders, and no wildcard matches a hidden (dot) name."""
    if not pattern:
        return not parts
    if not parts:
        return all(p == "**" for p in pattern)
    head, name = pattern[0], parts[0]
    visible = not name.startswith(".") or head.startswith(".")
    if head == "**":
        return _glob_matches(pattern[1:], parts) or (visible and _glob_matches(pattern, parts[1:]))
    return visible and fnmatch.fnmatchcase(name, head) and _glob_matches(pattern[1:], parts[1:])


def check_output_apart(
    specs: str | Path | Iterable[str | Path],
    files: Iterable[Path],
    out_dir: Path,
    outputs: Iterable[str],
) -> None:
    """Refuse an output folder that is, or holds, an input file (replacing it would delete the
    input), or whose `outputs` (file names) a later run with the same inputs would read."""
    out = out_dir.resolve()
    resolved = [(path, path.resolve()) for path in files] if out.exists() else []
    for path, real in resolved:
        if out == real:
            raise ValueError(f"--out '{out_dir}' is the input file '{path}': choose another folder")
    held = [path for path, real in resolved if out in real.parents]
    if held:
        more = f" and {len(held) - 1} more" if len(held) > 1 else ""
        raise ValueError(
            f"--out '{out_dir}' holds the input files ({held[0]}{more}): choose another folder"
        )
    check_not_read_back(specs, out_dir, outputs, "--out")


def check_not_read_back(
    specs: str | Path | Iterable[str | Path], out_dir: Path, outputs: Iterable[str], setting: str
) -> None:
    """Refuse an output folder whose `outputs` (paths relative to it) the input folders or globs
    `specs` would read. `setting` names the folder in the message (--out, data.cache_dir)."""
    out = out_dir.resolve()
    outputs = list(outputs)
    for spec in input_specs(specs):
        text = str(spec)
        if _is_glob(text):
            parts = Path(os.path.abspath(text)).parts
            fixed = next(i for i, part in enumerate(parts) if _is_glob(part))
            pattern = (*Path(*parts[:fixed]).resolve().parts, *parts[fixed:])
            kind = "matched by the input glob"
        elif Path(text).is_dir():
            pattern, kind = (*Path(text).resolve().parts, "**", "*"), "inside the input folder"
        else:
            continue
        if any(_glob_matches(pattern, (out / name).parts) for name in outputs):
            raise ValueError(
                f"{setting} '{out_dir}' is {kind} '{text}': a later run would read the output as "
                "input: choose a folder outside it"
            )


def total_bytes(files: Iterable[Path]) -> int:
    return sum(path.stat().st_size for path in files)


@dataclass(frozen=True)
class Segment:
    text: str
    offset: int  # characters of the whole stream before this segment
    ends_document: bool  # the last piece of its file


def _decoded_chunks(
    path: Path, errors: str, on_bytes: Callable[[int], None] | None, digest, errors_setting: str
) -> Iterator[str]:
    """The text of `path` in chunks of about READ_BYTES; digest.update() sees every byte."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    position = 0
    with open(path, "rb") as handle:
        while True:
            raw = handle.read(READ_BYTES)
            final = not raw
            if digest is not None:
                digest.update(raw)
            try:
                text = decoder.decode(raw, final=final)
            except UnicodeDecodeError as err:
                where = max(0, position + err.start - len(decoder.getstate()[0]))
                raise InputError(
                    f"{path}: invalid UTF-8 near byte {where} ({err.reason}); fix the file or use "
                    f"{errors_setting}replace (substitute U+FFFD) or {errors_setting}ignore (drop "
                    "the bytes)"
                ) from None
            position += len(raw)
            if on_bytes is not None and raw:
                on_bytes(len(raw))
            if text:
                yield text
            if final:
                return


def _cut_near(text: str, target: int, limit: int) -> int:
    """The first word border in text[target:limit], else `target` (a cut mid-word)."""
    border = WORD_BORDER.search(text, target, limit)
    return border.start() if border else target


def _pieces(
    text: str, offset: int, size: int, next_split: Callable[[int], int]
) -> Iterator[tuple[int, int]]:
    """(begin, end) of the pieces of `text` (which starts at stream offset `offset`) that can be
    cut now: one cut `size` characters on, or at the next split border if that comes first,
    each moved on to the first word border within SNAP_CHARS (never up to the following split
    border, so every piece lies within one split). The remainder is left to the caller: more
    text, or the end of the file, ends it."""
    start = 0
    while True:
        target = min(start + size, next_split(offset + start) - offset)
        limit = min(target + SNAP_CHARS, next_split(offset + target) - offset)
        if limit > len(text):  # more text decides the cut, or the file's end is the cut
            return
        end = _cut_near(text, target, limit)
        yield start, end
        start = end


def _no_split(offset: int) -> int:
    return sys.maxsize


def read_segments(
    files: Iterable[Path],
    *,
    segment_chars: int,
    next_split: Callable[[int], int] = _no_split,
    errors: str = "strict",
    errors_setting: str = "--errors ",
    on_bytes: Callable[[int], None] | None = None,
    digests: dict[Path, str] | None = None,
) -> Iterator[Segment]:
    """The files' text as Segments of at most `segment_chars + SNAP_CHARS` characters, cut at
    word borders where there are some. `next_split(offset)` -> the first stream offset after
    `offset` where a new piece must begin (a train/validation border): no segment spans one.
    `errors_setting` spells the errors option for messages ("--errors ", "data.errors=").
    `digests`, if given, receives each file's SHA-256 once it was read."""
    if errors not in ERROR_POLICIES:
        raise ValueError(
            f"errors={errors!r} is invalid: expected one of {', '.join(ERROR_POLICIES)}"
        )
    offset = 0
    for path in files:
        digest = hashlib.sha256() if digests is not None else None
        pending, had_text = "", False
        for chunk in _decoded_chunks(path, errors, on_bytes, digest, errors_setting):
            buffer, rest = pending + chunk, 0
            for begin, end in _pieces(buffer, offset, segment_chars, next_split):
                yield Segment(buffer[begin:end], offset, ends_document=False)
                offset += end - begin
                rest, had_text = end, True
            pending = buffer[rest:]
        if digests is not None:
            digests[path] = digest.hexdigest()
        if pending or had_text:  # an empty file is no document
            yield Segment(pending, offset, ends_document=True)
            offset += len(pending)
