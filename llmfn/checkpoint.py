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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from tensordict import TensorDict

from llmfn.model_config import ModelConfig

FORMAT = "llmfn-checkpoint"
FORMAT_VERSION = 1
PARAMS_FILE = "params.safetensors"
STATE_FILE = "state.safetensors"
CONFIG_FILE = "config.yaml"
TRAIN_STATE_FILE = "train_state.json"
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
LATEST_POINTER = "latest"
BEST_POINTER = "best"
REQUIRED_FILES = (PARAMS_FILE, CONFIG_FILE)  # enough for inference; resume also needs the state
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
# Model fields that change how a run trains, not what its parameters mean: they may differ on resume.
RUNTIME_ONLY_MODEL_FIELDS = frozenset({"dropout", "activation_checkpointing", "init_std"})
_CHUNK = 1 << 20
# libyaml's safe loader is ~50x faster than the pure-Python one; both build no Python objects.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _safe_load_yaml(text: str):
    return yaml.load(text, Loader=_YAML_LOADER)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or does not fit the running model.

    The message names the folder, the file or key, and the check that failed."""


# --- names and discovery --------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    """The folder name of a step: 100 -> "step_000100"."""
    return f"step_{step:06d}"


def step_of(path: str | os.PathLike) -> int | None:
    """The step number in a step folder's name, or None if the name is not "step_<digits>"."""
    match = STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The step folders under `root`, oldest step first (unverified; temporary folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(folders, key=step_of)


def _read_pointer(root: Path, name: str) -> Path | None:
    pointer = root / name
    if not pointer.is_file():
        return None
    target = root / pointer.read_text(encoding="utf-8").strip()
    return target if target.is_dir() and step_of(target) is not None else None


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The step folder the `latest` pointer names, if it exists (unverified; see
    `find_resume_checkpoint` for the newest folder that passes verification)."""
    return _read_pointer(Path(root), LATEST_POINTER)


def best_checkpoint(root: str | os.PathLike) -> Path | None:
    """The step folder the `best` pointer names, if it exists."""
    return _read_pointer(Path(root), BEST_POINTER)


def find_resume_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest step folder under `root` that passes `verify_checkpoint`, or None.

    Newer folders that fail verification (no manifest, missing or corrupted files) are skipped
    with a warning naming the folder and the failed check; hidden temporary folders of
    interrupted saves are never candidates."""
    for folder in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(folder)
        except CheckpointError as err:
            warnings.warn(f"skipping checkpoint {folder}: {err}", stacklevel=2)
            continue
        return folder
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step folder from what a user may type: a step folder, a `latest`/`best` pointer file,
    a checkpoint root (its newest valid step), or a run folder holding `checkpoints/`."""
    path = Path(path)
    if path.is_file() and path.name in (LATEST_POINTER, BEST_POINTER):
        target = _read_pointer(path.parent, path.name)
        if target is None:
            raise CheckpointError(f"pointer file {path} does not name an existing step folder")
        return target
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise CheckpointError(
            f"checkpoint path {path} {what}: expected a step folder (step_000100/), "
            "a checkpoint root, or a run folder with checkpoints/"
        )
    if (path / MANIFEST_FILE).is_file() or step_of(path) is not None:
        return path
    for root in (path, path / "checkpoints"):
        if list_checkpoints(root):
            found = find_resume_checkpoint(root)
            if found is None:
                raise CheckpointError(
                    f"no valid checkpoint under {root}: every step folder failed verification"
                )
            return found
    runs = sorted((p for p in path.iterdir() if (p / "checkpoints").is_dir()), key=os.path.getmtime)
    hint = f" (it holds run folders: the newest is {runs[-1]})" if runs else ""
    raise CheckpointError(
        f"{path} holds no checkpoint: expected manifest.json, step_<N>/ folders, or "
        f"checkpoints/step_<N>/{hint}"
    )


# --- writing ------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _leaf_name(key: str | tuple[str, ...]) -> str:
    parts = (key,) if isinstance(key, str) else key
    for part in parts:
        if "." in part or not part:
            raise ValueError(
                f"tensor key {'/'.join(parts)!r}: names must be non-empty and contain no '.'"
            )
    return ".".join(parts)


def flat_tensors(tree: TensorDict) -> dict[str, torch.Tensor]:
    """{"a.b.c": tensor} for every leaf of `tree`, in the tree's order."""
    flat = {}
    for key, leaf in tree.items(include_nested=True, leaves_only=True):
        name = _leaf_name(key)
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"tensor key {name!r} holds a {type(leaf).__name__}: checkpoints store tensors only"
            )
        flat[name] = leaf
    return flat


