"""Start NTM from a pretrained flow-matching model (paper §3.3, App. A.3, A.5; digest §8).

The predictor becomes the FM velocity network read in u-space (``VelocityPredictor``):

    x0_hat = u_t - t v(u_t, t, y)                 (v = eps - x_0; ``VelocityAdapter`` converts other conventions)
    mu_P   = A(t, s) u_t + B(t, s) x0_hat           (no mean correction: the paper's no_delta_mean)

and the transporter starts at its identity initialisation. C(t, s) -> 0 as s -> 0 (the Gaussian
posterior becomes a point mass and its NLL diverges; training draws t_0 ~ U[0, 0.05], so s is often
tiny), so the paper's sigma_P = C exp(delta_sigma) needs a choice there. Two scales are built
(``PredictorConfig.velocity_scale``), with tau_0 = ``s0_std_floor`` (0.01 in standardised units, about
1.3 grey levels of an 8-bit image in [-1, 1]) and a zero-initialised head delta:

* "x0" (default): sigma_P^2 = C^2 + B^2 tau^2, tau = tau_0 exp(delta(h)). This is the variance of
  q(x_s | x_t, x_0) with x_0 ~ N(x0_hat, tau^2): delta is a per-token uncertainty of x0_hat that
  does not depend on s, and the s-dependence comes from C and B in closed form. At step 0 the mean is
  the FM posterior mean exactly and the scale is C widened by B tau_0.
* "floor": sigma_P = max(C, tau_0) exp(delta(h, s)). At step 0 the NTM *is* the FM model's Gaussian
  posterior sampler on every step with C >= tau_0 (every step of the sampling grid, t_0 = 0.02). But
  log sigma_P is then a sum of a token term and an s term, which cannot follow the optimum
  sqrt(C^2 + B^2 tau^2) for both near-certain (background) and uncertain (stroke) pixels as s -> 0;
  on MNIST it is worse on bits/dim and FID (``ntm bench finetune --ablation``).

The head reads the backbone's last features when the velocity network is the project's own
``VelocityField``; for any other velocity module it is a zero-initialised map of the t (and, for
"floor", s) embedding to one value per token channel.

Training adds the mean-alignment loss against a frozen copy of the teacher working in x-space,

    L_aux = lambda(p) sum_k || mu_P^(k) - mu_FM^(k) ||^2 / dim,   mu_FM = A x_t + B (x_t - t v_frozen(x_t, t, y)),

with lambda(p) = lambda_0 (1 + cos(pi p)) / 2 over training progress p in [0, 1] (lambda_0 = 2.5).
The pretrained velocity weights train at the preset's learning rate and the parts that start fresh
(transporter, scale head) at ``FRESH_LR_FACTOR`` (4) times that.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import PRESETS, ModelConfig, TrainConfig
from .nn import ConditionedTransformer, TimeEmbedding, soft_clip
from .predictor import _col
from .trajectory import posterior_coefficients


class VelocityAdapter(nn.Module):
    """Wrap any velocity model ``fn(x_t, t, y) -> v`` for use as an NTM predictor backbone.

    ``fn`` sees the model's tokens reshaped to the data layout: images (B, C, H, W), vectors (B, d), in
    the NTM's standardised units (images are not standardised, so they stay in [-1, 1]), and must
    follow x_t = (1 - t) x_0 + t eps. ``sign`` +1: fn returns eps - x_0; -1: fn returns x_0 - eps
    (the adapter flips it). Returns v = eps - x_0 as tokens (B, N, D).
    """

    def __init__(self, fn, spec, sign: float = 1.0):
        super().__init__()
        if sign not in (1.0, -1.0):
            raise ValueError("sign must be +1 (v = eps - x_0) or -1 (v = x_0 - eps)")
        self.fn = fn
        self.spec = spec
        self.sign = sign

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        from .images import patchify, unpatchify
        spec = self.spec
        if spec.kind == "image":
            v = self.fn(unpatchify(x_t, tuple(spec.shape), spec.patch), t, y)
            return self.sign * patchify(v.float(), spec.patch)
        return self.sign * self.fn(x_t[..., 0], t, y).float()[..., None]


class VelocityPredictor(nn.Module):
    """f_P built on a velocity network v = eps - x_0 (see module doc). Same interface as ``Predictor``."""

    def __init__(self, velocity: nn.Module, num_tokens: int, token_dim: int, s0_std_floor: float = 0.01,
                 log_var_clip: float = 8.0, width: int = 64, scale: str = "x0"):
        super().__init__()
        if scale not in ("floor", "x0"):
            raise ValueError(f"unknown velocity scale '{scale}' (use 'floor' or 'x0')")
        self.velocity = velocity
        self.floor = s0_std_floor
        self.scale = scale
        self.clip = log_var_clip
        self.token_dim = token_dim
        if isinstance(velocity, ConditionedTransformer):
            width = velocity.proj_out.in_features
            self.sigma_head = nn.Linear(width, token_dim)
            self.time_mlp = None
        else:
            self.sigma_head = nn.Linear(width, num_tokens * token_dim)
            self.time_mlp = TimeEmbedding(width)
        # the backbone itself only sees t; the "floor" scale also needs s
        self.time_s = TimeEmbedding(width) if scale == "floor" else None
        nn.init.zeros_(self.sigma_head.weight)
        nn.init.zeros_(self.sigma_head.bias)

    def velocity_and_log_scale(self, u_t: Tensor, t: Tensor, s: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """(v = eps - x_0, delta), each (B, N, D) fp32. In "x0" mode delta does not depend on s (the
        uncertainty of x0_hat is a property of x_t alone)."""
        if self.time_mlp is None:  # the head reads the backbone's features (B, N, W)
            h = self.velocity.hidden(u_t, t, None, y)
            v = self.velocity.proj_out(h).float()
            feats = h
        else:  # the head reads a time embedding (B, W)
            v = self.velocity(u_t, t, y).float()
            feats = self.time_mlp(t)
        if self.time_s is not None:  # "floor": the head also sees s
            s_emb = self.time_s(s)
            feats = feats + (s_emb[:, None] if feats.dim() == 3 else s_emb).to(feats.dtype)
        delta = self.sigma_head(feats).float().reshape(u_t.shape)
        return v, soft_clip(delta, self.clip)

    def forward(self, u_t: Tensor, t: Tensor, s: Tensor, y: Tensor | None = None,
                T: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """u_t: (B, N, D); t, s: (B,) -> (mu_P, sigma_P), each (B, N, D) fp32."""
        u_t = u_t.float()
        v, delta = self.velocity_and_log_scale(u_t, t, s, y)
        A, B, C = (_col(c) for c in posterior_coefficients(t.float(), s.float()))
        x0_hat = u_t - _col(t) * v
        mu = A * u_t + B * x0_hat
        if self.scale == "x0":  # q(x_s | x_t) with x_0 ~ N(x0_hat, tau^2): variance C^2 + B^2 tau^2
            tau = self.floor * torch.exp(delta)
            return mu, torch.sqrt(C.square() + (B * tau).square())
        return mu, C.clamp_min(self.floor) * torch.exp(delta)


def posterior_mean_from_velocity(v: Tensor, x_t: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """mu = A x_t + B (x_t - t v): the mean of q(x_s | x_t, x0_hat) for a velocity v = eps - x_0."""
    A, B, _ = (_col(c) for c in posterior_coefficients(t.float(), s.float()))
    return A * x_t + B * (x_t - _col(t) * v)


def aux_weight_at(progress: float, weight: float) -> float:
    """Cosine decay of the mean-alignment weight: weight (1 + cos(pi p)) / 2, p in [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    return weight * 0.5 * (1.0 + math.cos(math.pi * p))


FRESH_LR_FACTOR = 4.0  # learning rate of the fresh parts (transporter, scale head) over the pretrained weights


def finetune_config(fm_config: ModelConfig, preset: str | None = None, velocity_scale: str = "x0",
                    s0_std_floor: float | None = None) -> ModelConfig:
    """The NTM config that starts from an FM run's config: same backbone, a velocity predictor and the
    preset's transporter (default: ``mnist`` for images, ``toy`` for vectors)."""
    name = preset or ("mnist" if fm_config.data.kind == "image" else "toy")
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'")
    return replace(fm_config, kind="ntm", transporter=PRESETS[name].transporter,
                   predictor=replace(fm_config.predictor, kind="velocity", velocity_scale=velocity_scale,
                                     s0_std_floor=s0_std_floor or fm_config.predictor.s0_std_floor))


def initial_weights(ntm_model: nn.Module, fm_model: nn.Module) -> dict[str, Tensor]:
    """The NTM's state dict with its velocity network copied from the FM model (everything else as
    initialised: identity transporter, zero delta_sigma head)."""
    state = {k: v.clone() for k, v in ntm_model.state_dict().items()}
    for k, v in fm_model.velocity.state_dict().items():
        state[f"predictor.velocity.{k}"] = v.clone()
    return state


def load_teacher(path: str | Path, device: torch.device | None = None):
    """The frozen FM teacher of a finetune run."""
    from .checkpoint import load_model
    from .errors import ConfigError
    from .flow_matching import FlowMatching

    fm = load_model(path, map_location=device)
    if not isinstance(fm, FlowMatching):
        raise ConfigError(f"{path} is not a flow-matching run (train one with `ntm train --model fm`)")
    for p in fm.parameters():
        p.requires_grad_(False)
    return fm.eval()


def finetune_train_config(base: TrainConfig, steps: int, aux_weight: float, teacher: str | Path,
                          fresh_lr_factor: float = FRESH_LR_FACTOR) -> TrainConfig:
    """The optimisation of a finetune: the pretrained velocity weights keep ``base.lr``; the parts that
    start fresh (transporter, scale head) train at ``fresh_lr_factor * base.lr``."""
    if not (fresh_lr_factor > 0 and math.isfinite(fresh_lr_factor)):
        raise ValueError(f"the fresh learning-rate factor must be a finite number > 0, got {fresh_lr_factor}")
    return replace(base, steps=steps, aux_weight=aux_weight, teacher=str(Path(teacher).resolve()),
                   lr=base.lr * fresh_lr_factor, pretrained_lr_scale=1.0 / fresh_lr_factor)


def finetune(fm_run: str | Path, source, out_dir: str | Path, steps: int | None = None, aux_weight: float = 2.5,
             preset: str | None = None, train: TrainConfig | None = None, progress: bool = True,
             velocity_scale: str = "x0", fresh_lr_factor: float = FRESH_LR_FACTOR,
             s0_std_floor: float | None = None, freeze_backbone: bool = False) -> dict:
    """Finetune an NTM from the FM run ``fm_run`` into ``out_dir`` (see module doc). ``train`` (default:
    the preset's) gives the optimiser settings; see :func:`finetune_train_config` for the learning rates.
    ``freeze_backbone`` keeps the pretrained velocity weights fixed (better samples, worse likelihood
    on MNIST; README)."""
    from .checkpoint import read_meta, resolve
    from .config import model_config_from_dict
    from .errors import ConfigError
    from .training import train as run_training

    if aux_weight < 0 or not math.isfinite(aux_weight):
        raise ConfigError(f"--aux-weight must be a finite number >= 0, got {aux_weight}")
    fm_cfg = model_config_from_dict(read_meta(resolve(fm_run))["model"])
    if fm_cfg.kind != "fm":
        raise ConfigError(f"{fm_run} is not a flow-matching run (train one with `ntm train --model fm`)")
    cfg = finetune_config(fm_cfg, preset, velocity_scale, s0_std_floor)
    name = preset or ("mnist" if cfg.data.kind == "image" else "toy")
    base = train or PRESETS[name].train
    tcfg = finetune_train_config(base, steps or base.steps, aux_weight, fm_run, fresh_lr_factor)
    if freeze_backbone:  # only the transporter and the scale head train
        tcfg = replace(tcfg, pretrained_lr_scale=0.0)
    return run_training(cfg, tcfg, source, out_dir, progress=progress, init_from_teacher=True)
