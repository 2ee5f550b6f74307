"""Start an NTM from a pretrained flow-matching model (paper §3.3, App. A.3, A.5).

The NTM's predictor becomes the FM run's velocity network read in u-space
(``ntm.predictor.VelocityPredictor``; its scale options are described there), the transporter starts
at its identity initialisation, and training adds the mean-alignment loss against the frozen teacher
(``ntm.train.objectives.FinetuneObjective``). The pretrained velocity weights train at the preset's
learning rate and the parts that start fresh (transporter, scale head) at ``FRESH_LR_FACTOR`` (4)
times that; ``freeze_backbone`` keeps the pretrained weights fixed.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from ..config import (AUX_WEIGHT, FRESH_LR_FACTOR, FinetuneConfig, FMConfig, NTMConfig, PredictorConfig, TrainConfig,
                      default_preset, from_dict, get_preset)
from ..errors import ConfigError
from ..io import read_meta, resolve
from .runs import train


def finetune_config(fm_config: FMConfig, preset: str | None = None, velocity_scale: str = "x0",
                    s0_std_floor: float | None = None) -> NTMConfig:
    """The NTM config that starts from an FM run's config: same backbone, a velocity predictor and the
    preset's transporter and trajectory (default preset: by the data kind)."""
    p = get_preset(preset or default_preset(fm_config.data))
    v = fm_config.velocity
    predictor = PredictorConfig(layers=v.layers, width=v.width, heads=v.heads, kind="velocity",
                                velocity_scale=velocity_scale, conditioning=v.conditioning,
                                condition_std=v.condition_std, position=v.position,
                                s0_std_floor=s0_std_floor or PredictorConfig.s0_std_floor)
    return NTMConfig(data=fm_config.data, trajectory=replace(p.trajectory, shift=fm_config.shift),
                     transporter=p.transporter, predictor=predictor)


def finetune_train_config(base: TrainConfig, steps: int, aux_weight: float, teacher: str | Path,
                          fresh_lr_factor: float = FRESH_LR_FACTOR, freeze_backbone: bool = False) -> TrainConfig:
    """The optimisation of a finetune: the pretrained velocity weights keep ``base.lr``; the parts that
    start fresh (transporter, scale head) train at ``fresh_lr_factor * base.lr``."""
    if not (fresh_lr_factor > 0 and math.isfinite(fresh_lr_factor)):
        raise ConfigError(f"the fresh learning-rate factor must be a finite number > 0, got {fresh_lr_factor}")
    if aux_weight < 0 or not math.isfinite(aux_weight):
        raise ConfigError(f"--aux-weight must be a finite number >= 0, got {aux_weight}")
    ft = FinetuneConfig(teacher=str(Path(teacher).resolve()), aux_weight=aux_weight,
                        pretrained_lr_scale=0.0 if freeze_backbone else 1.0 / fresh_lr_factor)
    return replace(base, steps=steps, lr=base.lr * fresh_lr_factor, finetune=ft)


def read_fm_config(fm_run: str | Path) -> FMConfig:
    """The config of a flow-matching run (one clear error for anything else)."""
    meta = read_meta(resolve(fm_run))
    if meta["format"] != "ntm-fm":
        raise ConfigError(f"{fm_run} is not a flow-matching run (train one with `ntm train --model fm`)")
    return from_dict(FMConfig, meta["config"])


def finetune(fm_run: str | Path, source, out_dir: str | Path, steps: int | None = None, aux_weight: float = AUX_WEIGHT,
             preset: str | None = None, train_config: TrainConfig | None = None, progress: bool = True,
             velocity_scale: str = "x0", fresh_lr_factor: float = FRESH_LR_FACTOR,
             s0_std_floor: float | None = None, freeze_backbone: bool = False) -> dict:
    """Finetune an NTM from the FM run ``fm_run`` into ``out_dir`` (see the module doc).
    ``train_config`` (default: the preset's) gives the optimiser settings."""
    fm_cfg = read_fm_config(fm_run)
    cfg = finetune_config(fm_cfg, preset, velocity_scale, s0_std_floor)
    base = train_config or get_preset(preset or default_preset(cfg.data)).train
    tcfg = finetune_train_config(base, steps or base.steps, aux_weight, fm_run, fresh_lr_factor, freeze_backbone)
    return train(cfg, tcfg, source, out_dir, progress=progress)
