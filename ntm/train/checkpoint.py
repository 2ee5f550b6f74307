"""Training checkpoints: artifacts (``ntm.io``) with raw and EMA weights and the training state.

Layout of a run directory::

    RUN_DIR/checkpoints/step-00006000/model.safetensors   EMA weights (what from_pretrained loads)
                                      train.safetensors   raw training weights
                                      config.json         {"format": TAG, "version": 2, "config": ..., "train": ..., "step": ...}
                                      state.pt            optimiser, LR schedule, RNG and data-stream state
    RUN_DIR/checkpoints/latest                            name of the newest complete checkpoint
    RUN_DIR/metrics.jsonl                                 the training log

A checkpoint folder is complete before ``latest`` is replaced (``os.replace``), so a kill at any
moment leaves the previous checkpoint loadable.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig, from_dict, to_dict
from ..errors import CheckpointError
from ..io import checkpoints_dir, fsync_dir, latest_checkpoint, read_meta, write_artifact, write_text


def save_checkpoint(run_dir: str | Path, step: int, fmt: str, config: dict, train_config: TrainConfig,
                    weights: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], state: dict[str, Any] | None = None,
                    meta: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` and point ``latest`` at it; keep the newest ``keep``. Returns its folder."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = write_artifact(root / name, fmt, config, {"model": ema, "train": weights},
                           meta={"step": step, "train": to_dict(train_config), **(meta or {})}, state=state)
    write_text(root / "latest", name)
    fsync_dir(root)
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_run(run_dir: str | Path, formats: tuple[str, ...]) -> tuple[Path, dict, TrainConfig]:
    """(latest checkpoint folder, its meta, its training config) of a run to resume."""
    ckpt = latest_checkpoint(run_dir) if Path(run_dir).is_dir() else None
    if ckpt is None:
        raise CheckpointError(f"--resume: no checkpoint in {run_dir}")
    meta = read_meta(ckpt, formats)
    try:
        train_config = from_dict(TrainConfig, meta["train"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt}: invalid training config ({exc})") from None
    return ckpt, meta, train_config
