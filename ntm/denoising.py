"""Cleaning the 4-step output: trajectory score denoising (paper Eq. 3.5, Algorithm 3) and the
self-distilled denoiser g_phi (§3.4).

Trajectory score denoising. A generated trajectory x = (x_{t_0}, ..., x_{t_T}) is (1 - t) x_0 plus
Markov Gaussian noise whose covariance across levels is S (``trajectory_covariance``). Multivariate
Tweedie then gives the posterior mean of the clean signal from the score of the trajectory density:

    E[(1 - t_i) x_0 | x] = x_i - sum_j S_ij dL/dx_j,      L = -sum_k log p(x_{t_{k-1}} | x_{t_k}, y),

where L is the *summed* (not per-dimension) trajectory NLL of the frozen NTM. The output is the t_0
component divided by (1 - t_0). The prior term log N(x_{t_T}) is left out of L: its gradient only
reaches level T, and S_0T = 0. Gradients may be clipped per sample at a percentile of their
magnitudes (the paper does not give one; default off).

The denoiser g_phi. A small non-causal transformer maps the predictor's cleanest u-space output
u_{t_0} (with t_0 and the label) straight to x_0, so sampling needs neither the autoregressive inverse
nor the backward pass. It is trained by MSE on targets computed by trajectory score denoising of
real-data trajectories (t_0 ~ U[t_min_low, t_min_high] as in training), and stored in the run folder
(``RUN_DIR/denoiser/``, a training run of its own, ``ntm.train.distill``), where ``from_pretrained`` finds it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .config import DataSpec, DenoiserConfig, from_dict
from .errors import CheckpointError
from .io import latest_checkpoint, load_into, read_meta
from .nn import ConditionedTransformer
from .trajectory import trajectory_covariance

FORMAT = "ntm-denoiser"


def trajectory_score_denoise(model, X: Tensor, t: Tensor, y: Tensor | None = None,
                             clip_percentile: float | None = None) -> Tensor:
    """x_0 estimate (B, N, D) from a standardised trajectory X (B, T + 1, N, D) at times t (B, T + 1).

    Differentiates the frozen model's summed trajectory NLL; ``clip_percentile`` in (0, 100] clamps
    each sample's gradient entries at that percentile of their absolute values.
    """
    X = X.detach().float().requires_grad_(True)
    with torch.enable_grad():
        nll = -model.trajectory_log_probs(X, t, y).sum()
        (grad,) = torch.autograd.grad(nll, X)
    if clip_percentile is not None:
        if not 0 < clip_percentile <= 100:
            raise ValueError(f"clip_percentile must lie in (0, 100], got {clip_percentile}")
        flat = grad.flatten(1)
        bound = torch.quantile(flat.abs(), clip_percentile / 100, dim=1).reshape(-1, *[1] * (grad.dim() - 1))
        grad = grad.clamp(-bound, bound)
    S0 = trajectory_covariance(t.float())[:, 0]  # (B, T + 1): Cov(x_{t_0}, x_{t_j} | x_0)
    # flow arithmetic in fp32: an element-wise product and sum (autocast would run an einsum in bf16)
    shift = (S0.reshape(*S0.shape, *[1] * (grad.dim() - 2)) * grad.float()).sum(1)
    return ((X[:, 0] - shift) / (1 - t[:, 0]).reshape(-1, 1, 1)).detach()


class Denoiser(ConditionedTransformer):
    """g_phi(u_{t_0}, t_0, y) -> x_0, tokens (B, N, D) -> (B, N, D) fp32 (standardised units)."""

    def __init__(self, cfg: DenoiserConfig, spec: DataSpec):
        super().__init__(cfg.width, cfg.layers, cfg.heads, spec.num_tokens, spec.token_dim, spec.token_dim,
                         spec.num_classes, two_times=False, text_dim=spec.text_dim, text_tokens=spec.text_tokens,
                         text_attention=spec.text_attention)
        self.cfg = cfg

    def forward(self, u0: Tensor, t0: Tensor, y: Tensor | None = None) -> Tensor:
        # residual around the identity read-out u / (1 - t): exact for an identity transporter at init
        return u0.float() / (1 - t0.float()).reshape(-1, 1, 1) + self.backbone(u0.float(), t0, None, y)


def denoiser_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its distilled denoiser (a run folder of its own)."""
    return Path(run_dir) / "denoiser"


def load_denoiser(run_dir: str | Path, spec: DataSpec, step: int | None = None) -> Denoiser | None:
    """The finished denoiser of an NTM run folder, or None when there is none, when its distillation
    is unfinished, or when it was distilled from another NTM checkpoint than ``step``."""
    folder = denoiser_dir(run_dir)
    if not folder.is_dir():
        return None
    ckpt = latest_checkpoint(folder)
    if ckpt is None:
        return None
    meta = read_meta(ckpt, (FORMAT,))
    try:
        finished = meta["step"] >= meta["train"]["steps"]
        if not finished or (step is not None and meta.get("ntm_step") != step):
            return None
        den = Denoiser(from_dict(DenoiserConfig, meta["config"]), spec)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt}: unreadable denoiser ({exc})") from None
    load_into(den, ckpt / "model.safetensors")
    return den.eval()
