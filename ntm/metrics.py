"""Sample-quality metrics for 2-D data.

* ``energy_distance``: D^2 = 2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic form), on (n, d) sets.
* ``off_support_fraction``: share of samples where the true density is zero (checkerboard).
* ``low_density_fraction``: share of samples whose true log-density falls below the ``q`` quantile
  of the data's own log-densities (a perfect sampler scores q).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .data import toy_log_density


def _mean_dist(a: Tensor, b: Tensor, chunk: int = 2048) -> float:
    total = 0.0
    for lo in range(0, a.shape[0], chunk):
        total += float(torch.cdist(a[lo:lo + chunk].double(), b.double()).sum())
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Squared energy distance between samples x (n, d) and y (m, d)."""
    return 2 * _mean_dist(x, y) - _mean_dist(x, x) - _mean_dist(y, y)


def off_support_fraction(name: str, samples: Tensor) -> float:
    """Fraction of samples with zero true density (only meaningful for checkerboard)."""
    return float(torch.isinf(toy_log_density(name, samples)).double().mean())


def low_density_fraction(name: str, samples: Tensor, reference: Tensor, q: float = 0.01) -> float:
    """Fraction of samples with true log-density below the q-quantile of the reference data's."""
    threshold = torch.quantile(toy_log_density(name, reference), q)
    return float((toy_log_density(name, samples) < threshold).double().mean())
