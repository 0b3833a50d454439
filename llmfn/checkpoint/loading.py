"""Loading into a caller-built template: keys, shapes and dtypes checked, values copied in place."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from tensordict import TensorDict

from llmfn.checkpoint.config_checks import check_model_config, model_config_from_checkpoint
from llmfn.checkpoint.discovery import resolve_checkpoint
from llmfn.checkpoint.flat_keys import flat_tensors
from llmfn.checkpoint.layout import (
    PARAMS_FILE,
    STATE_FILE,
    TOKENIZER_DIR,
    TRAIN_STATE_FILE,
    CheckpointError,
)
from llmfn.checkpoint.verification import verify_checkpoint
from llmfn.model_config import ModelConfig


def _stored_specs(
    folder: Path, file_name: str, prefix: str
) -> dict[str, tuple[Path, str, list[int], str]]:
    """{template key: (file, stored key, shape, safetensors dtype)} for the tensors of one file."""
    file = folder / file_name
    if not file.is_file():
        raise CheckpointError(f"checkpoint {folder}: file {file_name} is missing")
    try:
        with safe_open(file, framework="pt", device="cpu") as reader:
            specs, names = {}, reader.keys()
            for key in names:
                view = reader.get_slice(key)
                specs[prefix + key] = (file, key, list(view.get_shape()), view.get_dtype())
            return specs
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(
            f"checkpoint {folder}: file {file_name} is not a readable safetensors file: {err}"
        ) from None


def _safetensors_dtype(dtype: torch.dtype) -> str:
    names = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
        torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
        torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
        torch.complex64: "C64",
    }  # fmt: skip
    return names.get(dtype, str(dtype))


def _check_against_template(
    folder: Path, template: TensorDict, specs: dict
) -> dict[str, torch.Tensor]:
    """{name: template leaf}, after checking keys, shapes and dtypes match `specs` exactly."""
    leaves = flat_tensors(template)
    missing = [name for name in leaves if name not in specs]
    unexpected = [name for name in specs if name not in leaves]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"keys in the template but not in the checkpoint: {', '.join(missing[:8])}"
            )
        if unexpected:
            parts.append(
                f"keys in the checkpoint but not in the template: {', '.join(unexpected[:8])}"
            )
        more = " (and more)" if max(len(missing), len(unexpected)) > 8 else ""
        raise CheckpointError(f"checkpoint {folder}: key mismatch: " + "; ".join(parts) + more)
    for name, leaf in leaves.items():
        file, _, shape, dtype = specs[name]
        if list(leaf.shape) != shape:
            raise CheckpointError(
                f"checkpoint {folder}: key {name!r} in {file.name} has shape {tuple(shape)}, "
                f"the template has {tuple(leaf.shape)}"
            )
        if _safetensors_dtype(leaf.dtype) != dtype:
            raise CheckpointError(
                f"checkpoint {folder}: key {name!r} in {file.name} has dtype {dtype}, "
                f"the template has {leaf.dtype} ({_safetensors_dtype(leaf.dtype)})"
            )
    return leaves


def _fill(folder: Path, template: TensorDict, specs: dict) -> TensorDict:
    """Copy every stored tensor into its template leaf in place (checked first: all or nothing)."""
    leaves = _check_against_template(folder, template, specs)
    by_file: dict[Path, list[str]] = {}
    for name in leaves:
        by_file.setdefault(specs[name][0], []).append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as reader:
                for name in names:
                    leaves[name].copy_(reader.get_tensor(specs[name][1]))
    return template


def load_params(
    path: str | os.PathLike, template: TensorDict, *, verify: bool = True
) -> TensorDict:
    """Fill a params-only `template` (e.g. from `init_params`) from params.safetensors, in place."""
    folder = Path(path)
    if verify:
        verify_checkpoint(folder)
    return _fill(folder, template, _stored_specs(folder, PARAMS_FILE, ""))


def load_checkpoint(
    path: str | os.PathLike,
    template: TensorDict,
    *,
    expected_model: ModelConfig | Mapping | None = None,
    verify: bool = True,
    missing_from: Mapping[str, str] | None = None,
) -> tuple[TensorDict, dict]:
    """Fill the train-state `template` from a step folder in place; return (template, train_state).

    template: the freshly built state (params, opt_state, step...); every leaf must have a stored
    tensor of the same shape and dtype, and vice versa, else CheckpointError naming the key.
    Values are copied (`copy_`), so the template keeps its key order, devices and tensor types.
    expected_model: the running ModelConfig (or its dict); checked against config.yaml.
    verify: check the manifest (sizes and sha256) first.
    missing_from: {template key: stored key} for keys added to the state after a checkpoint was
    written: a key the checkpoint lacks is filled from that stored key (e.g. the train state's
    `llmfn.step.KEYS_ADDED_SINCE`, {"updates": "step"}).
    """
    folder = Path(path)
    if verify:
        verify_checkpoint(folder)
    if expected_model is not None:
        check_model_config(folder, expected_model)
    try:
        train_state = json.loads((folder / TRAIN_STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {folder}: {TRAIN_STATE_FILE} is missing (cannot resume from an export)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"checkpoint {folder}: {TRAIN_STATE_FILE} is not valid JSON: {err}"
        ) from None
    specs = {
        **_stored_specs(folder, PARAMS_FILE, "params."),
        **_stored_specs(folder, STATE_FILE, ""),
    }
    for key, stored in (missing_from or {}).items():
        if key not in specs and stored in specs:
            specs[key] = specs[stored]
    return _fill(folder, template, specs), train_state


def _empty_params(cfg: ModelConfig, dtype: torch.dtype) -> TensorDict:
    """The `init_params(cfg)` tree (same keys, order, shapes) as uninitialized CPU tensors."""
    from llmfn.model import init_params

    with torch.device("meta"):
        layout = init_params(cfg, dtype=dtype)
    return layout.apply(lambda leaf: torch.empty(leaf.shape, dtype=leaf.dtype, device="cpu"))


def load_for_inference(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    with_tokenizer: bool = True,
    verify: bool = True,
):
    """(ModelConfig, params TensorDict, tokenizer or None) from a step folder, a `latest`/`best`
    pointer, a checkpoint root or a run folder (then its newest valid checkpoint).

    The template is the `init_params` tree of config.yaml's model section (in the dtype the
    params were saved in), filled from params.safetensors, then moved to `device` / cast to
    `dtype` if given. The tokenizer is `llmfn.data.load_tokenizer(folder / "tokenizer")` when
    the checkpoint has one and with_tokenizer is set. verify: check the manifest (sizes and
    sha256) first; a caller that verified the folder itself (before reading its config.yaml)
    passes False."""
    folder = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(folder)
    cfg = model_config_from_checkpoint(folder)
    params = load_params(folder, _empty_params(cfg, _stored_embedding_dtype(folder)), verify=False)
    if dtype is not None:
        params = params.to(dtype)
    if device is not None:
        params = params.to(device)
    tokenizer = None
    if with_tokenizer and (folder / TOKENIZER_DIR).is_dir():
        try:
            from llmfn.data import load_tokenizer
        except ImportError:
            from llmfn.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(folder / TOKENIZER_DIR)
    return cfg, params, tokenizer


def _stored_embedding_dtype(folder: Path) -> torch.dtype:
    """The dtype the params were saved in (read from the embedding's header entry)."""
    specs = _stored_specs(folder, PARAMS_FILE, "")
    if "embed.weight" not in specs:
        raise CheckpointError(
            f"checkpoint {folder}: {PARAMS_FILE} has no 'embed.weight': not an llmfn model"
        )
    stored = specs["embed.weight"][3]
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        if _safetensors_dtype(dtype) == stored:
            return dtype
    raise CheckpointError(
        f"checkpoint {folder}: 'embed.weight' has dtype {stored}, expected a float dtype"
    )
