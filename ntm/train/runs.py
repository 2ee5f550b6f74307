"""Training a generator from a config: ``train`` builds the model and its objective and runs the fit
loop; it also resumes a run from the configs stored in its last checkpoint."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import FMConfig, NTMConfig, TrainConfig, from_dict, to_dict, validate_model_config, validate_train_config
from ..data import TOY_NAMES
from ..errors import CheckpointError, ConfigError
from ..flow_matching import FlowMatching
from ..hub import MODEL_CLASSES, build_model, load_model
from ..model import NTM
from .checkpoint import load_run
from .loop import Distributed, fit
from .objectives import FinetuneObjective, FlowMatchingObjective, NTMObjective


def check_same_data(saved, now) -> None:
    """Refuse to resume (or finetune) on different data (name, layout or standardisation)."""
    same = (saved.name == now.name and saved.kind == now.kind and tuple(saved.shape) == tuple(now.shape)
            and saved.num_classes == now.num_classes and saved.text_encoder == now.text_encoder)
    if same and now.name not in TOY_NAMES:  # a user's file: its statistics identify it (toys: the name does)
        same = all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(saved.mean + saved.std, now.mean + now.std))
    if not same:
        raise ConfigError(f"the run was trained on '{saved.name}' {tuple(saved.shape)}; the data given are "
                          f"'{now.name}' {tuple(now.shape)} with other statistics or labels")


def load_teacher(path: str | Path, device: torch.device | None = None) -> FlowMatching:
    """The frozen flow-matching teacher of a finetune run."""
    fm = load_model(path, map_location=device)
    if not isinstance(fm, FlowMatching):
        raise ConfigError(f"{path} is not a flow-matching run (train one with `ntm train --model fm`)")
    for p in fm.parameters():
        p.requires_grad_(False)
    return fm.eval()


def initial_weights(ntm_model: NTM, fm_model: FlowMatching) -> dict[str, torch.Tensor]:
    """The NTM's state dict with its velocity network copied from the FM model (everything else as
    initialised: identity transporter, zero delta_sigma head)."""
    state = {k: v.clone() for k, v in ntm_model.state_dict().items()}
    for k, v in fm_model.velocity.state_dict().items():
        state[f"predictor.velocity.{k}"] = v.clone()
    return state


def make_objective(model: NTM | FlowMatching, cfg: TrainConfig, device: torch.device, start: bool = False):
    """The objective a training config names for ``model``; a finetune loads its teacher (and, with
    ``start``, copies the teacher's weights into the model first)."""
    if isinstance(model, FlowMatching):
        return FlowMatchingObjective(model, cfg.class_dropout)
    ft = cfg.finetune
    if ft is None:
        return NTMObjective.from_config(model, cfg)
    teacher = load_teacher(ft.teacher, device)
    if start:
        model.load_state_dict(initial_weights(model, teacher))
    if ft.pretrained_lr_scale == 0:  # frozen backbone: no gradients, so clipping sees only the trained parts
        model.predictor.velocity.requires_grad_(False)
    return FinetuneObjective(model, teacher, ft.aux_weight, cfg.mode, cfg.class_dropout, objective=cfg.objective,
                             stratified=cfg.stratified, step_weights=cfg.step_weights,
                             hybrid_weight=cfg.hybrid_weight, hybrid_schedule=cfg.hybrid_schedule,
                             T_weights=cfg.T_weights)


def train(model_config: NTMConfig | FMConfig | None, train_config: TrainConfig | None, source,
          out_dir: str | Path, resume: bool = False, progress: bool = True,
          device: torch.device | str | None = None, batch_hook=None) -> dict:
    """Train an NTM or the FM baseline into the run folder ``out_dir``; returns a summary dict.

    With ``resume`` the configs stored in the run's last checkpoint are used (a ``train_config``
    passed here may only repeat the same number of steps) and training continues exactly where the
    checkpoint left off. A config with ``finetune`` set starts a new run from the teacher's weights.
    """
    out_dir = Path(out_dir)
    if resume:
        ckpt, meta, cfg = load_run(out_dir, tuple(MODEL_CLASSES))
        try:
            model_config = from_dict(MODEL_CLASSES[meta["format"]].CONFIG, meta["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{ckpt}: invalid model config ({exc})") from None
        if train_config is not None and train_config.steps != cfg.steps:
            raise ConfigError(f"this run was configured for {cfg.steps} steps; resume continues to that "
                              f"(start a new run to train for {train_config.steps})")
        check_same_data(model_config.data, source.spec())
    else:
        if model_config is None or train_config is None:
            raise ConfigError("a new run needs a model and a training config")
        cfg = train_config
    validate_train_config(cfg)
    try:
        validate_model_config(model_config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if isinstance(model_config, FMConfig) and cfg.finetune is not None:
        raise ConfigError("a flow-matching model cannot be finetuned from a teacher")
    with Distributed(device) as ctx:
        torch.manual_seed(cfg.seed)
        model = build_model(model_config).to(ctx.device)
        if model.spec.is_text and not resume:  # the null prompt: the encoder's encoding of ""
            model.set_null_prompt(source.null_prompt())
        objective = make_objective(model, cfg, ctx.device, start=not resume).to(ctx.device)
        return fit(objective, cfg, source, out_dir, fmt=type(model).FORMAT, config=to_dict(model_config),
                   resume=resume, ctx=ctx, progress=progress, batch_hook=batch_hook)
