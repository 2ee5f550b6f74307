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
(``RUN_DIR/denoiser/``), where ``from_pretrained`` finds it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from .errors import CheckpointError, ConfigError
from .nn import ConditionedTransformer
from .trajectory import forward_trajectory, rand, trajectory_covariance

DENOISER_FORMAT = "ntm-denoiser"


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
    shift = torch.einsum("bk,bk...->b...", S0, grad)
    return ((X[:, 0] - shift) / (1 - t[:, 0]).reshape(-1, 1, 1)).detach()


@dataclass(frozen=True)
class DenoiserConfig:
    layers: int = 2
    width: int = 64
    heads: int = 4


class Denoiser(ConditionedTransformer):
    """g_phi(u_{t_0}, t_0, y) -> x_0, tokens (B, N, D) -> (B, N, D) fp32 (standardised units)."""

    def __init__(self, cfg: DenoiserConfig, num_tokens: int, token_dim: int, num_classes: int = 0):
        super().__init__(cfg.width, cfg.layers, cfg.heads, num_tokens, token_dim, token_dim, num_classes,
                         two_times=False)
        self.cfg = cfg

    def forward(self, u0: Tensor, t0: Tensor, y: Tensor | None = None) -> Tensor:
        # residual around the identity read-out u / (1 - t): exact for an identity transporter at init
        return u0.float() / (1 - t0.float()).reshape(-1, 1, 1) + self.backbone(u0.float(), t0, None, y)


def denoiser_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "denoiser"


def load_denoiser(run_dir: str | Path, model, step: int | None = None) -> Denoiser | None:
    """The finished denoiser stored in a run folder, or None when there is none, when its
    distillation is unfinished, or when it was distilled from another checkpoint than ``step``."""
    folder = denoiser_dir(run_dir)
    if not (folder / "config.json").is_file():
        return None
    try:
        meta = json.loads((folder / "config.json").read_text())
        if meta.get("format") != DENOISER_FORMAT:
            raise ValueError("not a denoiser config")
        if not meta.get("finished") or (step is not None and meta.get("ntm_step") != step):
            return None
        den = Denoiser(DenoiserConfig(**meta["config"]), model.spec.num_tokens, model.spec.token_dim,
                       model.spec.num_classes)
        den.load_state_dict(load_file(str(folder / "model.safetensors")))
    except Exception as exc:  # a corrupt or foreign file fails in many ways
        raise CheckpointError(f"{folder}: unreadable denoiser ({str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__})") from None
    return den.eval()


def _save_denoiser(folder: Path, den: Denoiser, meta: dict, state: dict | None) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in den.state_dict().items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    if state is not None:
        torch.save(state, tmp / "state.pt")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def distill(run_dir: str | Path, source, steps: int = 2000, batch_size: int = 64, lr: float = 5e-4,
            cfg: DenoiserConfig = DenoiserConfig(), seed: int = 0, checkpoint_every: int = 250,
            progress: bool = True, clip_percentile: float | None = None) -> dict:
    """Train g_phi for the NTM in ``run_dir`` and store it in ``run_dir/denoiser``.

    Resumable: an unfinished distillation (``state.pt`` present) continues from its last checkpoint.
    Returns a summary with the MSE at the start and the end.
    """
    from .checkpoint import load_model
    from .data import to_tokens
    from .model import NTM
    from .training import _StopFlag

    from .checkpoint import read_meta, resolve

    model = load_model(run_dir)
    ntm_step = read_meta(resolve(run_dir)).get("step")
    if not isinstance(model, NTM):
        raise ConfigError(f"{run_dir} is not an NTM run; only NTMs have a denoiser to distil")
    for p in model.parameters():
        p.requires_grad_(False)
    spec = model.spec
    folder = denoiser_dir(run_dir)
    den = Denoiser(cfg, spec.num_tokens, spec.token_dim, spec.num_classes)
    opt = torch.optim.AdamW(den.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.01)
    g = torch.Generator().manual_seed(seed)
    step, losses, elapsed = 0, [], 0.0
    state_file = folder / "state.pt"
    if state_file.is_file():
        try:
            st = torch.load(state_file, map_location="cpu", weights_only=True)
            settings = {"batch_size": batch_size, "lr": lr, "seed": seed, "clip_percentile": clip_percentile,
                        "ntm_step": ntm_step}
            if st["steps"] != steps or st["config"] != asdict(cfg) or st.get("settings") != settings:
                raise ConfigError(f"{folder} holds a distillation with other settings; move it away to start afresh")
            den.load_state_dict(load_file(str(folder / "model.safetensors")))
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            g.set_state(st["rng"])
            step, losses, elapsed = st["step"], st["losses"], st["elapsed"]
        except ConfigError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{state_file}: cannot resume ({exc.__class__.__name__})") from None
    elif (folder / "config.json").is_file():
        raise ConfigError(f"{folder} already holds a finished denoiser; move it away to distil again")
    tc = model.config.trajectory

    def save(final: bool) -> None:
        meta = {"format": DENOISER_FORMAT, "config": asdict(cfg), "steps": step, "batch_size": batch_size,
                "lr": lr, "finished": final, "ntm_step": ntm_step, "first_loss": losses[0] if losses else None,
                "final_loss": sum(losses[-25:]) / max(1, len(losses[-25:])) if losses else None,
                "seconds": elapsed}
        state = None if final else {"steps": steps, "config": asdict(cfg), "optimizer": opt.state_dict(),
                                    "settings": {"batch_size": batch_size, "lr": lr, "seed": seed,
                                                 "clip_percentile": clip_percentile, "ntm_step": ntm_step},
                                    "scheduler": sched.state_dict(), "rng": g.get_state(), "step": step,
                                    "losses": losses, "elapsed": elapsed}
        _save_denoiser(folder, den, meta, state)

    if step == 0:
        save(False)
    t_start = time.perf_counter() - elapsed
    bar = tqdm(total=steps, initial=step, desc="distil", disable=not progress, dynamic_ncols=True)
    with _StopFlag() as stop:
        while step < steps:
            x, y = source.sample(batch_size, g)
            x0 = to_tokens(x, spec)
            y = None if spec.num_classes == 0 or y is None else y
            t_min = tc.t_min_low + (model.t_min_high(tc.T) - tc.t_min_low) * rand((batch_size,), g, x0.device)
            t = model.grid(batch_size, t_min)
            X = forward_trajectory(x0, t, generator=g)
            target = trajectory_score_denoise(model, X, t, y, clip_percentile)
            with torch.no_grad():
                u0, _ = model.transporter(X[:, 0], t[:, 0], model.steps_tensor(batch_size, tc.T))
            loss = ((den(u0, t[:, 0], y) - target) ** 2).flatten(1).sum(1).mean() / spec.dim
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(den.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            elapsed = time.perf_counter() - t_start
            bar.update(1)
            bar.set_postfix(mse=f"{losses[-1]:.4g}")
            if stop.requested:
                break
            if step % checkpoint_every == 0 and step < steps:
                save(False)
    bar.close()
    save(step >= steps)
    return {"steps": step, "stopped": step < steps, "first_loss": losses[0] if losses else math.nan,
            "final_loss": sum(losses[-25:]) / max(1, len(losses[-25:])) if losses else math.nan,
            "seconds": elapsed}
