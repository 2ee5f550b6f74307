"""Monotone rational-quadratic splines (Durkan et al. 2019, "Neural Spline Flows"), element-wise.

On [-bound, bound] the map is K rational-quadratic pieces through knots (x_k, y_k) with slopes d_k
at the knots; outside it is the identity (slopes 1 at the two ends keep it continuously
differentiable). Within bin k, with w_k, h_k the bin width and height, s_k = h_k / w_k and
theta = (x - x_k) / w_k:

    y = y_k + h_k (s_k theta^2 + d_k theta (1 - theta)) / (s_k + (d_{k+1} + d_k - 2 s_k) theta (1 - theta))
    dy/dx = s_k^2 (d_{k+1} theta^2 + 2 s_k theta (1 - theta) + d_k (1 - theta)^2) / (denominator)^2

and the inverse solves a quadratic in theta. Raw parameters (..., 3K - 1): K width logits, K height
logits and K - 1 interior slope pre-activations; all zeros give the identity.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_BIN = 1e-3
MIN_SLOPE = 1e-3


def num_params(bins: int) -> int:
    """Raw parameters per element for ``bins`` bins."""
    return 3 * bins - 1


def _knots(raw: Tensor, bins: int, bound: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x knots, widths, y knots, heights, slopes), the knots (..., K + 1), slopes (..., K + 1)."""
    w_raw, h_raw, d_raw = raw[..., :bins], raw[..., bins:2 * bins], raw[..., 2 * bins:]
    widths = MIN_BIN + (1 - MIN_BIN * bins) * torch.softmax(w_raw, dim=-1)
    heights = MIN_BIN + (1 - MIN_BIN * bins) * torch.softmax(h_raw, dim=-1)
    xk = F.pad(torch.cumsum(widths, dim=-1), (1, 0)) * 2 * bound - bound
    yk = F.pad(torch.cumsum(heights, dim=-1), (1, 0)) * 2 * bound - bound
    xk = torch.cat([torch.full_like(xk[..., :1], -bound), xk[..., 1:-1], torch.full_like(xk[..., :1], bound)], -1)
    yk = torch.cat([torch.full_like(yk[..., :1], -bound), yk[..., 1:-1], torch.full_like(yk[..., :1], bound)], -1)
    # softplus shifted so that 0 maps to slope 1; the end slopes are 1 (the identity tails)
    inner = MIN_SLOPE + F.softplus(d_raw + math.log(math.expm1(1 - MIN_SLOPE)))
    ones = torch.ones_like(inner[..., :1])
    slopes = torch.cat([ones, inner, ones], dim=-1)
    return xk, xk.diff(dim=-1), yk, yk.diff(dim=-1), slopes


def _gather(v: Tensor, idx: Tensor) -> Tensor:
    return v.gather(-1, idx[..., None])[..., 0]


def _bin(value: Tensor, knots: tuple, bins: int, on_y: bool):
    """The bin of each clamped ``value`` among the x knots (forward) or y knots (inverse) and that bin's
    (x_k, w_k, y_k, h_k, d_k, d_{k+1}), each shaped like ``value``."""
    xk, w, yk, h, d = knots
    edges = yk if on_y else xk
    k = torch.searchsorted(edges[..., 1:-1].contiguous(), value[..., None].contiguous(), right=True)[..., 0]
    k = k.clamp(0, bins - 1)
    return _gather(xk, k), _gather(w, k), _gather(yk, k), _gather(h, k), _gather(d, k), _gather(d, k + 1)


def spline_forward(x: Tensor, raw: Tensor, bins: int, bound: float) -> tuple[Tensor, Tensor]:
    """y = g(x) and log|g'(x)|, elementwise: x (...), raw (..., 3K - 1) -> (y, logdet), each like x."""
    inside = (x > -bound) & (x < bound)
    xc = x.clamp(-bound, bound)
    x0, wk, y0, hk, d0, d1 = _bin(xc, _knots(raw, bins, bound), bins, on_y=False)
    s = hk / wk
    theta = ((xc - x0) / wk).clamp(0, 1)
    tt = theta * (1 - theta)
    denom = s + (d1 + d0 - 2 * s) * tt
    y = y0 + hk * (s * theta.square() + d0 * tt) / denom
    deriv = s.square() * (d1 * theta.square() + 2 * s * tt + d0 * (1 - theta).square()) / denom.square()
    return torch.where(inside, y, x), torch.where(inside, torch.log(deriv), torch.zeros_like(x))


def spline_inverse(y: Tensor, raw: Tensor, bins: int, bound: float) -> Tensor:
    """x = g^{-1}(y), elementwise: y (...), raw (..., 3K - 1) -> x like y. Solved in float64: the
    quadratic is badly conditioned in flat bins (slopes down to 1e-3)."""
    dtype = y.dtype
    y, raw = y.double(), raw.double()
    inside = (y > -bound) & (y < bound)
    yc = y.clamp(-bound, bound)
    x0, wk, y0, hk, d0, d1 = _bin(yc, _knots(raw, bins, bound), bins, on_y=True)
    s = hk / wk
    dy = yc - y0
    a = hk * (s - d0) + dy * (d1 + d0 - 2 * s)
    b = hk * d0 - dy * (d1 + d0 - 2 * s)
    c = -s * dy
    disc = (b.square() - 4 * a * c).clamp_min(0)
    theta = (2 * c / (-b - torch.sqrt(disc))).clamp(0, 1)
    return torch.where(inside, x0 + theta * wk, y).to(dtype)
