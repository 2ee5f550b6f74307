"""Few-step ancestral sampling in u-space (paper Algorithm 2).

    u_{t_T} ~ N(0, I)                                  (f_T is the identity at t = 1)
    for k = T .. 1:   u_{t_{k-1}} = mu_P + sigma_P * z,  (mu_P, sigma_P) = f_P(u_{t_k}, t_k, t_{k-1}, y)
    x_{t_0} = f_T^{-1}(u_{t_0}, t_0)                   (the only autoregressive decode)
    x_0 = x_{t_0} / (1 - t_0)

The sampler state is fp32. Guidance combines conditional and null-label predictions per step by the
Gaussian product rule. A noise scale gamma != 1 multiplies sigma_P on the noisy steps (k >= 2; the last
step keeps sigma_P): the samples then no longer follow the model's density.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .denoising import trajectory_score_denoise
from .trajectory import randn


@torch.no_grad()
def sample_u_trajectory(model, n: int, y: Tensor | None = None, guidance: float = 0.0, steps: int | None = None,
                        t_min: float | None = None, generator: torch.Generator | None = None,
                        noise_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Run the T predictor steps. Returns (u levels (n, T + 1, N, D) ascending in time, t (n, T + 1)).
    ``noise_scale`` gamma scales sigma_P on the steps k >= 2 (1: the model's own density)."""
    if not noise_scale >= 0:
        raise ValueError(f"the noise scale must be >= 0, got {noise_scale}")
    spec = model.spec
    t_min = model.config.trajectory.sample_t_min if t_min is None else t_min
    t = model.grid(n, t_min, T=steps)
    T = t.shape[1] - 1
    if model.multi_T and T not in model.train_Ts:
        raise ValueError(f"this model was trained for T in {list(model.train_Ts)}; got {T} steps")
    TT = model.steps_tensor(n, T)
    dev = t.device
    shape = (n, spec.num_tokens, spec.token_dim)
    u = randn(shape, generator, dev)
    levels = [u]
    for k in range(t.shape[1] - 1, 0, -1):
        mu, sigma = model.predict(u, t[:, k], t[:, k - 1], y, guidance, TT)
        scale = noise_scale if k >= 2 else 1.0
        u = mu + scale * sigma * randn(shape, generator, dev)
        levels.append(u)
    return torch.stack(levels[::-1], dim=1), t


DECODERS = ("auto", "inverse", "inverse+score", "denoiser")


@torch.no_grad()
def sample(model, n: int, y: Tensor | None = None, guidance: float = 0.0, steps: int | None = None,
           t_min: float | None = None, generator: torch.Generator | None = None, decode: str = "auto",
           inverse_method: str = "sequential", clip_percentile: float | None = None,
           noise_scale: float = 1.0) -> Tensor:
    """n raw samples (n, *shape). ``decode`` "auto": the distilled denoiser when the model has one
    (the best FID and the most images per second measured on MNIST), else one inverse."""
    if n < 1:
        raise ValueError("the number of samples must be at least 1")
    if decode not in DECODERS:
        raise ValueError(f"unknown decoder '{decode}' (use {', '.join(DECODERS)})")
    denoiser = getattr(model, "denoiser", None)
    if decode == "auto":
        decode = "denoiser" if denoiser is not None else "inverse"
    if decode == "denoiser" and denoiser is None:
        raise ValueError("this run has no distilled denoiser (run `ntm distill RUN_DIR` first)")
    y = model.check_labels(y)
    if y is not None and y.shape[0] != n:
        raise ValueError(f"got {y.shape[0]} labels for {n} samples")
    U, t = sample_u_trajectory(model, n, y, guidance, steps, t_min, generator, noise_scale)
    T = t.shape[1] - 1
    if decode == "denoiser":
        return model.from_tokens(denoiser.to(U.device)(U[:, 0], t[:, 0], y))
    if decode == "inverse":
        x_t0 = model.transporter.inverse(U[:, 0], t[:, 0], model.steps_tensor(n, T), method=inverse_method)
        return model.from_tokens(x_t0 / (1 - t[:, 0]).reshape(-1, 1, 1))
    shape = U.shape[2:]
    levels = model.transporter.inverse(U[:, :T].reshape((n * T,) + shape), t[:, :T].reshape(-1),
                                       model.steps_tensor(n * T, T), method=inverse_method)
    X = torch.cat([levels.reshape((n, T) + shape), U[:, T:]], dim=1)  # f_T is the identity at t = 1
    return model.from_tokens(trajectory_score_denoise(model, X, t, y, clip_percentile))
