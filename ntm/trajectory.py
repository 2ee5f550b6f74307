"""The Markov forward trajectory and its Gaussian algebra (paper §2.2, App. A.4, A.6, C.4).

Notation: t = 0 is clean data, t = 1 is pure noise. A trajectory lives on an ascending grid
``t_0 = t_min < t_1 < ... < t_T = 1``; a reverse step is p(x_s | x_t) with s < t consecutive.

Marginals are q(x_t | x_0) = N((1 - t) x_0, t^2 I) and consecutive levels are linked by the Markov
transition x_t = alpha(s, t) x_s + sigma(s, t) eps (Proposition 1). All arithmetic here is fp32.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


def shift_for_length(num_tokens: int) -> float:
    """Resolution-dependent time shift mu = 0.5 + 0.65 (L - 256) / 3840 (paper App. C.4)."""
    return 0.5 + 0.65 * (num_tokens - 256) / (4096 - 256)


def shift_time(u: Tensor, shift: float) -> Tensor:
    """The time warp t = e^mu / (e^mu + 1 / u - 1) of App. C.4, elementwise on u in [0, 1] (0 -> 0, 1 -> 1)."""
    em = math.exp(shift)
    return em * u / (em * u + 1.0 - u)


def shifted_levels(T: int, shift: float) -> Tensor:
    """(t_1, ..., t_T = 1): the base grid k / T warped by t = e^mu / (e^mu + 1 / t_base - 1). (T,)"""
    if T < 1:
        raise ValueError("the number of steps T must be at least 1")
    base = torch.arange(1, T + 1, dtype=torch.float64) / T
    upper = shift_time(base, shift)
    upper[-1] = 1.0
    return upper.float()


@functools.lru_cache(maxsize=64)
def first_level(T: int, shift: float) -> float:
    """t_1 of the shifted grid: every t_min must lie below it."""
    return float(shifted_levels(T, shift)[0])


def time_grid(T: int, t_min: Tensor | float, shift: float, batch: int | None = None) -> Tensor:
    """Ascending trajectory times (t_min, t_1, ..., t_T = 1).

    ``t_min`` is a float or a per-sample tensor of shape (B,), each in [0, t_1). Returns (B, T + 1),
    or (T + 1,) when ``t_min`` is a float and ``batch`` is None.
    """
    upper = shifted_levels(T, shift)
    t1 = float(upper[0]) if T > 1 else 1.0
    lo, hi = (float(t_min.min()), float(t_min.max())) if isinstance(t_min, Tensor) else (float(t_min), float(t_min))
    if not (lo >= 0.0 and hi < t1):
        raise ValueError(f"t_min must lie in [0, t_1) = [0, {t1:.4g}) for T = {T}; got {hi if hi >= t1 else lo:.4g}")
    if isinstance(t_min, Tensor):
        t_min = t_min.to(torch.float32).reshape(-1, 1)
        upper = upper.to(t_min.device).expand(t_min.shape[0], T)
        return torch.cat([t_min, upper], dim=1)
    grid = torch.cat([torch.tensor([float(t_min)]), upper])
    if batch is not None:
        grid = grid.expand(batch, T + 1).clone()
    return grid


def markov_coefficients(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """alpha, sigma of the transition x_t = alpha x_s + sigma eps (Eq. 2.3), for s < t."""
    alpha = (1 - t) / (1 - s)
    var = t**2 - alpha**2 * s**2
    return alpha, var.clamp_min(0).sqrt()


def posterior_coefficients(t: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A, B, C of the Gaussian reverse posterior q(x_s | x_t, x_0) = N(A x_t + B x_0, C^2 I).

    Eqs. A.10-A.12: A = s^2 (1-t) / (t^2 (1-s)), B = (t-s)(t+s-2ts) / (t^2 (1-s)),
    C^2 = s^2 (t-s)(t+s-2ts) / (t^2 (1-s)^2). Valid for 0 <= s < t <= 1.
    """
    d = (t - s) * (t + s - 2 * t * s)
    A = s**2 * (1 - t) / (t**2 * (1 - s))
    B = d / (t**2 * (1 - s))
    C = (s**2 * d).clamp_min(0).sqrt() / (t * (1 - s))
    return A, B, C


