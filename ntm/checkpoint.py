"""Checkpoints: safetensors weights + a JSON config, written atomically.

Layout of a run directory::

    RUN_DIR/checkpoints/step-00006000/model.safetensors   EMA weights (what from_pretrained loads)
                                      train.safetensors   raw training weights
                                      config.json         {"format": "ntm", "model": ..., "train": ..., "step": ...}
                                      state.pt            optimiser, LR schedule, RNG and data-stream state
    RUN_DIR/checkpoints/latest                            name of the newest complete checkpoint

A checkpoint is written into a temporary folder, flushed, renamed into place, and only then is
``latest`` replaced (``os.replace``), so a kill at any moment leaves the previous checkpoint loadable.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig, TrainConfig, model_config_from_dict, to_dict, train_config_from_dict
from .errors import CheckpointError

FORMAT = "ntm"
VERSION = 1


def _fsync_dir(path: Path) -> None:
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


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _write_bytes(path: Path, payload: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())


def _state_dict(weights: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_checkpoint(run_dir: str | Path, step: int, model, ema,
                    model_config: ModelConfig, train_config: TrainConfig | None,
                    state: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it. Returns its folder.

    ``model`` and ``ema`` are modules or full state dicts (raw training and EMA weights).
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for stem, weights in (("model", ema), ("train", model)):
        save_file(_state_dict(weights), str(tmp / f"{stem}.safetensors"), metadata={"format": FORMAT})
        _fsync_file(tmp / f"{stem}.safetensors")
    meta = {"format": FORMAT, "version": VERSION, "step": step, "model": to_dict(model_config),
            "train": None if train_config is None else to_dict(train_config)}
    _write_bytes(tmp / "config.json", json.dumps(meta, indent=2).encode())
    if state is not None:
        torch.save(state, tmp / "state.pt")
        _fsync_file(tmp / "state.pt")
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    pointer = root / f".latest-{os.getpid()}"
    _write_bytes(pointer, name.encode())
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def resolve(path: str | Path) -> Path:
    """The checkpoint folder for a run directory (via ``latest``) or a checkpoint folder itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such run or checkpoint: {path}")
    if (path / "config.json").is_file():
        return path
    pointer = path / "checkpoints" / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        ckpt = path / "checkpoints" / name
        if not (ckpt / "config.json").is_file():
            raise CheckpointError(f"{path}: 'latest' names a missing checkpoint '{name}'")
        return ckpt
    raise CheckpointError(f"{path} is not an ntm run or checkpoint (no config.json or checkpoints/latest)")


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{ckpt}: unreadable config.json ({exc.__class__.__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt}: not an ntm checkpoint (config.json has no \"format\": \"ntm\")")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{ckpt}: unsupported checkpoint version {meta.get('version')!r}")
    return meta


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"missing weights file {file}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: corrupt weights ({str(exc).splitlines()[0]})") from None


def load_into(module: torch.nn.Module, file: Path) -> None:
    weights = _load_weights(file)
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{file}: weights do not match the config ({str(exc).splitlines()[0]})") from None


def build_model(config: ModelConfig) -> torch.nn.Module:
    """A freshly initialised generator of the kind the config names: NTM or FlowMatching."""
    if config.kind == "fm":
        from .flow_matching import FlowMatching
        return FlowMatching(config)
    from .model import NTM
    return NTM(config)


def load_model(path: str | Path, map_location: str | torch.device | None = None, weights: str = "model"):
    """Build the model (NTM or FlowMatching) from a checkpoint's config and load its EMA (``model``)
    or raw (``train``) weights."""
    ckpt = resolve(path)
    meta = read_meta(ckpt)
    try:
        config = model_config_from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt}: invalid model config ({exc})") from None
    try:
        model = build_model(config)
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError, AssertionError, IndexError) as exc:
        raise CheckpointError(f"{ckpt}: cannot build the model from its config ({exc})") from None
    load_into(model, ckpt / f"{weights}.safetensors")
    if config.kind == "ntm":
        from .denoising import load_denoiser
        run_dir = Path(path) if (Path(path) / "checkpoints").is_dir() else ckpt.parent.parent
        model.denoiser = load_denoiser(run_dir, model, step=meta.get("step"))
    model.eval()
    if map_location is not None:
        model.to(map_location)
    return model


def load_training(run_dir: str | Path) -> tuple[Path, dict, ModelConfig, TrainConfig, dict]:
    """(checkpoint folder, meta, model config, train config, state) for ``--resume``."""
    ckpt = resolve(run_dir)
    meta = read_meta(ckpt)
    try:
        model_config = model_config_from_dict(meta["model"])
        train_config = train_config_from_dict(meta["train"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt}: invalid config ({exc})") from None
    try:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign pickle raises many kinds
        raise CheckpointError(f"{ckpt}: unreadable training state ({exc.__class__.__name__})") from None
    return ckpt, meta, model_config, train_config, state
