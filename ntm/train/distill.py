"""Self-distillation of the denoiser g_phi (paper §3.4) by the fit loop: ``RUN_DIR/denoiser`` is a run
folder of its own (format ``ntm-denoiser``), resumable like any training run; ``NTM.from_pretrained``
attaches the finished denoiser distilled from the same NTM checkpoint."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from ..config import DISTILL_TRAIN, DenoiserConfig, TrainConfig, from_dict, to_dict
from ..denoising import FORMAT, Denoiser, denoiser_dir
from ..errors import ConfigError
from ..hub import load_model
from ..io import latest_checkpoint, read_meta, resolve, run_dir_of
from ..model import NTM
from .loop import Distributed, fit
from .objectives import DistillObjective


def distill(run_dir: str | Path, source, train_config: TrainConfig = DISTILL_TRAIN,
            config: DenoiserConfig = DenoiserConfig(), clip_percentile: float | None = None,
            progress: bool = True, device: torch.device | str | None = None) -> dict:
    """Train g_phi for the NTM in ``run_dir`` and store it in ``run_dir/denoiser``.

    An unfinished distillation with the same settings resumes; a finished one, or one with other
    settings, is an error (move it away to distil again). Returns the fit summary with the first and
    last logged MSE.
    """
    run = run_dir_of(run_dir)
    if run is None:
        raise ConfigError(f"no run at {run_dir} (a run folder holds checkpoints/)")
    if run != Path(run_dir):  # a checkpoint folder: its denoiser would land where no load looks
        raise ConfigError(f"{run_dir} is a checkpoint folder; distil from its run {run} (its latest checkpoint)")
    ntm_step = read_meta(resolve(run_dir)).get("step")
    model = load_model(run_dir)
    if not isinstance(model, NTM):
        raise ConfigError(f"{run_dir} is not an NTM run; only NTMs have a denoiser to distil")
    folder = denoiser_dir(run_dir)
    meta = {"ntm_step": ntm_step, "clip_percentile": clip_percentile, "data": to_dict(model.spec)}
    cfg = replace(train_config, class_dropout=0.0)
    ckpt = latest_checkpoint(folder) if folder.is_dir() else None
    resume = ckpt is not None
    if resume:
        old = read_meta(ckpt, (FORMAT,))
        if old["step"] >= old["train"]["steps"]:
            raise ConfigError(f"{folder} already holds a finished denoiser; move it away to distil again")
        as_saved = json.loads(json.dumps(meta))  # tuples become lists, as in the stored JSON
        same = from_dict(DenoiserConfig, old["config"]) == config and from_dict(TrainConfig, old["train"]) == cfg \
            and all(old.get(k) == v for k, v in as_saved.items())
        if not same:
            raise ConfigError(f"{folder} holds a distillation with other settings; move it away to start afresh")
    elif folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{folder} exists and is not a distillation run; move it away first")
    with Distributed(device) as ctx:
        torch.manual_seed(cfg.seed)
        objective = DistillObjective(model.to(ctx.device), Denoiser(config, model.spec).to(ctx.device),
                                     clip_percentile)
        summary = fit(objective, cfg, source, folder, fmt=FORMAT, config=to_dict(config), meta=meta, resume=resume,
                      ctx=ctx, progress=progress, desc="distil")
    logged = [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (folder / "metrics.jsonl").is_file() else []
    return {**summary, "first_loss": logged[0] if logged else math.nan,
            "final_loss": logged[-1] if logged else math.nan}
