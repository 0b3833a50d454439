"""The prepare command line: text files -> token bins (see `llmfn.data.binarize`).

    python -m llmfn.data.prepare --input "corpus/**/*.txt" --tokenizer bpe --out data/corpus
    python -m llmfn.data.prepare --input book.txt --tokenizer char --out data/book --val-fraction 0.05
    python -m llmfn.data.prepare --input docs/ --tokenizer path/to/tokenizer.json --out data/docs

Errors (missing or empty input, undecodable bytes, an existing output folder, an output folder
that is or holds an input or lies where the inputs are read, --overwrite of anything but a
prepared folder, an --out that cannot be written, a --vocab-size too small for the tokenizer, a
malformed tokenizer file, a vocabulary too large for --dtype, a --val-fraction that leaves no
training tokens) print one line `error: ...`, exit with status 2 and leave --out as it was.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmfn.data.atomic import OutputError
from llmfn.data.binarize import DEFAULT_MAX_TOKENIZER_CHARS, DTYPES, prepare_bins
from llmfn.data.sources import ERROR_POLICIES, InputError
from llmfn.data.tokenizer import MIN_VOCAB_SIZES
from llmfn.warning_format import use_one_line_warnings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llmfn.data.prepare",
        description="Tokenize text files into train.bin / val.bin token bins plus meta.json.",
    )
    parser.add_argument(
        "--input",
        required=True,
        nargs="+",
        action="extend",
        metavar="PATH_OR_GLOB",
        help="text files, folders (read recursively, skipping hidden files and prepared datasets) "
        "or globs such as 'corpus/**/*.txt'",
    )
    parser.add_argument(
        "--tokenizer", default="bpe", help="char | bpe | path/to/tokenizer.json (default: bpe)"
    )
    parser.add_argument(
        "--out", required=True, help="output folder (must not exist unless --overwrite)"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.005,
        help="share of the text held out (default: 0.005)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=8192,
        help="ids of a trained char/bpe tokenizer (default: 8192)",
    )
    parser.add_argument(
        "--errors",
        choices=ERROR_POLICIES,
        default="strict",
        help="undecodable UTF-8: strict = stop with an error, replace = U+FFFD, ignore = drop",
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="token id type (auto: uint16 if it fits)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder"
    )
    parser.add_argument(
        "--max-tokenizer-chars",
        type=int,
        default=DEFAULT_MAX_TOKENIZER_CHARS,
        help="train char/bpe on at most this much text (default: 1e9 characters)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def check_out(out: str) -> None:
    """--out names a folder that can be swapped in: not empty, not the current folder or above."""
    if not out:
        raise ValueError("--out is empty: expected an output folder path")
    here = Path.cwd().resolve()
    if Path(out).resolve() in (here, *here.parents):
        raise ValueError(
            f"--out '{out}' is the current folder or one above it: choose a folder outside it"
        )
    above = next((path for path in Path(out).parents if path.exists()), None)
    if above is not None and not above.is_dir():
        raise ValueError(
            f"--out '{out}' is inside '{above}', which is a file: choose a folder path"
        )


def check_arguments(args: argparse.Namespace) -> None:
    """Checks on the flags' values, before any work."""
    check_out(args.out)
    if not 0 <= args.val_fraction < 1:
        raise ValueError(
            f"--val-fraction {args.val_fraction} is invalid: expected a number in [0, 1)"
        )
    if args.max_tokenizer_chars < 1:
        raise ValueError(
            f"--max-tokenizer-chars {args.max_tokenizer_chars} is invalid: expected a number >= 1"
        )
    if args.tokenizer in MIN_VOCAB_SIZES:
        minimum, parts = MIN_VOCAB_SIZES[args.tokenizer]
        if args.vocab_size < minimum:
            raise ValueError(
                f"--vocab-size {args.vocab_size} is too small for --tokenizer {args.tokenizer}: "
                f"expected at least {minimum} ({parts})"
            )


def main(argv: list[str] | None = None) -> int:
    use_one_line_warnings()
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        meta = prepare_bins(
            args.input,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            val_fraction=args.val_fraction,
            errors=args.errors,
            dtype=args.dtype,
            if_exists="replace" if args.overwrite else "error",
            max_tokenizer_chars=args.max_tokenizer_chars,
            progress=not args.no_progress,
            val_fraction_setting="--val-fraction ",
            overwrite_setting="--overwrite",
        )
    except OutputError as err:
        print(f"error: --out '{args.out}' cannot be written: {err.reason}", file=sys.stderr)
        return 2
    except (InputError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
        f"({meta['dtype']}, vocabulary {meta['tokenizer']['vocab_size']}) from {meta['documents']} file(s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
