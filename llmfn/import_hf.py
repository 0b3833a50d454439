"""Import a Hugging Face causal LM folder as an llmfn weights folder (needs `transformers`).

    python -m llmfn.import_hf path/to/hf_model --out weights/ [--dtype bfloat16]
    python -m llmfn.generate weights/ --prompt "def "             # sample from it
    python -m llmfn.train configs/x.yaml checkpoint.init_from=weights/   # fine-tune it

The folder is what `save_pretrained` writes (config.json + model.safetensors; a Llama,
Mistral, Qwen2 or GPT-2). The output is what `python -m llmfn.export --format safetensors`
writes: params.safetensors + config.yaml (the model section `from_hf` gives) + manifest.json,
plus tokenizer/ when the folder holds an HF tokenizer (tokenizer.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from llmfn import hf
from llmfn.checkpoint import CheckpointError, save_params_folder
from llmfn.config import Config, to_yaml
from llmfn.data.atomic import OutputError
from llmfn.export import DTYPES, HF_TOKENIZER_FILES, check_new_folder
from llmfn.warning_format import use_one_line_warnings

EXPECTED_FOLDER = "expected a folder written by save_pretrained"


def check_hf_folder(folder: Path) -> None:
    """ValueError unless `folder` holds a config.json whose model_type llmfn imports (read
    before transformers loads anything)."""
    if not folder.exists():
        raise ValueError(f"{folder} does not exist: {EXPECTED_FOLDER}")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file: {EXPECTED_FOLDER}")
    file = folder / "config.json"
    if not file.is_file():
        raise ValueError(f"{folder} has no config.json: {EXPECTED_FOLDER}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{file} has no model_type: {EXPECTED_FOLDER}")
    hf.check_model_type(config["model_type"])


def read_hf_model(folder: Path, dtype: torch.dtype):
    """(ModelConfig, params) of the HF model saved in `folder` (one `check_hf_folder`
    accepts), in `dtype`."""
    transformers = hf._transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return hf.from_hf(model)


def import_hf(
    folder: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32
) -> Path:
    """Write the HF model in `folder` to `out_dir` as an llmfn weights folder -> out_dir.
    Both folders are checked before the model is loaded."""
    folder = Path(folder)
    check_hf_folder(folder)
    check_new_folder(Path(out_dir))
    cfg, params = read_hf_model(folder, dtype)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = None
        if (folder / "tokenizer.json").is_file():
            tokenizer_dir = Path(scratch)
            for name in HF_TOKENIZER_FILES:
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, tokenizer_dir / name)
        return save_params_folder(
            out_dir,
            params.to(dtype),
            config_yaml=to_yaml(Config(model=cfg)),
            tokenizer_dir=tokenizer_dir,
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmfn.import_hf",
        description="Import a Hugging Face causal LM folder (save_pretrained) as llmfn weights.",
    )
    parser.add_argument("folder", help="HF model folder (config.json + model.safetensors)")
    parser.add_argument("--out", required=True, help="output folder (new or empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    use_one_line_warnings()
    args = parse_args(argv)
    try:
        out = import_hf(args.folder, args.out, dtype=DTYPES[args.dtype])
    except OutputError as err:
        print(
            f"error: cannot import {args.folder}: --out '{args.out}': {err.reason}", file=sys.stderr
        )
        return 2
    except (CheckpointError, ValueError, TypeError, ImportError, OSError) as err:
        print(f"error: cannot import {args.folder}: {err}", file=sys.stderr)
        return 2
    print(f"imported {args.folder} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
