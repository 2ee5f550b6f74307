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


def _normalised(raw: Tensor) -> Tensor:
    """softmax over the last dimension, written out: for the few bins here it is several times
    faster on CPU than ``torch.softmax``. The shift is a constant for autograd (softmax ignores it)."""
    e = (raw - raw.detach().amax(dim=-1, keepdim=True)).exp()
    return e / e.sum(dim=-1, keepdim=True)


def _knots(raw: Tensor, bins: int, bound: float) -> tuple[Tensor, Tensor, Tensor]:
    """Bin sizes (..., 2, K) (widths, heights, on [-bound, bound]), knots (..., 2, K + 1) (x, y) and
    slopes at the knots (..., K + 1)."""
    size_raw, slope_raw = raw.split([2 * bins, bins - 1], dim=-1)
    # widths and heights in one pass, each bin at least MIN_BIN of the interval
    sizes = (2 * bound) * (MIN_BIN + (1 - MIN_BIN * bins) * _normalised(size_raw.unflatten(-1, (2, bins))))
    # interior knots from the cumulative sums; the two ends are exactly -bound and bound
    inner = torch.cumsum(sizes[..., :-1], dim=-1) - bound
    knots = F.pad(F.pad(inner, (1, 0), value=-bound), (0, 1), value=bound)
    # softplus shifted so that 0 maps to slope 1; the end slopes are 1 (the identity tails)
    slopes = F.pad(MIN_SLOPE + F.softplus(slope_raw + math.log(math.expm1(1 - MIN_SLOPE))), (1, 1), value=1.0)
    return sizes, knots, slopes


def _gather(v: Tensor, idx: Tensor) -> Tensor:
    """v (..., R, M) at the indices idx (..., J) of its last dimension, for every row R -> (..., R, J):
    one gather (and one scatter backward) for all the rows."""
    return v.gather(-1, idx[..., None, :].expand(*idx.shape[:-1], v.shape[-2], idx.shape[-1]))


def _bin(value: Tensor, raw: Tensor, bins: int, bound: float, on_y: bool):
    """The bin of each clamped ``value`` among the x knots (forward) or y knots (inverse) and that bin's
    (x_k, w_k, y_k, h_k, d_k, d_{k+1}), each shaped like ``value``."""
    sizes, knots, slopes = _knots(raw, bins, bound)
    edges = knots[..., 1 if on_y else 0, 1:-1]
    k = torch.searchsorted(edges.contiguous(), value[..., None].contiguous(), right=True).clamp(0, bins - 1)
    wk, hk = _gather(sizes, k)[..., 0].unbind(-1)
    x0, y0 = _gather(knots, k)[..., 0].unbind(-1)
    d0, d1 = _gather(slopes[..., None, :], torch.cat([k, k + 1], -1))[..., 0, :].unbind(-1)
    # the last bin's size is the rest of the interval (the cumulative sum's rounding stays inside)
    last = k[..., 0] == bins - 1
    wk = torch.where(last, bound - x0, wk)
    hk = torch.where(last, bound - y0, hk)
    return x0, wk, y0, hk, d0, d1


def spline_forward(x: Tensor, raw: Tensor, bins: int, bound: float) -> tuple[Tensor, Tensor]:
    """y = g(x) and log|g'(x)|, elementwise: x (...), raw (..., 3K - 1) -> (y, logdet), each like x."""
    inside = (x > -bound) & (x < bound)
    xc = x.clamp(-bound, bound)
    x0, wk, y0, hk, d0, d1 = _bin(xc, raw, bins, bound, on_y=False)
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
    x0, wk, y0, hk, d0, d1 = _bin(yc, raw, bins, bound, on_y=True)
    s = hk / wk
    dy = yc - y0
    a = hk * (s - d0) + dy * (d1 + d0 - 2 * s)
    b = hk * d0 - dy * (d1 + d0 - 2 * s)
    c = -s * dy
    disc = (b.square() - 4 * a * c).clamp_min(0)
    theta = (2 * c / (-b - torch.sqrt(disc))).clamp(0, 1)
    return torch.where(inside, x0 + theta * wk, y).to(dtype)
