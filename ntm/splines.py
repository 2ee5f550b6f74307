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


_SLOPE_SHIFT = math.log(math.expm1(1 - MIN_SLOPE))  # softplus(0 + shift) = 1 - MIN_SLOPE: zeros give slope 1


def _bin(value: Tensor, raw: Tensor, bins: int, bound: float, on_y: bool):
    """The bin of each clamped ``value`` among the x knots (forward) or y knots (inverse) and that bin's
    (x_k, w_k, y_k, h_k, d_k, d_{k+1}), each shaped like ``value``.

    Bin widths and heights are MIN_BIN + (1 - MIN_BIN K) softmax(logits) of the interval 2 * bound.
    Only the searched row of knots is built in full; everything else is read at the bin: the knot
    below bin k is -bound + k * step + scale * E_{k-1}, with E the cumulative sums of the exponentials
    (a matmul with a triangular matrix, several times faster on CPU than ``cumsum`` over 8 bins), and
    the slopes pass through their softplus after the gather, for two values per element, not K - 1.
    """
    size_raw, slope_raw = raw.split([2 * bins, bins - 1], dim=-1)
    size_raw = size_raw.unflatten(-1, (2, bins))  # (..., 2, K): width and height logits
    # the shift is a constant for autograd (the softmax ignores it)
    e = (size_raw - size_raw.detach().amax(dim=-1, keepdim=True)).exp()
    with torch.autocast(e.device.type, enabled=False):  # flow arithmetic stays in e's precision under autocast
        cum = e @ torch.triu(torch.ones(bins, bins, device=raw.device, dtype=e.dtype))  # (..., 2, K)
    step = 2 * bound * MIN_BIN
    scale = (2 * bound * (1 - MIN_BIN * bins)) / cum[..., -1:]  # (..., 2, 1): the softmax's normaliser
    row = 1 if on_y else 0
    j = torch.arange(1, bins, device=raw.device, dtype=raw.dtype)
    edges = torch.addcmul(j * step - bound, cum[..., row, :-1], scale[..., row, :])  # interior knots (..., K - 1)
    k = torch.searchsorted(edges, value[..., None].contiguous(), right=True).clamp(0, bins - 1)  # (..., 1)
    below = (k - 1).clamp_min(0)
    first, last = k[..., 0] == 0, k[..., 0] == bins - 1
    # E_{k-1} and E_k of both rows in one gather (..., 2, 2); E_{-1} = 0
    c = cum.gather(-1, torch.cat([below, k], -1)[..., None, :].expand(*k.shape[:-1], 2, 2))
    c_below = torch.where(first[..., None], 0.0, c[..., 0])
    x0, y0 = (k.to(raw.dtype) * step - bound + c_below * scale[..., 0]).unbind(-1)
    wk, hk = (step + (c[..., 1] - c_below) * scale[..., 0]).unbind(-1)
    # the last bin's size is the rest of the interval (the sums' rounding stays inside)
    wk = torch.where(last, bound - x0, wk)
    hk = torch.where(last, bound - y0, hk)
    # slopes at the interior knots k - 1 and k (the end slopes are 1: the identity tails)
    d = MIN_SLOPE + F.softplus(slope_raw.gather(-1, torch.cat([below, k.clamp_max(bins - 2)], -1)) + _SLOPE_SHIFT)
    d0 = torch.where(first, 1.0, d[..., 0])
    d1 = torch.where(last, 1.0, d[..., 1])
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
