"""What a likelihood is for: Bayes classification with class-conditional densities, and an
out-of-distribution statistic built from NTM's per-step terms.

Both work on any model with ``score(x, y=None, generator=...) -> {"nll": (B,), ...}`` (an
:class:`ntm.model.NTM`, whose ``nll`` is the importance-weighted bound, or a
:class:`ntm.flow_matching.FlowMatching`, whose ``nll`` is the ODE estimate).

* ``class_log_likelihoods``: log p(x | y) for every class y, each from the same random draws (the
  same trajectories for NTM, the same Hutchinson probes for FM), so that the differences between
  classes carry no Monte Carlo noise from the trajectories themselves. NTM's transporter takes no
  label, so it runs once per trajectory for all classes; only the predictor runs per class.
* ``bayes_posterior``: log p(y | x) = log p(x | y) + log p(y) - log sum_y' p(x | y') p(y').
* ``noisy_level_bound``: the bound on -log p(x_{t_1}), the density of the data at the first noisy
  level, read off the same trajectories: a likelihood that no longer pays for pixel-level detail.
* ``level_mean``: the mean over several levels of such class log-likelihoods, which pools the
  evidence of differently noised views of x.
* ``StepTypicality``: the trajectory splits -log p(x) into T per-step terms, one per noise scale.
  A sample is typical when its vector of step terms (and prior term) looks like those of the
  training data: the statistic is the Mahalanobis distance of that vector under a Gaussian fitted
  to in-distribution scores. Data that a model finds "simple" (higher likelihood than its own
  training data) still fail it, because their terms are off in the opposite direction at the fine
  steps and the coarse steps at once.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .flow_matching import FlowMatching
from .likelihood import class_step_terms, iw_of_terms, level_bound_of_terms, log_scale_correction


def class_log_likelihoods(model, x: Tensor, seed: int = 0, progress=None, level: int | str = 0,
                          **score_kwargs) -> Tensor:
    """log p(x | y) estimates (B, C) for raw x (B, ...) and every class y of a class-conditional
    model, each class from the same random draws (a generator seeded ``seed``): for NTM minus its IW
    bound (:func:`ntm_class_log_likelihoods`), for FM minus ``model.score(x, y=c)["nll"]`` per
    class. ``level`` >= 1 (NTM only) scores the data noised to that level of the trajectory instead;
    ``level="all"`` the mean over every noisy level 1..T-1 (:func:`level_mean`; T is ``steps`` or the
    model's). ``progress``, if given, is called with the number of (sample, class) pairs scored."""
    if model.spec.num_classes == 0:
        raise ValueError("Bayes classification needs a class-conditional model; this one has no class labels")
    if level == "all" and not isinstance(model, FlowMatching):
        noisy = range(1, score_kwargs.get("steps") or model.config.trajectory.T)
        return level_mean(ntm_class_log_likelihoods(model, x, tuple(noisy), seed, progress, **score_kwargs), noisy)
    if not isinstance(model, FlowMatching):
        return ntm_class_log_likelihoods(model, x, (level,), seed, progress, **score_kwargs)[level]
    if level != 0:
        raise ValueError("an FM model has no trajectory levels; level must be 0")
    out = []
    for c in range(model.spec.num_classes):
        y = torch.full((x.shape[0],), c, dtype=torch.long)
        out.append(-model.score(x, y=y, generator=torch.Generator().manual_seed(seed),
                                **score_kwargs)["nll"].float().cpu())
        if progress is not None:
            progress(x.shape[0])
    return torch.stack(out, 1)


def ntm_class_log_likelihoods(model, x: Tensor, levels: tuple[int, ...] = (0, 1), seed: int = 0, progress=None,
                              **score_kwargs) -> dict[int, Tensor]:
    """For each level in ``levels``, log-likelihoods (B, C) of a class-conditional NTM from one set of
    K trajectories (``ntm.likelihood.class_step_terms``; the label-free transporter runs once for all
    classes): level 0 is minus the IW bound on -log p(x | y) (raw units); level j >= 1 is minus the
    K-averaged bound on -log p(x_{t_j} | y), the data noised to the trajectory's level j
    (standardised units), which leaves out the finest steps where pixel detail, not the class, is paid for."""
    g = torch.Generator().manual_seed(seed)
    terms, prior = class_step_terms(model, x, generator=g, progress=progress, **score_kwargs)
    return {lv: -(iw_of_terms(terms, prior) + log_scale_correction(model.spec)) if lv == 0
            else -level_bound_of_terms(terms, prior, lv) for lv in levels}


def level_mean(log_likelihoods: dict[int, Tensor], levels) -> Tensor:
    """The mean (B, C) over ``levels`` of per-level log-likelihoods {level: (B, C)} (as from
    ``ntm_class_log_likelihoods``): the log of the geometric mean of the levels' likelihoods, which
    pools the evidence of several noised views of x without counting it once per view."""
    levels = list(levels)
    if not levels or any(lv not in log_likelihoods for lv in levels):
        raise ValueError(f"levels {levels} must be a non-empty subset of the scored levels {sorted(log_likelihoods)}")
    return torch.stack([log_likelihoods[lv] for lv in levels]).mean(0)


def bayes_posterior(log_likelihoods: Tensor, log_prior: Tensor | None = None) -> Tensor:
    """log p(y | x) (B, C) from log p(x | y) (B, C) and log p(y) (C,) (default: uniform)."""
    if log_prior is None:
        log_prior = torch.full((log_likelihoods.shape[1],), -math.log(log_likelihoods.shape[1]))
    joint = log_likelihoods.double() + log_prior.double()
    return (joint - torch.logsumexp(joint, 1, keepdim=True)).float()


def step_features(scores: dict[str, Tensor]) -> Tensor:
    """The per-sample feature vector (B, T + 1) of an NTM's scores: the step terms and the prior term."""
    return torch.cat([scores["step_terms"], scores["prior_term"][:, None]], 1)


def noisy_level_bound(scores: dict[str, Tensor], level: int = 1) -> Tensor:
    """An upper bound (B,) on -log p(x_{t_level}), the density of the data noised to the trajectory's
    level ``level`` (1 = the first noisy one), averaged over the scored trajectories: the step terms
    of the steps above that level plus the prior term (standardised units; the constant that maps
    them to raw units is left out, so only differences between samples mean anything). Leaving
    out the fine steps leaves out most of what makes an image "simple" or "complex" at the pixel
    level, which is what lets simpler data outscore the training data under the full bound."""
    return level_bound_of_terms(scores["step_terms"][None], scores["prior_term"][None], level)


class StepTypicality:
    """A Gaussian fit to in-distribution feature vectors (M, F) (``step_features``); ``distance``
    gives the squared Mahalanobis distance (B,) of new ones: larger is less typical.
    ``ridge`` is added to the covariance's diagonal, relative to its mean variance."""

    def __init__(self, features: Tensor, ridge: float = 1e-4):
        f = features.double()
        if f.ndim != 2 or f.shape[0] <= f.shape[1]:
            raise ValueError(f"need more fitting samples than features; got {tuple(f.shape)}")
        self.mean = f.mean(0)
        cov = torch.cov((f - self.mean).T).reshape(f.shape[1], f.shape[1])
        cov = cov + ridge * cov.diagonal().mean() * torch.eye(f.shape[1], dtype=f.dtype)
        self.chol = torch.linalg.cholesky(cov)

    def distance(self, features: Tensor) -> Tensor:
        z = torch.linalg.solve_triangular(self.chol, (features.double() - self.mean).T, upper=False)
        return z.square().sum(0).float()


__all__ = ["class_log_likelihoods", "ntm_class_log_likelihoods", "bayes_posterior", "level_mean", "step_features", "noisy_level_bound", "StepTypicality"]
