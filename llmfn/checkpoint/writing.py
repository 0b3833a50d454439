"""Atomic saves: write into a hidden temporary folder, fsync, rename into place, move pointers."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tensordict import TensorDict

from llmfn.checkpoint.config_checks import check_config_yaml
from llmfn.checkpoint.flat_keys import flat_tensors
from llmfn.checkpoint.layout import (
    BEST_POINTER,
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    LATEST_POINTER,
    MANIFEST_FILE,
    PARAMS_FILE,
    STATE_FILE,
    TMP_PREFIX,
    TOKENIZER_DIR,
    TRAIN_STATE_FILE,
    TRASH_PREFIX,
    best_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    step_dir_name,
    step_of,
)
from llmfn.checkpoint.verification import file_sha256


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
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
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
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp's is 0o700: a checkpoint is a normal folder
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
    check_config_yaml(config_yaml)
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
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} is a file: expected a new or empty folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(
            f"output folder {out_dir} already exists and is not empty: choose a new folder"
        )
    check_config_yaml(config_yaml)
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


def current_umask() -> int:
    """The process's file mode creation mask (reading it means setting it: set it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
