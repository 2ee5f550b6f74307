"""The predictor f_P: a diagonal Gaussian N(mu_P, sigma_P^2) over u_s given u_t, (t, s) and a label.

Parameterisation (our choice; the paper only says "a linear projection"). The network output F
(zero-initialised) is read as a correction to the exact reverse kernel of Gaussian data with
per-dimension mean m and variance w (EDM's sigma_data preconditioning), written with the posterior
coefficients A, B, C of q(x_s | x_t, x_0):

    x0_hat  = m + c_skip(t) (u_t - (1 - t) m) + sqrt(v(t)) F_mu,    c_skip = (1 - t) w / ((1 - t)^2 w + t^2)
    mu_P    = A u_t + B x0_hat                                       v      = w t^2 / ((1 - t)^2 w + t^2)
    sigma_P^2 = C^2 + B^2 v(t) exp(2 delta),                         delta  = clip * tanh(F_sigma / clip)

``PredictorConfig.precondition`` "unit" takes m = 0, w = 1 (the data assumed standardised); "data"
takes the training set's per-dimension statistics stored in ``DataSpec.token_mean``/``token_var``.

So a new predictor is the exact reverse step for standardised Gaussian data, sigma_P stays positive
at s = 0 where C = 0 (sigma_P = C e^delta is singular there), and the variance can shrink to C^2
(the posterior given x_0 exactly) but not below. ``Predictor`` is Markov: it sees one level.

The module also holds two closed-form predictors with the same interface, used as references:
``GaussianDataPosterior`` (exact reverse kernel for Gaussian data) and ``EmpiricalPosterior`` (the
Gaussian ceiling: exact posterior moments of x_0 from a reference sample).

Starting from a flow-matching model (paper §3.3, App. A.3, A.5), the predictor is the FM velocity
network read in u-space (``VelocityPredictor``):

    x0_hat = u_t - t v(u_t, t, y)                 (v = eps - x_0; ``VelocityAdapter`` converts other conventions)
    mu_P   = A(t, s) u_t + B(t, s) x0_hat           (no mean correction: the paper's no_delta_mean)

C(t, s) -> 0 as s -> 0 (the Gaussian posterior becomes a point mass), so the paper's
sigma_P = C exp(delta_sigma) needs a choice there. Two scales are built (``PredictorConfig.velocity_scale``),
with tau_0 = ``s0_std_floor`` and a zero-initialised head delta:

* "x0": sigma_P^2 = C^2 + B^2 tau^2, tau = tau_0 exp(delta(h)): the variance of q(x_s | x_t, x_0) with
  x_0 ~ N(x0_hat, tau^2). delta is a per-token uncertainty of x0_hat that does not depend on s.
* "floor": sigma_P = max(C, tau_0) exp(delta(h, s)). At initialisation this is the FM model's Gaussian
  posterior sampler on every step with C >= tau_0.

The head reads the backbone's last features when the velocity network is the project's own
``VelocityField``; for any other velocity module it is a zero-initialised map of the t (and, for
"floor", s) embedding to one value per token channel.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import BackboneConfig, DataSpec, PredictorConfig
from .images import patchify, unpatchify
from .nn import ConditionedTransformer, TimeEmbedding, soft_clip
from .trajectory import posterior_coefficients


def as_column(v: Tensor) -> Tensor:
    """Per-sample values (B,) -> fp32 (B, 1, 1), to broadcast against tokens (B, N, D)."""
    return v.float().reshape(-1, 1, 1)


def gaussian_step(u_t: Tensor, t: Tensor, s: Tensor, x0_mean: Tensor, x0_var: Tensor) -> tuple[Tensor, Tensor]:
    """(mu, sigma) of the reverse step when x_0 | x_t has mean/variance (x0_mean, x0_var), (B, N, D)."""
    A, B, C = (as_column(c) for c in posterior_coefficients(t.float(), s.float()))
    mu = A * u_t + B * x0_mean
    return mu, torch.sqrt(C**2 + B**2 * x0_var)


class Predictor(ConditionedTransformer):
    """f_P(u_t, t, s, y) -> (mu_P, sigma_P), each (B, N, D) fp32. Label ``num_classes`` is the null label."""

    def __init__(self, cfg: PredictorConfig, num_tokens: int, token_dim: int, num_classes: int = 0,
                 multi_T: bool = False, data_stats: tuple | None = None, text_dim: int = 0, text_tokens: int = 0,
                 text_attention: str = "concat", grid: tuple[int, int] | None = None):
        super().__init__(cfg.width, cfg.layers, cfg.heads, num_tokens, token_dim, 2 * token_dim, num_classes,
                         two_times=True, multi_T=multi_T, text_dim=text_dim, text_tokens=text_tokens,
                         text_attention=text_attention, conditioning=cfg.conditioning,
                         condition_std=cfg.condition_std, position=cfg.position, grid=grid)
        self.clip = cfg.log_var_clip
        mean, var = torch.zeros(num_tokens, token_dim), torch.ones(num_tokens, token_dim)
        if data_stats is not None:
            mean, var = (torch.as_tensor(v, dtype=torch.float32).reshape(num_tokens, token_dim) for v in data_stats)
        # fixed by the config (not trained, not saved): the data statistics the read-out is centred on
        self.register_buffer("data_mean", mean, persistent=False)
        self.register_buffer("data_var", var, persistent=False)

    def forward(self, u_t: Tensor, t: Tensor, s: Tensor, y: Tensor | None = None,
                T: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """u_t: (B, N, D); t, s: (B,); y: (B,) int labels or None (null); T: (B,) trajectory length
        (multi-T models only) -> (mu, sigma), each (B, N, D)."""
        u_t = u_t.float()
        f_mu, f_sigma = self.backbone(u_t, t, s, y, T).split(self.token_dim, dim=-1)
        tt = as_column(t)
        m, w = self.data_mean, self.data_var
        denom = (1 - tt) ** 2 * w + tt**2
        v = w * tt**2 / denom
        x0_mean = m + (1 - tt) * w / denom * (u_t - (1 - tt) * m) + torch.sqrt(v) * f_mu
        x0_var = v * torch.exp(2 * soft_clip(f_sigma, self.clip))
        return gaussian_step(u_t, t, s, x0_mean, x0_var)


class GaussianDataPosterior(nn.Module):
    """The exact reverse kernel when x_0 ~ N(m, diag(v)) (tokens (N, D) of mean m and variance v)."""

    def __init__(self, mean: Tensor, var: Tensor):
        super().__init__()
        self.register_buffer("m", mean.float())
        self.register_buffer("v", var.float())

    def forward(self, x_t: Tensor, t: Tensor, s: Tensor, y: Tensor | None = None, T: Tensor | None = None):
        """(mu, sigma) of p(x_s | x_t), each (B, N, D), for x_t (B, N, D) and times t, s (B,)."""
        tt = as_column(t)
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
        """(mu, sigma) of p(x_s | x_t), each (B, N, D), for x_t (B, N, D) and times t, s (B,)."""
        m, v = self.moments(x_t, t)
        return gaussian_step(x_t, t, s, m, v)


def gaussian_log_prob(u: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    """log N(u; mu, diag sigma^2) summed over all but the batch dim, fp32. (B,)"""
    z = (u.float() - mu) / sigma
    return (-0.5 * z**2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


# ------------------------------------------------------------------------- velocity predictors
class VelocityField(ConditionedTransformer):
    """v_theta(x_t, t, y): a bidirectional transformer with one time input and a (B, N, D) velocity head.
    The flow-matching baseline's network, and the backbone of ``VelocityPredictor``."""

    def __init__(self, cfg: BackboneConfig, spec: DataSpec):
        super().__init__(cfg.width, cfg.layers, cfg.heads, spec.num_tokens, spec.token_dim, spec.token_dim,
                         spec.num_classes, two_times=False, text_dim=spec.text_dim, text_tokens=spec.text_tokens,
                         text_attention=spec.text_attention, conditioning=cfg.conditioning,
                         condition_std=cfg.condition_std, position=cfg.position, grid=spec.grid)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x_t: (B, N, D), t: (B,), y: (B,) or None -> v: (B, N, D) fp32."""
        return self.backbone(x_t.float(), t, None, y)


class VelocityAdapter(nn.Module):
    """Wrap any velocity model ``fn(x_t, t, y) -> v`` for use as an NTM predictor backbone.

    ``fn`` sees the model's tokens reshaped to the data layout: images (B, C, H, W), vectors (B, d), in
    the NTM's standardised units (images are not standardised, so they stay in [-1, 1]), and must
    follow x_t = (1 - t) x_0 + t eps. ``sign`` +1: fn returns eps - x_0; -1: fn returns x_0 - eps
    (the adapter flips it). Returns v = eps - x_0 as tokens (B, N, D).
    """

    def __init__(self, fn, spec: DataSpec, sign: float = 1.0):
        super().__init__()
        if sign not in (1.0, -1.0):
            raise ValueError("sign must be +1 (v = eps - x_0) or -1 (v = x_0 - eps)")
        self.fn = fn
        self.spec = spec
        self.sign = sign

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        spec = self.spec
        if spec.kind == "image":
            v = self.fn(unpatchify(x_t, tuple(spec.shape), spec.patch), t, y)
            return self.sign * patchify(v.float(), spec.patch)
        return self.sign * self.fn(x_t[..., 0], t, y).float()[..., None]


class VelocityPredictor(nn.Module):
    """f_P built on a velocity network v = eps - x_0 (see the module doc). Same interface as ``Predictor``."""

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

    @classmethod
    def from_config(cls, cfg: PredictorConfig, spec: DataSpec) -> "VelocityPredictor":
        """The velocity predictor of a config: a ``VelocityField`` of the predictor's size."""
        field = VelocityField(BackboneConfig(cfg.layers, cfg.width, cfg.heads, cfg.conditioning, cfg.condition_std,
                                             cfg.position), spec)
        return cls(field, spec.num_tokens, spec.token_dim, cfg.s0_std_floor, cfg.log_var_clip, scale=cfg.velocity_scale)

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
        A, B, C = (as_column(c) for c in posterior_coefficients(t.float(), s.float()))
        x0_hat = u_t - as_column(t) * v
        mu = A * u_t + B * x0_hat
        if self.scale == "x0":  # q(x_s | x_t) with x_0 ~ N(x0_hat, tau^2): variance C^2 + B^2 tau^2
            tau = self.floor * torch.exp(delta)
            return mu, torch.sqrt(C.square() + (B * tau).square())
        return mu, C.clamp_min(self.floor) * torch.exp(delta)


def posterior_mean_from_velocity(v: Tensor, x_t: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """mu = A x_t + B (x_t - t v): the mean of q(x_s | x_t, x0_hat) for a velocity v = eps - x_0. (B, N, D)"""
    A, B, _ = (as_column(c) for c in posterior_coefficients(t.float(), s.float()))
    return A * x_t + B * (x_t - as_column(t) * v)


def build_predictor(cfg: PredictorConfig, spec: DataSpec, multi_T: bool = False) -> nn.Module:
    """The predictor a config names: ``Predictor`` (from scratch) or ``VelocityPredictor`` (from FM)."""
    if cfg.kind == "velocity":
        return VelocityPredictor.from_config(cfg, spec)
    # "data" with no stored statistics (vector data, standardised on the way in) is mean 0, variance 1
    stats = (spec.token_mean, spec.token_var) if cfg.precondition == "data" and spec.token_mean else None
    return Predictor(cfg, spec.num_tokens, spec.token_dim, spec.num_classes, multi_T=multi_T, data_stats=stats,
                     text_dim=spec.text_dim, text_tokens=spec.text_tokens, text_attention=spec.text_attention,
                     grid=spec.grid)
