"""A run that starts from another run's weights: the params of a checkpoint or export, with a
fresh optimizer, step and schedule (fine-tuning, SFT after pretraining, a longer context;
litgpt's `--initial_checkpoint_dir`, torchtitan's `initial_load_path`).

Unlike a resume, the architecture may change where the params keep their meaning and shapes:
the runtime-only fields (dropout, MoE loss weights...) and the context (max_seq_len and the
RoPE fields, sliding_window), except with learned positions, whose table has max_seq_len rows.
"""

from __future__ import annotations

import os
from pathlib import Path

from tensordict import TensorDict

from llmfn.checkpoint.config_checks import RUNTIME_ONLY_MODEL_FIELDS, model_config_from_checkpoint
from llmfn.checkpoint.discovery import resolve_checkpoint
from llmfn.checkpoint.layout import CONFIG_FILE, CheckpointError
from llmfn.checkpoint.loading import load_for_inference
from llmfn.checkpoint.verification import verify_checkpoint
from llmfn.model_config import ModelConfig

CONTEXT_FIELDS = frozenset(
    {
        "max_seq_len",
        "rope_theta",
        "rope_scaling",
        "rope_scaling_factor",
        "rope_original_max_seq_len",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
        "sliding_window",
    }
)


def changeable_fields(running: ModelConfig) -> frozenset[str]:
    """Model fields a run may change from the weights it starts from."""
    context = CONTEXT_FIELDS - ({"max_seq_len"} if running.position == "learned" else set())
    return RUNTIME_ONLY_MODEL_FIELDS | context


def check_same_params(folder: Path, stored: ModelConfig, running: ModelConfig) -> None:
    """CheckpointError listing every model field that differs between the checkpoint and the
    running model and would change what its params are (see `changeable_fields`)."""
    free = changeable_fields(running)
    stored_fields, running_fields = (  # intermediate_size null means the derived ffn_size
        cfg.replace(intermediate_size=cfg.ffn_size).to_dict() for cfg in (stored, running)
    )
    differences = [
        f"model.{name}: checkpoint has {stored_fields[name]!r}, this run has {value!r}"
        for name, value in running_fields.items()
        if name not in free and stored_fields.get(name) != value
    ]
    if differences:
        raise CheckpointError(
            f"checkpoint {folder}: {CONFIG_FILE}: its params cannot start this model: "
            + "; ".join(differences)
        )


def load_initial_params(
    path: str | os.PathLike, running: ModelConfig, template: TensorDict
) -> tuple[TensorDict, Path]:
    """Fill `template` (the run's freshly initialised params) in place with the params of the
    checkpoint at `path` (a step folder, pointer, checkpoint root, run folder or export), cast
    to the template's dtypes and devices -> (template, the step folder read)."""
    folder = resolve_checkpoint(path)
    verify_checkpoint(folder)  # before config.yaml is read: a damaged file is named as such
    check_same_params(folder, model_config_from_checkpoint(folder), running)
    _, params, _ = load_for_inference(folder, with_tokenizer=False, verify=False)
    return template.update_(params), folder
