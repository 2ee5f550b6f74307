"""Files: atomic writes, and the one on-disk artifact format of models, denoisers and classifiers.

An artifact is a folder::

    FOLDER/config.json          {"format": TAG, "version": 2, "config": {...}, ...}
    FOLDER/model.safetensors    the weights

plus, for a training checkpoint, ``train.safetensors`` (raw weights; ``model`` holds the EMA) and
``state.pt`` (optimiser, schedule, generators). The tag says what the folder holds: ``ntm``,
``ntm-fm``, ``ntm-denoiser`` or ``ntm-classifier``. A run folder keeps its checkpoints in
``RUN/checkpoints/step-XXXXXXXX/`` and the name of the newest complete one in ``RUN/checkpoints/latest``.

Every write goes to a temporary name in the same folder, is flushed, and is renamed into place, so a
kill at any moment leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import upgrade_v1
from .errors import CheckpointError

VERSION = 2
FORMATS = ("ntm", "ntm-fm", "ntm-denoiser", "ntm-classifier", "ntm-glow")


# ----------------------------------------------------------------------------------- atomic writes
def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that pick a format by suffix
    work); on success it is flushed and renamed onto ``path``, on failure removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix if suffix is not None else path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | Path, payload: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, array)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], fmt: str) -> None:
    """Contiguous CPU copies of ``tensors`` into a safetensors file, atomically."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={"format": fmt})


# ------------------------------------------------------------------------------------- artifacts
def write_artifact(folder: str | Path, fmt: str, config: dict, weights: dict[str, dict[str, torch.Tensor]],
                   meta: dict | None = None, state: dict | None = None) -> Path:
    """Write an artifact folder atomically: build it under a temporary name, then swap it in.

    ``weights`` maps a file stem ("model", "train") to a state dict; ``meta`` adds keys to
    config.json; ``state`` (a picklable dict of tensors and numbers) becomes ``state.pt``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown artifact format '{fmt}'")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for stem, sd in weights.items():
        save_tensors(tmp / f"{stem}.safetensors", sd, fmt)
    write_json(tmp / "config.json", {"format": fmt, "version": VERSION, "config": config, **(meta or {})})
    if state is not None:
        with atomic_path(tmp / "state.pt") as f:
            torch.save(state, f)
    fsync_dir(tmp)
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.rename(folder, old)
    os.rename(tmp, folder)
    fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def read_meta(folder: str | Path, formats: tuple[str, ...] | None = None) -> dict:
    """config.json of an artifact (version-1 checkpoints are upgraded on the fly), checked against
    the ``formats`` the caller accepts."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder}: unreadable config.json ({exc.__class__.__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
        raise CheckpointError(f"{folder}: not an ntm artifact (config.json has no known \"format\")")
    if meta.get("version") == 1 and meta["format"] == "ntm":
        meta = upgrade_v1(meta)
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{folder}: unsupported version {meta.get('version')!r}")
    if formats is not None and meta["format"] not in formats:
        raise CheckpointError(f"{folder} holds a '{meta['format']}' artifact, expected {' or '.join(formats)}")
    return meta


def load_weights(file: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors ``file`` by name (``CheckpointError`` when missing or unreadable)."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"missing weights file {file}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: corrupt weights ({str(exc).splitlines()[0]})") from None


def load_into(module: torch.nn.Module, file: str | Path) -> None:
    """Load a safetensors file into ``module`` (strict), with one clear error on any mismatch."""
    weights = load_weights(file)
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{file}: weights do not match the config ({str(exc).splitlines()[0]})") from None


def load_state(folder: str | Path) -> dict:
    """The training state (``state.pt``) of a checkpoint."""
    try:
        return torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign pickle raises many kinds
        raise CheckpointError(f"{folder}: unreadable training state ({exc.__class__.__name__})") from None


# ------------------------------------------------------------------------------------ run folders
def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None when it has none."""
    pointer = checkpoints_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    ckpt = checkpoints_dir(run_dir) / name
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"{run_dir}: 'latest' names a missing checkpoint '{name}'")
    return ckpt


def resolve(path: str | Path) -> Path:
    """The artifact folder for a run directory (its latest checkpoint) or an artifact folder itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such run or checkpoint: {path}")
    if (path / "config.json").is_file():
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path} is not an ntm run or checkpoint (no config.json or checkpoints/latest)")
    return ckpt


def run_dir_of(path: str | Path) -> Path | None:
    """The run folder a path names: itself when it has checkpoints, or the run of a checkpoint folder."""
    path = Path(path)
    if checkpoints_dir(path).is_dir():
        return path
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return None
