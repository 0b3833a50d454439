"""Checking a step folder against its manifest.json: listed files, sizes, sha256."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from llmfn.checkpoint.layout import FORMAT, MANIFEST_FILE, REQUIRED_FILES, CheckpointError

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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


def manifest_step(path: str | os.PathLike) -> int:
    """The step a step folder's manifest.json records (0 if it records none)."""
    step = read_manifest(path).get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(
            f"checkpoint {path}: {MANIFEST_FILE} has step {step!r}: expected an int >= 0"
        )
    return step


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
        digest = file_sha256(file)
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