def _storable(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; copies where two leaves share memory (safetensors refuses)."""
    out, seen = {}, set()
    for name, tensor in flat.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        if tensor.numel():
            seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def _write_tensors(path: Path, flat: dict[str, torch.Tensor]) -> None:
    save_file(_storable(flat), str(path), metadata={"format": FORMAT})
    _fsync_file(path)


def _split_state(tensors: TensorDict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(params, rest): the "params" sub-tree with keys relative to it, and every other leaf."""
    flat = flat_tensors(tensors)
    params = {name[len("params.") :]: t for name, t in flat.items() if name.startswith("params.")}
    rest = {name: t for name, t in flat.items() if not name.startswith("params.")}
    return params, rest


def _copy_tokenizer(source: Path, target: Path) -> None:
    if not source.is_dir():
        raise ValueError(f"tokenizer_dir={str(source)!r} is not a folder")
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        dest = target / file.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, dest)
        _fsync_file(dest)
    for folder in [target, *(p for p in target.rglob("*") if p.is_dir())]:
        _fsync_dir(folder)


def _manifest(folder: Path, step: int) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    entries = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in files
    }
    return {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "files": entries}


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` folder to `final`; an existing `final` is moved aside first."""
    trash = None
    if final.exists():
        trash = final.with_name(f"{TRASH_PREFIX}{final.name}-{os.getpid()}")
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _write_pointer(root: Path, name: str, target: Path) -> None:
    tmp = root / f"{TMP_PREFIX}{name}-{os.getpid()}"
    _write_text(tmp, target.name + "\n")
    os.replace(tmp, root / name)
    _fsync_dir(root)


def _remove_stale_temporaries(root: Path) -> None:
    """Delete what interrupted saves left behind (one writer per checkpoint root is assumed)."""
    for path in root.iterdir():
        if path.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _check_config_yaml(config_yaml: str) -> None:
    try:
        tree = _safe_load_yaml(config_yaml)
    except yaml.YAMLError as err:
        raise ValueError(f"config_yaml is not valid YAML: {err}") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        raise ValueError(
            "config_yaml must be a run config with a 'model' section (llmfn.config.to_yaml)"
        )


def _write_folder(
    final: Path,
    step: int,
    params: dict[str, torch.Tensor],
    config_yaml: str,
    extra_files: dict[str, dict | str],
    tokenizer_dir: str | os.PathLike | None,
) -> Path:
    """Write a complete folder beside `final` (tensors as safetensors, text as is), add the
    manifest, fsync, then rename it to `final`."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        _write_tensors(tmp / PARAMS_FILE, params)
        _write_text(tmp / CONFIG_FILE, config_yaml)
        for file_name, content in extra_files.items():
            if isinstance(content, str):
                _write_text(tmp / file_name, content)
            else:
                _write_tensors(tmp / file_name, content)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), tmp / TOKENIZER_DIR)
        _write_text(tmp / MANIFEST_FILE, json.dumps(_manifest(tmp, step), indent=2))
        _fsync_dir(tmp)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    tensors: TensorDict,
    *,
    config_yaml: str,
    train_state: dict,
    tokenizer_dir: str | os.PathLike | None = None,
    keep_last_n: int | None = None,
    name: str | None = None,
) -> Path:
    """Write `root/step_<step>/` atomically and return it.

    tensors: the whole train state; its "params" sub-tree goes to params.safetensors, every
    other leaf to state.safetensors (keys joined with "."). config_yaml: the run config as
    YAML text. train_state: a JSON-able dict (floats may be inf/nan). tokenizer_dir: copied to
    tokenizer/. keep_last_n: afterwards delete all but the newest n step folders (the `best`
    one and the one just written are always kept). The `latest` pointer moves only once the
    folder is complete. name: write `root/<name>/` instead (e.g. a diagnostic snapshot): a named
    folder is a side copy that `latest`, pruning and resume discovery ignore.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step={step!r} is invalid: expected a non-negative integer")
    if keep_last_n is not None and (not isinstance(keep_last_n, int) or keep_last_n < 1):
        raise ValueError(
            f"keep_last_n={keep_last_n!r} is invalid: expected None or a positive integer"
        )
    _check_config_yaml(config_yaml)
    try:
        train_state_json = json.dumps(train_state, indent=2)
    except (TypeError, ValueError) as err:
        raise TypeError(f"train_state must be a JSON-serializable dict: {err}") from None
    if name is not None and (
        not name or name.startswith(".") or "/" in name or step_of(name) is not None
    ):
        raise ValueError(
            f"name={name!r} is invalid: expected a plain folder name that is not step_<N>"
        )
    params, rest = _split_state(tensors)

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    files = {STATE_FILE: rest, TRAIN_STATE_FILE: train_state_json}
    final = _write_folder(
        root / (name or step_dir_name(step)), step, params, config_yaml, files, tokenizer_dir
    )
    if name is not None:
        return final
    _write_pointer(root, LATEST_POINTER, final)
    if keep_last_n is not None:
        prune_checkpoints(root, keep_last_n, keep=(final,))
    return final


def save_params_folder(
    out_dir: str | os.PathLike,
    params: TensorDict,
    *,
    config_yaml: str,
    step: int = 0,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write an inference-only checkpoint folder: params.safetensors, config.yaml, tokenizer/
    and manifest.json, no optimizer state (`load_for_inference` reads it; resume does not).

    out_dir must not exist or be empty; it is written beside and renamed into place."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(
            f"output folder {out_dir} already exists and is not empty: choose a new folder"
        )
    _check_config_yaml(config_yaml)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return _write_folder(out_dir, step, flat_tensors(params), config_yaml, {}, tokenizer_dir)


def prune_checkpoints(
    root: str | os.PathLike, keep_last_n: int, *, keep: tuple[Path, ...] = ()
) -> list[Path]:
    """Delete all but the newest `keep_last_n` step folders under `root`; the folders that
    `latest` and `best` name and those in `keep` survive. Returns the deleted folders."""
    root = Path(root)
    folders = list_checkpoints(root)
    protected = {
        p.resolve()
        for p in (*keep, latest_checkpoint(root), best_checkpoint(root))
        if p is not None
    }
    doomed = [
        p for p in folders[: max(0, len(folders) - keep_last_n)] if p.resolve() not in protected
    ]
    for folder in doomed:
        # Rename first so a kill mid-delete leaves a hidden folder, never a half-deleted step.
        trash = folder.with_name(f"{TRASH_PREFIX}{folder.name}-{os.getpid()}")
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        _fsync_dir(root)
    return doomed


def mark_best(root: str | os.PathLike, path: str | os.PathLike) -> None:
    """Point `root/best` at the step folder `path` (which must be inside `root`); pruning keeps it."""
    root, path = Path(root), Path(path)
    if path.parent.resolve() != root.resolve() or step_of(path) is None or not path.is_dir():
        raise ValueError(f"mark_best: {path} is not a step folder inside checkpoint root {root}")
    _write_pointer(root, BEST_POINTER, path)


# --- verification -------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed manifest.json of a step folder; CheckpointError if missing or malformed."""
    path = Path(path)
    file = path / MANIFEST_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder")
    if not file.is_file():
        raise CheckpointError(
            f"checkpoint {path}: {MANIFEST_FILE} is missing (an incomplete save or not a checkpoint)"
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"checkpoint {path}: {MANIFEST_FILE} is not valid JSON: {err}"
        ) from None
    if not isinstance(manifest, dict):
        raise CheckpointError(
            f"checkpoint {path}: {MANIFEST_FILE} is not an {FORMAT} manifest: expected a JSON "
            f"object, got a {type(manifest).__name__}"
        )
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(
            f"checkpoint {path}: {MANIFEST_FILE} is not an {FORMAT} manifest (no 'files' map)"
        )
    return manifest


def _check_entry(folder: Path, name: str, entry, check_hashes: bool) -> None:
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not isinstance(entry, dict):
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST_FILE} has an invalid entry {name!r}")
    file = folder / relative
    if not file.is_file():
        raise CheckpointError(
            f"checkpoint {folder}: file {name} listed in {MANIFEST_FILE} is missing"
        )
    size = file.stat().st_size
    if size != entry.get("size"):
        raise CheckpointError(
            f"checkpoint {folder}: file {name} has {size} bytes, {MANIFEST_FILE} says {entry.get('size')} "
            "(size check failed: truncated or overwritten)"
        )
    if check_hashes:
        digest = _sha256(file)
        if digest != entry.get("sha256"):
            raise CheckpointError(
                f"checkpoint {folder}: file {name} has sha256 {digest}, {MANIFEST_FILE} says "
                f"{entry.get('sha256')} (sha256 check failed: the file is corrupted)"
            )


def verify_checkpoint(path: str | os.PathLike, *, check_hashes: bool = True) -> dict:
    """Check a step folder against its manifest and return the manifest.

    Raises CheckpointError naming the file and the failed check: manifest missing or malformed,
    a required file (params.safetensors, config.yaml) unlisted, a listed file missing, a size
    or (with check_hashes) sha256 mismatch."""
    folder = Path(path)
    manifest = read_manifest(folder)
    for name in REQUIRED_FILES:
        if name not in manifest["files"]:
            raise CheckpointError(
                f"checkpoint {folder}: {MANIFEST_FILE} does not list required file {name}"
            )
    for name, entry in manifest["files"].items():
        _check_entry(folder, name, entry, check_hashes)
    return manifest


# --- reading ------------------------------------------------------------------------------------
def read_run_config(path: str | os.PathLike) -> dict:
    """The run config stored in a step folder's config.yaml, as a dict (yaml.safe_load)."""
    file = Path(path) / CONFIG_FILE
    try:
        tree = _safe_load_yaml(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CheckpointError(
            f"checkpoint {path}: {CONFIG_FILE} cannot be read as YAML: {err}"
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
) -> tuple[TensorDict, dict]:
    """Fill the train-state `template` from a step folder in place; return (template, train_state).

    template: the freshly built state (params, opt_state, step...); every leaf must have a stored
    tensor of the same shape and dtype, and vice versa, else CheckpointError naming the key.
    Values are copied (`copy_`), so the template keeps its key order, devices and tensor types.
    expected_model: the running ModelConfig (or its dict); checked against config.yaml.
    verify: check the manifest (sizes and sha256) first.
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
):
    """(ModelConfig, params TensorDict, tokenizer or None) from a step folder, a `latest`/`best`
    pointer, a checkpoint root or a run folder (then its newest valid checkpoint).

    The template is the `init_params` tree of config.yaml's model section (in the dtype the
    params were saved in), filled from params.safetensors, then moved to `device` / cast to
    `dtype` if given. The tokenizer is `llmfn.data.load_tokenizer(folder / "tokenizer")` when
    the checkpoint has one and with_tokenizer is set."""
    folder = resolve_checkpoint(path)
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
