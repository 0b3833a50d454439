"""The run config a checkpoint stores in config.yaml: parsed safely, checked against the model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from llmfn.checkpoint.layout import CONFIG_FILE, CheckpointError
from llmfn.model_config import ModelConfig

# Model fields that change how a run trains, not what its parameters mean: they may differ on
# resume (the MoE loss weights and expert capacity shape the training loss and routing only).
RUNTIME_ONLY_MODEL_FIELDS = frozenset(
    {
        "dropout",
        "activation_checkpointing",
        "loss_chunk_size",
        "init_std",
        "moe_aux_loss_coef",
        "router_z_loss_coef",
        "moe_capacity_factor",
    }
)


# libyaml's safe loader is ~50x faster than the pure-Python one; both build no Python objects.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _safe_load_yaml(text: str):
    return yaml.load(text, Loader=_YAML_LOADER)


def check_config_yaml(config_yaml: str) -> None:
    """ValueError unless `config_yaml` is a YAML run config with a 'model' section."""
    try:
        tree = _safe_load_yaml(config_yaml)
    except yaml.YAMLError as err:
        raise ValueError(f"config_yaml is not valid YAML: {err}") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        raise ValueError(
            "config_yaml must be a run config with a 'model' section (llmfn.config.to_yaml)"
        )


def _one_line(err: Exception) -> str:
    """PyYAML's several-line message as one line: "problem (line L, column C)"."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or not problem:
        return " ".join(str(err).split())
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"


def read_run_config(path: str | os.PathLike) -> dict:
    """The run config stored in a step folder's config.yaml, as a dict (yaml.safe_load)."""
    file = Path(path) / CONFIG_FILE
    try:
        tree = _safe_load_yaml(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CheckpointError(
            f"checkpoint {path}: {CONFIG_FILE} cannot be read as YAML: {_one_line(err)}"
        ) from None
    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE} has no 'model' section")
    return tree


def model_config_from_checkpoint(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of the model section of a step folder's config.yaml."""
    from llmfn.config import ConfigError, from_dict

    try:
        return from_dict({"model": read_run_config(path)["model"]}).model
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE}: {err}") from None


def check_model_config(path: str | os.PathLike, expected_model: ModelConfig | Mapping) -> None:
    """CheckpointError if the checkpoint's model section differs from `expected_model` in any
    field except RUNTIME_ONLY_MODEL_FIELDS; the message lists each field with both values."""
    stored = model_config_from_checkpoint(path).to_dict()
    expected = (
        expected_model.to_dict()
        if isinstance(expected_model, ModelConfig)
        else dict(expected_model)
    )
    differences = [
        f"model.{name}: checkpoint has {stored.get(name)!r}, running model has {expected[name]!r}"
        for name in expected
        if name not in RUNTIME_ONLY_MODEL_FIELDS and stored.get(name) != expected[name]
    ]
    if differences:
        raise CheckpointError(
            f"checkpoint {path}: {CONFIG_FILE} model section does not match the running model: "
            + "; ".join(differences)
        )
