"""Export a checkpoint for inference elsewhere.

    python -m llmfn.export runs/x/checkpoints/step_001000 --format hf --out exported/
    python -m llmfn.export runs/x --format safetensors --out weights/ --dtype bfloat16

CKPT is a step folder, a `latest`/`best` pointer, a checkpoint root or a run folder (then its
newest valid checkpoint). Formats:

  hf           config.json + model.safetensors that `transformers.AutoModelForCausalLM.
               from_pretrained(out)` loads with the same logits (Llama; Mistral with a sliding
               window, Qwen2 with one and attention biases; GPT-2 for learned positions;
               `--family qwen2` forces Qwen2), plus the
               tokenizer when it is an HF tokenizer (tokenizer.json + tokenizer_config.json).
  safetensors  params.safetensors + config.yaml + tokenizer/ + manifest.json: the checkpoint
               without optimizer state, loadable with `llmfn.checkpoint.load_for_inference`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from llmfn import hf
from llmfn.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_DIR,
    CheckpointError,
    load_for_inference,
    manifest_step,
    save_params_folder,
)
from llmfn.data.atomic import OutputError, atomic_folder
from llmfn.tasks import language_model_checkpoint
from llmfn.warning_format import use_one_line_warnings

FORMATS = ("hf", "safetensors")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_new_folder(out_dir: Path) -> None:
    """ValueError unless --out names a new or empty folder (checked before any work)."""
    if out_dir.resolve() == Path.cwd().resolve():
        raise ValueError(f"--out {out_dir} is the current folder: choose a new folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file: expected a new or empty folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(f"--out {out_dir} already exists and is not empty: choose a new folder")
    above = next((p for p in out_dir.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ValueError(
            f"--out {out_dir} is inside {above}, which is a file: choose a folder path"
        )


@contextmanager
def _writing_to(out_dir: Path, checkpoint: Path) -> Iterator[None]:
    """An OSError while writing names `out_dir`, not the temporary folder beside it (one about
    a file of `checkpoint` is a reading error and passes through): for `save_params_folder`,
    which writes beside its folder itself."""
    try:
        yield
    except OSError as err:
        names = [Path(name) for name in (err.filename, err.filename2) if isinstance(name, str)]
        if any(name.resolve().is_relative_to(checkpoint.resolve()) for name in names):
            raise
        raise OutputError(out_dir, err) from None


def _is_hf_tokenizer(folder: Path) -> bool:
    """An HF tokenizer folder: tokenizer.json plus a tokenizer_config.json naming its class."""
    config = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file() or not config.is_file():
        return False
    try:
        return "tokenizer_class" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def _copy_hf_tokenizer(tokenizer_dir: Path, out_dir: Path) -> None:
    """Copy an HF tokenizer's files; note (on stderr) any other tokenizer as not exported."""
    if _is_hf_tokenizer(tokenizer_dir):
        for name in HF_TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, out_dir / name)
    elif tokenizer_dir.is_dir():
        print(
            f"note: the tokenizer in {tokenizer_dir} is not an HF tokenizer (no tokenizer.json + "
            "tokenizer_config.json); it was not exported",
            file=sys.stderr,
        )


def export_hf(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    family: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write an HF transformers folder (config.json, model.safetensors, tokenizer files) from
    a checkpoint. config.json's bos/eos/pad_token_id are the checkpoint tokenizer's (None where
    it has no such token, or no tokenizer: then a note on stderr says so). Raises ValueError
    for a model HF cannot express (e.g. MoE, post-norm)."""
    out_dir = Path(out_dir)
    check_new_folder(out_dir)
    folder = language_model_checkpoint(checkpoint, "exported")
    cfg, params, tokenizer = load_for_inference(folder, dtype=dtype, verify=False)
    token_ids = hf.special_token_ids(tokenizer)
    hf.to_hf_config(cfg, family)  # fail on an inexpressible model before writing anything
    # written beside out_dir and renamed into place: a failure leaves no partial folder, and an
    # OSError while writing names out_dir (atomic_folder's OutputError)
    with atomic_folder(out_dir, if_exists="replace") as tmp:
        hf.save_hf_pretrained(params, cfg, tmp, family, token_ids=token_ids)
        _copy_hf_tokenizer(folder / TOKENIZER_DIR, tmp)
    if tokenizer is None:
        print(
            f"note: {folder} has no tokenizer/: config.json has bos_token_id, eos_token_id and "
            "pad_token_id None (set them to your tokenizer's, or HF generate never stops at EOS)",
            file=sys.stderr,
        )
    return out_dir


def export_safetensors(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> Path:
    """Write params.safetensors + config.yaml + tokenizer/ + manifest.json (no optimizer state)."""
    out_dir = Path(out_dir)
    check_new_folder(out_dir)
    folder = language_model_checkpoint(checkpoint, "exported")
    _, params, _ = load_for_inference(folder, dtype=dtype, with_tokenizer=False, verify=False)
    step = manifest_step(folder)
    tokenizer_dir = folder / TOKENIZER_DIR
    with _writing_to(out_dir, folder):
        return save_params_folder(
            out_dir,
            params,
            config_yaml=(folder / CONFIG_FILE).read_text(encoding="utf-8"),
            step=step,
            tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None,
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmfn.export",
        description="Export an llmfn checkpoint as an HF transformers folder or plain safetensors.",
    )
    parser.add_argument(
        "checkpoint", help="a step folder, a latest/best pointer, a checkpoint root or a run folder"
    )
    parser.add_argument("--format", choices=FORMATS, required=True, help="hf or safetensors")
    parser.add_argument("--out", required=True, help="the output folder (new or empty)")
    parser.add_argument(
        "--family",
        choices=tuple(hf.FAMILIES),
        default=None,
        help="hf: the HF architecture (default: llama; mistral with a sliding window, qwen2 with a "
        "window and attention biases; gpt2 for learned positions)",
    )
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="cast the weights (default: as saved)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    use_one_line_warnings()
    args = parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if not args.out:
            raise ValueError("--out is empty: expected an output folder path")
        if args.format == "hf":
            out = export_hf(args.checkpoint, args.out, family=args.family, dtype=dtype)
        else:
            if args.family is not None:
                raise ValueError("--family applies to --format hf only")
            out = export_safetensors(args.checkpoint, args.out, dtype=dtype)
    except OutputError as err:
        print(
            f"error: cannot export {args.checkpoint} as {args.format}: --out '{args.out}' "
            f"cannot be written: {err.reason}",
            file=sys.stderr,
        )
        return 2
    except (CheckpointError, ValueError, ImportError, OSError) as err:
        print(f"error: cannot export {args.checkpoint} as {args.format}: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} as {args.format} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