def trajectory_covariance(t: Tensor) -> Tensor:
    """S_ij = Cov(x_{t_i}, x_{t_j} | x_0) per dimension = min^2 (1 - max) / (1 - min) (Prop. 3).

    ``t``: (..., K) ascending with t < 1 except possibly the last entry (= 1). Returns (..., K, K).
    Rows and columns of a t = 1 level are zero except S_KK = 1.
    """
    ti = t.unsqueeze(-1)
    tj = t.unsqueeze(-2)
    lo = torch.minimum(ti, tj)
    hi = torch.maximum(ti, tj)
    one_minus_lo = 1 - lo
    S = lo**2 * (1 - hi) / torch.where(one_minus_lo > 0, one_minus_lo, torch.ones_like(lo))
    at_one = (lo >= 1)
    return torch.where(at_one, torch.ones_like(S), S)


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal noise drawn on the generator's own device, then moved to ``device``.

    So a CPU ``torch.Generator`` gives the same numbers whether the model runs on CPU or CUDA.
    """
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) noise drawn on the generator's device, then moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample values (B,) to broadcast against (B, ...)."""
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))


def forward_trajectory(x0: Tensor, t: Tensor, generator: torch.Generator | None = None,
                       noise: Tensor | None = None) -> Tensor:
    """Sample the Markov trajectory (x_{t_0}, ..., x_{t_T}) given clean data (Algorithm 1, lines 1-5).

    x0: (B, N, D); t: (B, T + 1) ascending; ``noise`` (B, T + 1, N, D) standard normal, drawn from
    ``generator`` when not given. Returns (B, T + 1, N, D) in fp32, with
    x_{t_0} = (1 - t_0) x0 + t_0 eps_0 and x_{t_{k+1}} = alpha x_{t_k} + sigma eps_{k+1}.
    """
    x0 = x0.float()
    B, K = t.shape
    if noise is None:
        noise = randn((B, K) + x0.shape[1:], generator, x0.device)
    levels = [_marginal_level(x0, t[:, 0], noise[:, 0])]
    for k in range(K - 1):
        levels.append(_markov_step(levels[-1], t[:, k], t[:, k + 1], noise[:, k + 1]))
    return torch.stack(levels, dim=1)


def _marginal_level(x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps, a draw of q(x_t | x_0); t (B,), x0 and eps (B, N, D)."""
    return _bcast(1 - t, x0) * x0 + _bcast(t, x0) * eps


def _markov_step(x_s: Tensor, s: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x_t = alpha(s, t) x_s + sigma(s, t) eps, a draw of the transition q(x_t | x_s); s, t (B,)."""
    alpha, sigma = markov_coefficients(s, t)
    return _bcast(alpha, x_s) * x_s + _bcast(sigma, x_s) * eps


def forward_pair(x0: Tensor, s: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Two consecutive levels (x_s, x_t) of a Markov trajectory, without the others.

    x0: (B, N, D); s < t: (B,); ``noise`` (B, 2, N, D) standard normal. x_s = (1 - s) x0 + s eps_0 and
    x_t = alpha(s, t) x_s + sigma(s, t) eps_1: the same joint law as levels k - 1, k of
    :func:`forward_trajectory` (the chain is Markov), at the cost of two levels. fp32.
    """
    x_s = _marginal_level(x0.float(), s, noise[:, 0])
    return x_s, _markov_step(x_s, s, t, noise[:, 1])


def transition_log_prob(x_s: Tensor, x_t: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """log q(x_t | x_s) of the forward Markov transition, summed over all but the batch dim. (B,)"""
    alpha, sigma = markov_coefficients(s, t)
    mean = _bcast(alpha, x_s) * x_s
    sig = _bcast(sigma, x_s)
    z = (x_t - mean) / sig
    per = -0.5 * z**2 - torch.log(sig) - 0.5 * math.log(2 * math.pi)
    return per.flatten(1).sum(1)
