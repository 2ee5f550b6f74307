"""The predictor f_P: a diagonal Gaussian N(mu_P, sigma_P^2) over u_s given u_t, (t, s) and a label.

Parameterisation (our choice; the paper only says "a linear projection"). The network output F
(zero-initialised) is read as a correction to the exact reverse kernel of unit-Gaussian data,
written with the posterior coefficients A, B, C of q(x_s | x_t, x_0):

    x0_hat  = c_skip(t) u_t + sqrt(v(t)) F_mu,          c_skip = (1 - t) / ((1 - t)^2 + t^2)
    mu_P    = A u_t + B x0_hat                            v      = t^2 / ((1 - t)^2 + t^2)
    sigma_P^2 = C^2 + B^2 v(t) exp(2 delta),              delta  = clip * tanh(F_sigma / clip)

So a new predictor is the exact reverse step for standardised Gaussian data, sigma_P stays positive
at s = 0 where C = 0 (sigma_P = C e^delta is singular there), and the variance can shrink to C^2
(the posterior given x_0 exactly) but not below. ``Predictor`` is Markov: it sees one level.

The module also holds two closed-form predictors with the same interface, used as references:
``GaussianDataPosterior`` (exact reverse kernel for Gaussian data) and ``EmpiricalPosterior`` (the
Gaussian ceiling: exact posterior moments of x_0 from a reference sample).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import PredictorConfig
from .nn import ConditionedTransformer, soft_clip
from .trajectory import posterior_coefficients


def _col(v: Tensor) -> Tensor:
    return v.float().reshape(-1, 1, 1)


def gaussian_step(u_t: Tensor, t: Tensor, s: Tensor, x0_mean: Tensor, x0_var: Tensor) -> tuple[Tensor, Tensor]:
    """(mu, sigma) of the reverse step when x_0 | x_t has mean/variance (x0_mean, x0_var), (B, N, D)."""
    A, B, C = (_col(c) for c in posterior_coefficients(t.float(), s.float()))
    mu = A * u_t + B * x0_mean
    return mu, torch.sqrt(C**2 + B**2 * x0_var)


class Predictor(ConditionedTransformer):
    """f_P(u_t, t, s, y) -> (mu_P, sigma_P), each (B, N, D) fp32. Label ``num_classes`` is the null label."""

    def __init__(self, cfg: PredictorConfig, num_tokens: int, token_dim: int, num_classes: int = 0,
                 multi_T: bool = False):
        super().__init__(cfg.width, cfg.layers, cfg.heads, num_tokens, token_dim, 2 * token_dim, num_classes,
                         two_times=True, multi_T=multi_T)
        self.clip = cfg.log_var_clip

    def forward(self, u_t: Tensor, t: Tensor, s: Tensor, y: Tensor | None = None,
                T: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """u_t: (B, N, D); t, s: (B,); y: (B,) int labels or None (null); T: (B,) trajectory length
        (multi-T models only) -> (mu, sigma), each (B, N, D)."""
        u_t = u_t.float()
        f_mu, f_sigma = self.backbone(u_t, t, s, y, T).split(self.token_dim, dim=-1)
        tt = _col(t)
        denom = (1 - tt) ** 2 + tt**2
        v = tt**2 / denom
        x0_mean = (1 - tt) / denom * u_t + torch.sqrt(v) * f_mu
        x0_var = v * torch.exp(2 * soft_clip(f_sigma, self.clip))
        return gaussian_step(u_t, t, s, x0_mean, x0_var)


class GaussianDataPosterior(nn.Module):
    """The exact reverse kernel when x_0 ~ N(m, diag(v)) (tokens (N, D) of mean m and variance v)."""

    def __init__(self, mean: Tensor, var: Tensor):
        super().__init__()
        self.register_buffer("m", mean.float())
        self.register_buffer("v", var.float())

    def forward(self, x_t: Tensor, t: Tensor, s: Tensor, y: Tensor | None = None, T: Tensor | None = None):
        tt = _col(t)
        a = 1 - tt
        # x_t = a x_0 + t eps  =>  x_0 | x_t is Gaussian with precision 1/v + a^2 / t^2
        gain = a * self.v / (a**2 * self.v + tt**2)
        x0_mean = self.m + gain * (x_t - a * self.m)
        x0_var = self.v * tt**2 / (a**2 * self.v + tt**2)
        return gaussian_step(x_t, t, s, x0_mean, x0_var)


class EmpiricalPosterior(nn.Module):
    """Oracle Gaussian predictor: E[x_0 | x_t] and Var[x_0 | x_t] by self-normalised weights over a
    reference sample (M, N, D) of the (standardised) data. The best any Gaussian reverse step can do.
    """

    def __init__(self, reference: Tensor, chunk: int = 1024, var_floor: float = 1e-8):
        super().__init__()
        self.register_buffer("ref", reference.float())
        self.chunk = chunk
        self.var_floor = var_floor

    def moments(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(E[x_0 | x_t], Var[x_0 | x_t]), each shaped like x_t (B, N, D); computed in float64."""
        ref = self.ref.flatten(1).double()
        ref_sq = (ref**2).sum(1)
        means, variances = [], []
        for lo in range(0, x_t.shape[0], self.chunk):
            xt = x_t[lo:lo + self.chunk].flatten(1).double()
            tt = t[lo:lo + self.chunk].double()[:, None]
            a = 1 - tt
            d2 = (xt**2).sum(1, keepdim=True) - 2 * a * (xt @ ref.T) + a**2 * ref_sq[None]
            w = torch.softmax(-0.5 * d2 / tt**2, dim=1)
            m = w @ ref
            means.append(m)
            variances.append((w @ ref**2 - m**2).clamp_min(self.var_floor))
        shape = x_t.shape
        return torch.cat(means).reshape(shape).float(), torch.cat(variances).reshape(shape).float()

    def forward(self, x_t: Tensor, t: Tensor, s: Tensor, y: Tensor | None = None, T: Tensor | None = None):
        m, v = self.moments(x_t, t)
        return gaussian_step(x_t, t, s, m, v)


def gaussian_log_prob(u: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    """log N(u; mu, diag sigma^2) summed over all but the batch dim, fp32. (B,)"""
    z = (u.float() - mu) / sigma
    return (-0.5 * z**2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
