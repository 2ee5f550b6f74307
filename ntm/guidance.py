"""Classifier-free guidance by the Gaussian product rule (paper App. C.5, digest §6.3).

Given the conditional N(mu_c, sigma_c^2) and the unconditional N(mu_u, sigma_u^2) of one reverse step
in u-space, the guided step is the Gaussian proportional to p_c^{1 + w} / p_u^{w}. Elementwise, with
r = (sigma_c / sigma_u)^2 clipped to at most 1 (so the guided precision never falls below the
conditional one):

    sigma = sigma_c / sqrt(1 + w - w r),    mu = ((1 + w) mu_c - w r mu_u) / (1 + w - w r).
"""
from __future__ import annotations

import torch
from torch import Tensor


def product_rule(mu_c: Tensor, sigma_c: Tensor, mu_u: Tensor, sigma_u: Tensor, w: float) -> tuple[Tensor, Tensor]:
    """Guided (mu, sigma), all tensors of one shape, fp32. w = 0 returns the conditional step."""
    mu_c, sigma_c, mu_u, sigma_u = (v.float() for v in (mu_c, sigma_c, mu_u, sigma_u))
    r = (sigma_c / sigma_u).clamp(max=1.0) ** 2
    denom = 1.0 + w - w * r
    return ((1.0 + w) * mu_c - w * r * mu_u) / denom, sigma_c / torch.sqrt(denom)
