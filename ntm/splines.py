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

    Bin widths and heights are MIN_BIN + (1 - MIN_BIN K) softmax(logits) of the interval 2 * bound,
    so with p the softmax and c_{k-1} = sum_{j<k} p_j the knot below bin k is -bound + k step +
    S c_{k-1} and the bin's size is step + S p_k (S = 2 bound (1 - MIN_BIN K)). Nothing builds the
    whole knot table: the tables are laid out bin-major, (K, M) over the M elements, so every
    operation runs along contiguous rows (on CPU several times faster than over a last dimension
    of 8); the bin index is counted row by row without gradient, and c_{k-1} is a masked sum. The
    slopes pass through their softplus after the gather, for two values per element, not K - 1.
    """
    shape = value.shape
    v = value.reshape(1, -1)  # (1, M)
    w_logits, h_logits, slope_raw = raw.reshape(-1, raw.shape[-1]).t().split([bins, bins, bins - 1])
    step, S = 2 * bound * MIN_BIN, 2 * bound * (1 - MIN_BIN * bins)
    with torch.autocast(v.device.type, enabled=False):  # flow arithmetic stays in raw's precision
        pw, ph = torch.softmax(w_logits, 0), torch.softmax(h_logits, 0)  # (K, M)
    with torch.no_grad():  # the bin: how many interior knots lie at or below the value
        p = ph if on_y else pw
        below = torch.zeros_like(v)
        k = torch.zeros(v.shape, dtype=torch.long, device=v.device)
        for i in range(bins - 1):
            below += p[i:i + 1]
            k += v >= (i + 1) * step - bound + S * below
    first, last = k == 0, k == bins - 1
    under = (torch.arange(bins, device=v.device)[:, None] < k).to(v.dtype)  # (K, M): 1 on the bins left of bin k

    def knot_and_size(p: Tensor) -> tuple[Tensor, Tensor]:
        p_k = p.gather(0, k)
        lo = torch.add(k.to(p.dtype) * step - bound, (p * under).sum(0, keepdim=True), alpha=S)
        # the last bin's size is the rest of the interval (the sums' rounding stays inside)
        return lo, torch.where(last, bound - lo, torch.add(torch.full_like(p_k, step), p_k, alpha=S))

    x0, wk = knot_and_size(pw)
    y0, hk = knot_and_size(ph)
    # slopes at the interior knots k - 1 and k (the end slopes are 1: the identity tails)
    d = MIN_SLOPE + F.softplus(slope_raw.gather(0, torch.cat([(k - 1).clamp_min(0), k.clamp_max(bins - 2)]))
                               + _SLOPE_SHIFT)
    d0 = torch.where(first, 1.0, d[:1])
    d1 = torch.where(last, 1.0, d[1:])
    return tuple(a.reshape(shape) for a in (x0, wk, y0, hk, d0, d1))


def _bin_shared(value: Tensor, raw: Tensor, index: Tensor, bins: int, bound: float):
    """As :func:`_bin` (forward direction) when many elements share a spline: raw (C, 3K - 1) holds C
    distinct splines and ``index`` (M,) names the one of each of the M elements of ``value``.

    Softmax, knots and slopes are computed once per spline, (K, C) bin-major; each element then
    reads its bin's six numbers from those tables (gathers, whose backward sums into the C splines).
    """
    shape = value.shape
    v = value.reshape(-1)
    C = raw.shape[0]
    w_logits, h_logits, slope_raw = raw.t().split([bins, bins, bins - 1])  # (K, C), (K, C), (K - 1, C)
    step, S = 2 * bound * MIN_BIN, 2 * bound * (1 - MIN_BIN * bins)
    below = torch.arange(bins, device=v.device, dtype=raw.dtype)[:, None] * step - bound  # (K, 1)
    with torch.autocast(v.device.type, enabled=False):
        pw, ph = torch.softmax(w_logits, 0), torch.softmax(h_logits, 0)
    # knot below bin k: -bound + k step + S c_{k-1}, c the cumulative softmax (exclusive)
    xk = torch.add(below, torch.cat([torch.zeros_like(pw[:1]), pw[:-1].cumsum(0)]), alpha=S)
    yk = torch.add(below, torch.cat([torch.zeros_like(ph[:1]), ph[:-1].cumsum(0)]), alpha=S)
    with torch.no_grad():  # the bin: how many interior knots lie at or below the value
        k = (v >= xk[1:].index_select(1, index)).sum(0)  # (M,)
    last = k == bins - 1
    at = k * C + index  # the element's entry in a flattened (K, C) table
    ones = torch.ones_like(slope_raw[:1])
    d = torch.cat([ones, MIN_SLOPE + F.softplus(slope_raw + _SLOPE_SHIFT), ones])  # (K + 1, C)

    def knot_and_size(knots: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        lo = knots.reshape(-1).gather(0, at)
        return lo, torch.where(last, bound - lo, torch.add(torch.full_like(lo, step), p.reshape(-1).gather(0, at), alpha=S))

    x0, wk = knot_and_size(xk, pw)
    y0, hk = knot_and_size(yk, ph)
    flat = d.reshape(-1)
    d0, d1 = flat.gather(0, at), flat.gather(0, at + C)
    return tuple(a.reshape(shape) for a in (x0, wk, y0, hk, d0, d1))


def spline_forward(x: Tensor, raw: Tensor, bins: int, bound: float, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """y = g(x) and log|g'(x)|, elementwise: x (...), raw (..., 3K - 1) -> (y, logdet), each like x.

    With ``index`` (x.numel(),) long, raw is instead (C, 3K - 1), C distinct splines, and element e
    of x (in row-major order) goes through spline index[e] (``_bin_shared``)."""
    inside = (x > -bound) & (x < bound)
    xc = x.clamp(-bound, bound)
    if index is None:
        x0, wk, y0, hk, d0, d1 = _bin(xc, raw, bins, bound, on_y=False)
    else:
        x0, wk, y0, hk, d0, d1 = _bin_shared(xc, raw, index, bins, bound)
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
