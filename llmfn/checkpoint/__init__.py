"""Checkpoints on disk: atomic save, verified load into a template, keep-N, resume discovery.

One folder per saved step under a checkpoint root:

    checkpoints/
      step_000100/
        params.safetensors   the "params" sub-tree, flat "layers.0.attn.wqkv" keys (a usable export)
        state.safetensors    every other tensor of the train state ("opt_state.exp_avg.embed.weight", "step")
        config.yaml          the full run config (`llmfn.config.to_yaml`)
        train_state.json     caller's JSON dict: step, tokens seen, data position, callback states...
        tokenizer/           a copy of the tokenizer folder, if one was given
        manifest.json        every file above with its size and sha256 (written last)
      latest                 text file: the name of the newest complete step folder
      best                   text file: the name of the step folder marked best (`mark_best`)

A save writes into a hidden temporary folder, fsyncs every file, renames the folder into place
and only then moves the `latest` pointer (itself replaced atomically). Loading never unpickles:
tensors come from safetensors, the rest from JSON and `yaml.safe_load`. Values are copied into a
caller-built *template* TensorDict so the loaded state has the template's key order, devices and
dtypes (a state with other metadata recompiles the train step or crashes it).

The modules, each importing only those above it:

    layout          file names, step folders, the `latest` / `best` pointers, CheckpointError
    flat_keys       a TensorDict as the flat {"a.b.c": tensor} map a safetensors file stores
    verification    manifest.json: listed files, sizes, sha256
    discovery       the newest valid step folder; a step folder from what a user typed
    config_checks   config.yaml: parsed safely, its model section checked against the model
    writing         atomic save, params-only folders, keep-N pruning, `mark_best`
    loading         verified load into a template; `load_for_inference`
"""

from llmfn.checkpoint.config_checks import (
    RUNTIME_ONLY_MODEL_FIELDS,
    check_model_config,
    model_config_from_checkpoint,
    read_run_config,
)
from llmfn.checkpoint.discovery import find_resume_checkpoint, resolve_checkpoint
from llmfn.checkpoint.flat_keys import flat_tensors
from llmfn.checkpoint.layout import (
    BEST_POINTER,
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    LATEST_POINTER,
    MANIFEST_FILE,
    PARAMS_FILE,
    REQUIRED_FILES,
    STATE_FILE,
    STEP_DIR,
    TMP_PREFIX,
    TOKENIZER_DIR,
    TRAIN_STATE_FILE,
    TRASH_PREFIX,
    CheckpointError,
    best_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    step_dir_name,
    step_of,
)
from llmfn.checkpoint.loading import load_checkpoint, load_for_inference, load_params
from llmfn.checkpoint.verification import manifest_step, read_manifest, verify_checkpoint
from llmfn.checkpoint.writing import (
    mark_best,
    prune_checkpoints,
    save_checkpoint,
    save_params_folder,
)

__all__ = [
    "BEST_POINTER",
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "LATEST_POINTER",
    "MANIFEST_FILE",
    "PARAMS_FILE",
    "REQUIRED_FILES",
    "RUNTIME_ONLY_MODEL_FIELDS",
    "STATE_FILE",
    "STEP_DIR",
    "TMP_PREFIX",
    "TOKENIZER_DIR",
    "TRAIN_STATE_FILE",
    "TRASH_PREFIX",
    "CheckpointError",
    "best_checkpoint",
    "check_model_config",
    "find_resume_checkpoint",
    "flat_tensors",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_for_inference",
    "load_params",
    "manifest_step",
    "mark_best",
    "model_config_from_checkpoint",
    "prune_checkpoints",
    "read_manifest",
    "read_run_config",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_params_folder",
    "step_dir_name",
    "step_of",
    "verify_checkpoint",
]
