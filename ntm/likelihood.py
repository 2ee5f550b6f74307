"""Likelihood estimators built on the exact per-step density.

* ``trajectory_nll``: the exact NLL of one forward trajectory (training objective, Eq. 3.4).
* ``bound_by_step``: the same bound split into its per-step terms (where the nats go).
* ``nll_bound``: an upper bound on -log p(x_0) (digest §14 item 15), with t_0 = 0 so x_{t_0} = x_0:

    log p(x_0) >= E_q [ log p(x_1) + sum_k log p(x_{t_{k-1}} | x_{t_k}) - sum_k log q(x_{t_k} | x_{t_{k-1}}) ]

  with the forward transitions q in closed form and p(x_1) = N(0, I). Averaging over K trajectories
  gives the ELBO; log-mean-exp over them gives the tighter importance-weighted bound (IWAE).
* ``score_samples``: per-sample scores (both bounds, bits/dim and the per-step terms) for ``ntm score``.
* ``discrete_nll_bounds``: for 8-bit images, a bound on -log P(q) of the pixel values q themselves
  with a discretised last step (VDM's L_0, Kingma et al. 2021): the trajectory starts at a small t_0
  from the bin centres c, x_{t_0} ~ N((1 - t_0) c, t_0^2), and

    log P(q) >= E_q [ log P(q | x_{t_0}) + log p(x_{t_0}, ..., x_1) - log q(x_{t_0}, ..., x_1 | c) ],
    P(q | x_{t_0}) = prod_i int_{bin q_i} N(x; x_{t_0,i} / (1 - t_0), (t_0 / (1 - t_0))^2) dx,

  the bins of width 2/256 in [-1, 1], the two end bins extended to -inf and +inf (so the 256 bin
  probabilities of each pixel sum to one). It is a bound on the same discrete NLL as the uniformly
  dequantised bound above; bits/dim is nats / (D ln 2) with no log2(128) term.

All results are nats per sample in the raw data's units (standardisation adds sum log std,
``log_scale_correction``). For images in [-1, 1], ``bits_per_dim`` converts a continuous NLL in nats
to bits per dimension of the 8-bit data,

    bpd = nats / (D ln 2) + log2(128),

because the map from [0, 256)^D to [-1, 1)^D scales every dimension by 1/128.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import DataSpec
from .predictor import gaussian_log_prob
from .trajectory import forward_trajectory, transition_log_prob


def log_scale_correction(spec: DataSpec) -> float:
    """sum log std: add to a standardised-space NLL to express it in raw data units (nats)."""
    if spec.kind == "image":
        return 0.0
    return float(sum(math.log(s) for s in spec.std))


def bits_per_dim(nats: float | Tensor, dim: int):
    """Continuous NLL of data in [-1, 1] (nats per sample) -> bits per dimension of the 8-bit data."""
    return nats / (dim * math.log(2)) + math.log2(128)


def _prepare(model, x: Tensor, y: Tensor | None):
    x0 = model.to_tokens(x)
    if not torch.isfinite(x0).all():
        raise ValueError("data contain NaN or inf")
    return x0, model.check_labels(y)


@torch.no_grad()
def trajectory_nll(model, x: Tensor, y: Tensor | None = None, t_min: float | None = None,
                   generator: torch.Generator | None = None, steps: int | None = None) -> Tensor:
    """-log p(x_{t_0}, ..., x_{t_{T-1}} | x_{t_T}) of a sampled trajectory of raw x (B, ...). -> (B,)

    t_min defaults to the sampling t_min; each of the T modelled levels is counted in raw units.
    """
    x0, y = _prepare(model, x, y)
    t_min = model.config.trajectory.sample_t_min if t_min is None else t_min
    t = model.grid(x0.shape[0], t_min, T=steps)
    X = forward_trajectory(x0, t, generator=generator)
    nll = -model.trajectory_log_probs(X, t, y).sum(1)
    return nll + (t.shape[1] - 1) * log_scale_correction(model.spec)


def _draw_trajectory(model, x0: Tensor, generator: torch.Generator | None, steps: int | None,
                     t_min: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward trajectory per sample of standardised x0 (B, N, D) on the bound's grid (t_0 = ``t_min``)
    and its model-free terms. -> (t (B, T + 1), X (B, T + 1, N, D), log q(x_{t_k} | x_{t_{k-1}}) (B, T),
    log N(x_1) (B,))."""
    t = model.grid(x0.shape[0], t_min, T=steps)
    X = forward_trajectory(x0, t, generator=generator)
    log_prior = gaussian_log_prob(X[:, -1], torch.zeros_like(X[:, -1]), torch.ones_like(X[:, -1]))
    log_q = torch.stack([transition_log_prob(X[:, k], X[:, k + 1], t[:, k], t[:, k + 1])
                         for k in range(t.shape[1] - 1)], 1)
    return t, X, log_q, log_prior


def _elbo_parts(model, x0: Tensor, y: Tensor | None, generator: torch.Generator | None,
                steps: int | None, t_min: float = 0.0, levels: list | None = None,
                logdets: list | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One trajectory per sample of standardised x0 (B, N, D) on the bound's grid (t_0 = ``t_min``).
    -> (t (B, T + 1), log p(x_{t_{k-1}} | x_{t_k}) (B, T), log q(x_{t_k} | x_{t_{k-1}}) (B, T), log N(x_1) (B,)).
    ``levels``, when a list, receives the trajectory (B, T + 1, N, D); ``logdets`` the transporter's
    log|det df_T/dx| at each step's target level (B, T), the part of log p that is not the predictor's."""
    t, X, log_q, log_prior = _draw_trajectory(model, x0, generator, steps, t_min)
    if levels is not None:
        levels.append(X)
    out = model.trajectory_steps(X, t, y)
    B, T = t.shape[0], t.shape[1] - 1
    if logdets is not None:
        logdets.append(out.logdet.reshape(B, T))
    return t, out.log_prob().reshape(B, T), log_q, log_prior


@torch.no_grad()
def elbo_terms(model, x0: Tensor, y: Tensor | None, generator: torch.Generator | None = None,
               steps: int | None = None) -> Tensor:
    """log p(x_{0:T}) - log q(x_{1:T} | x_0) of one trajectory per sample, standardised x0 (B, N, D)."""
    _, log_p, log_q, log_prior = _elbo_parts(model, x0, y, generator, steps)
    return log_p.sum(1) + log_prior - log_q.sum(1)


@torch.no_grad()
def bound_by_step(model, x: Tensor, y: Tensor | None = None, num_trajectories: int = 4,
                  generator: torch.Generator | None = None, steps: int | None = None, batch_size: int = 4096) -> dict:
    """Where the ELBO bound's nats go, step by step (means over samples and trajectories).

    For each reverse step k = 1..T (x_{t_{k-1}} given x_{t_k}, on the bound's grid with t_0 = 0):
    ``neg_log_p[k-1]`` = -log p and ``log_q[k-1]`` = log q(x_{t_k} | x_{t_{k-1}}); ``neg_log_prior`` =
    -log N(x_1; 0, I). All in nats per sample in standardised units; the ELBO bound in raw units is
    sum(neg_log_p) + neg_log_prior + sum(log_q) + ``raw_correction``. ``times`` is the grid.
    """
    x0, y = _prepare(model, x, y)
    neg_log_p, log_q, neg_prior = 0.0, 0.0, 0.0  # sums over samples and trajectories
    for lo in range(0, x0.shape[0], batch_size):  # same batches and draw order as nll_bounds
        xb = x0[lo:lo + batch_size]
        yb = None if y is None else y[lo:lo + batch_size]
        for _ in range(num_trajectories):
            t, lp, lq, lprior = _elbo_parts(model, xb, yb, generator, steps)
            neg_log_p, log_q, neg_prior = neg_log_p - lp.sum(0), log_q + lq.sum(0), neg_prior - lprior.sum()
    count = x0.shape[0] * num_trajectories
    return {"times": t[0].tolist(), "neg_log_p": (neg_log_p / count).tolist(), "log_q": (log_q / count).tolist(),
            "neg_log_prior": float(neg_prior / count), "raw_correction": float(log_scale_correction(model.spec))}


@torch.no_grad()
def nll_bounds(model, x: Tensor, y: Tensor | None = None, num_trajectories: int = 16,
               generator: torch.Generator | None = None, batch_size: int = 4096,
               steps: int | None = None) -> tuple[Tensor, Tensor]:
    """Both bounds from the same K trajectories per point: (ELBO bound, importance-weighted bound),
    each (B,) nats in raw units. The IW bound is never above the ELBO bound (Jensen)."""
    x0, y = _prepare(model, x, y)
    elbo, iw = _batched_bounds(lambda xb, yb: elbo_terms(model, xb, yb, generator, steps), x0, y, num_trajectories,
                               batch_size)
    c = log_scale_correction(model.spec)
    return elbo + c, iw + c


def _batched_bounds(weight, x: Tensor, y: Tensor | None, num_trajectories: int,
                    batch_size: int) -> tuple[Tensor, Tensor]:
    """(-mean_K w, -logmeanexp_K w), each (B,), of K draws of the log weights ``weight(x_b, y_b)`` (b,)
    per sample, in batches: the ELBO and importance-weighted bounds from the same trajectories."""
    elbo, iw = [], []
    for lo in range(0, x.shape[0], batch_size):
        yb = None if y is None else y[lo:lo + batch_size]
        w = torch.stack([weight(x[lo:lo + batch_size], yb) for _ in range(num_trajectories)])  # (K, b)
        elbo.append(-w.mean(0))
        iw.append(iw_bound(w))
    return torch.cat(elbo), torch.cat(iw)


def iw_bound(log_weights: Tensor) -> Tensor:
    """The importance-weighted bound -log mean_k exp(w_k) (...) from K log weights (K, ...)."""
    return -(torch.logsumexp(log_weights, 0) - math.log(log_weights.shape[0]))


def _log_normal_mass(a: Tensor, b: Tensor) -> Tensor:
    """log (Phi(b) - Phi(a)) for a < b elementwise, accurate in both tails."""
    flip = a > 0  # use the symmetric interval (-b, -a) so that the larger CDF value is near 1 only when needed
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp((log_lo - log_hi).clamp(max=0.0)).clamp(max=1 - 1e-12))


def discretized_log_prob(x_t0: Tensor, q: Tensor, t0: float) -> Tensor:
    """log P(q | x_{t_0}) (B,) of 8-bit values q (B, ...) (integers 0..255) given x_{t_0} of the same
    shape: each value's bin mass under N(x_{t_0} / (1 - t_0), (t_0 / (1 - t_0))^2), bins of width
    2/256 in [-1, 1], the end bins extended to -inf and +inf."""
    centre = x_t0.double() / (1 - t0)
    s = t0 / (1 - t0)
    q = q.double()
    lo = torch.where(q <= 0, torch.full_like(q, -math.inf), q / 128 - 1)
    hi = torch.where(q >= 255, torch.full_like(q, math.inf), (q + 1) / 128 - 1)
    return _log_normal_mass((lo - centre) / s, (hi - centre) / s).flatten(1).sum(1).float()


@torch.no_grad()
def discrete_elbo_terms(model, q_tokens: Tensor, y: Tensor | None, t0: float, generator: torch.Generator | None = None,
                        steps: int | None = None) -> Tensor:
    """log P(q | x_{t_0}) + log p(x_{t_0:T}) - log q(x_{t_0:T} | c) of one trajectory per image, q as
    tokens (B, N, D) of integers 0..255 (see the module doc)."""
    centres = (q_tokens.float() + 0.5) / 128 - 1
    levels: list = []
    t, log_p, log_q, log_prior = _elbo_parts(model, centres, y, generator, steps, t_min=t0, levels=levels)
    x_t0 = levels[0][:, 0]
    first = gaussian_log_prob(x_t0, (1 - t0) * centres, torch.full_like(x_t0, t0))
    return discretized_log_prob(x_t0, q_tokens, t0) + log_p.sum(1) + log_prior - first - log_q.sum(1)


def discrete_nll_bounds(model, q: Tensor, y: Tensor | None = None, num_trajectories: int = 16, t0: float = 1e-3,
                        generator: torch.Generator | None = None, batch_size: int = 1024,
                        steps: int | None = None) -> tuple[Tensor, Tensor]:
    """(ELBO, IW) bounds on -log P(q) in nats per image for 8-bit images q (B, C, H, W) of integers
    0..255, with the discretised last step at ``t0``; each (B,)."""
    if model.spec.kind != "image":
        raise ValueError("the discretised bound is defined for 8-bit images only")
    if not 0 < t0 <= model.t_min_high(steps or model.config.trajectory.T):
        raise ValueError(f"t0 must lie in (0, {model.t_min_high(steps or model.config.trajectory.T):g}] "
                         f"(the trained range of the last level); got {t0}")
    qt = model.to_tokens(q.float())
    if ((qt < 0) | (qt > 255) | (qt != qt.round())).any():
        raise ValueError("the discretised bound needs integer pixel values in 0..255")
    y = model.check_labels(y)
    return _batched_bounds(lambda qb, yb: discrete_elbo_terms(model, qb, yb, t0, generator, steps), qt, y,
                           num_trajectories, batch_size)


@torch.no_grad()
def score_samples(model, x: Tensor, y: Tensor | None = None, num_trajectories: int = 16,
                  generator: torch.Generator | None = None, batch_size: int = 4096, steps: int | None = None,
                  progress=None) -> dict[str, Tensor]:
    """Per-sample likelihood scores of an NTM on raw x (B, ...), from K = ``num_trajectories``
    trajectories per sample drawn in the same order as :func:`nll_bounds` (same generator: same bounds).

    Returns tensors on the CPU: ``elbo`` and ``iw`` (B,), the ELBO and importance-weighted bounds on
    -log p(x_0) in nats (raw units); ``nll`` = ``iw`` (the tightest); ``step_terms`` (B, T), the
    K-average of -log p(x_{t_{k-1}} | x_{t_k}) + log q(x_{t_k} | x_{t_{k-1}}) for k = 1..T, and
    ``step_logdets`` (B, T), the K-average of the transporter's log|det df_T/dx| inside each step's
    log p; ``prior_term`` (B,), the K-average of -log N(x_1; 0, I) (standardised units), so that
    elbo = step_terms.sum(1) + prior_term + ``log_scale_correction``; for images also ``bpd`` and
    ``iw_bpd``. ``progress``, if given, is called with the number of samples after each batch.
    """
    x0, y = _prepare(model, x, y)
    K = num_trajectories
    parts: dict[str, list] = {"elbo": [], "iw": [], "step_terms": [], "step_logdets": [], "prior_term": []}
    for lo in range(0, x0.shape[0], batch_size):
        xb = x0[lo:lo + batch_size]
        yb = None if y is None else y[lo:lo + batch_size]
        terms, priors, logdets = [], [], []
        for _ in range(K):
            _, log_p, log_q, log_prior = _elbo_parts(model, xb, yb, generator, steps, logdets=logdets)
            terms.append(log_q - log_p)
            priors.append(-log_prior)
        terms_k, priors_k = torch.stack(terms), torch.stack(priors)  # (K, b, T), (K, b)
        w = -(terms_k.sum(2) + priors_k)  # log weights (K, b)
        parts["elbo"].append(-w.mean(0))
        parts["iw"].append(iw_bound(w))
        parts["step_terms"].append(terms_k.mean(0))
        parts["step_logdets"].append(torch.stack(logdets).mean(0))
        parts["prior_term"].append(priors_k.mean(0))
        if progress is not None:
            progress(xb.shape[0])
    c = log_scale_correction(model.spec)
    out = {k: torch.cat(v).float().cpu() for k, v in parts.items()}
    out["elbo"], out["iw"] = out["elbo"] + c, out["iw"] + c
    out["nll"] = out["iw"]
    if model.spec.kind == "image":
        out["bpd"], out["iw_bpd"] = bits_per_dim(out["elbo"], model.spec.dim), bits_per_dim(out["iw"], model.spec.dim)
    return out


@torch.no_grad()
def class_step_terms(model, x: Tensor, num_trajectories: int = 16, generator: torch.Generator | None = None,
                     batch_size: int = 4096, steps: int | None = None, progress=None) -> tuple[Tensor, Tensor]:
    """The step terms of every class y of a class-conditional NTM on raw x (B, ...), from the same
    K trajectories per sample for every class, drawn in the order of :func:`score_samples`.
    -> (terms (K, B, C, T): log q(x_{t_k} | x_{t_{k-1}}) - log p(x_{t_{k-1}} | x_{t_k}, y = c) for
    k = 1..T, prior (K, B): -log N(x_1; 0, I)), standardised units. The transporter (which takes no
    label) runs once per trajectory, the predictor once per class. ``progress``, if given, is called
    with B_batch * C after each batch."""
    C = model.spec.num_classes
    if C == 0:
        raise ValueError("Bayes classification needs a class-conditional model; this one has no class labels")
    x0, _ = _prepare(model, x, None)
    classes = torch.arange(C, device=x0.device)
    terms, priors = [], []
    for lo in range(0, x0.shape[0], batch_size):
        xb = x0[lo:lo + batch_size]
        tk, pk = [], []
        for _ in range(num_trajectories):
            t, X, log_q, log_prior = _draw_trajectory(model, xb, generator, steps)
            tk.append(log_q[:, None] - model.class_trajectory_log_probs(X, t, classes))  # (b, C, T)
            pk.append(-log_prior)
        terms.append(torch.stack(tk))
        priors.append(torch.stack(pk))
        if progress is not None:
            progress(xb.shape[0] * C)
    return torch.cat(terms, 1).float().cpu(), torch.cat(priors, 1).float().cpu()


def _totals(terms: Tensor, prior: Tensor, level: int = 0) -> Tensor:
    """Per-trajectory sums (K, B, ...) of the step terms (K, B, ..., T) from ``level`` up and the prior
    terms (K, B)."""
    T = terms.shape[-1]
    if not 0 <= level < T:
        raise ValueError(f"level must be in 0..{T - 1} for a {T}-step trajectory; got {level}")
    return terms[..., level:].sum(-1) + prior.reshape(prior.shape + (1,) * (terms.dim() - prior.dim() - 1))


def iw_of_terms(terms: Tensor, prior: Tensor) -> Tensor:
    """The importance-weighted bound (B, ...) from per-trajectory step terms (K, B, ..., T) and prior
    terms (K, B): -log mean_k exp(-(sum of the terms + prior))."""
    return iw_bound(-_totals(terms, prior).double()).float()


def level_bound_of_terms(terms: Tensor, prior: Tensor, level: int = 1) -> Tensor:
    """The bound (B, ...) on -log p(x_{t_level}) averaged over the K trajectories, from per-trajectory
    step terms (K, B, ..., T) and prior terms (K, B): the steps above ``level`` and the prior
    (standardised units; level 0 is the ELBO bound). Each trajectory draws its own x_{t_level}, so
    the K draws are averaged (no importance weighting)."""
    return _totals(terms, prior, level).mean(0)


def discrete_bits_per_dim(nats: float | Tensor, dim: int):
    """A discrete NLL in nats per image -> bits per dimension."""
    return nats / (dim * math.log(2))


def nll_bound(model, x: Tensor, y: Tensor | None = None, num_trajectories: int = 16,
              importance_weighted: bool = False, generator: torch.Generator | None = None,
              batch_size: int = 4096, steps: int | None = None) -> Tensor:
    """Per-sample upper bound on -log p(x_0) in nats, raw units. x: raw (B, ...). -> (B,)"""
    elbo, iw = nll_bounds(model, x, y, num_trajectories, generator, batch_size, steps)
    return iw if importance_weighted else elbo


def likelihood_report(model, x: Tensor, y: Tensor | None = None, num_trajectories: int = 16,
                      steps: int | None = None, t_min: float | None = None, by_step: bool = False,
                      generator: torch.Generator | None = None) -> dict:
    """Everything ``ntm eval`` prints for an NTM on raw data x (B, ...): the ELBO and IW bounds of
    -log p(x_0) (means and standard errors, nats per sample, raw units), the exact NLL of one
    trajectory, bits/dim for images, and optionally the per-step split (4 more trajectories)."""
    if steps is not None and model.multi_T and steps not in model.train_Ts:
        raise ValueError(f"this model was trained for T in {list(model.train_Ts)}; got {steps} steps")
    elbo, iw = nll_bounds(model, x, y=y, num_trajectories=num_trajectories, generator=generator, steps=steps)
    traj = trajectory_nll(model, x, y=y, generator=generator, steps=steps, t_min=t_min)
    m = x.shape[0]
    se = (lambda v: float(v.std() / math.sqrt(m)) if m > 1 else None)  # noqa: E731
    res = {"n": m, "nll_bound_nats": float(elbo.mean()), "nll_bound_se": se(elbo),
           "iw_bound_nats": float(iw.mean()), "iw_bound_se": se(iw), "trajectory_nll_nats": float(traj.mean()),
           "trajectories": num_trajectories, "steps": steps or model.config.trajectory.T,
           "trajectory_t_min": model.config.trajectory.sample_t_min if t_min is None else t_min,
           "conditional": y is not None}
    if model.spec.kind == "image":
        res["bits_per_dim"] = float(bits_per_dim(res["nll_bound_nats"], model.spec.dim))
        res["iw_bits_per_dim"] = float(bits_per_dim(res["iw_bound_nats"], model.spec.dim))
    if by_step:
        res["by_step"] = bound_by_step(model, x, y=y, num_trajectories=4, generator=generator, steps=steps)
    return res


def hadamard_gap(J: Tensor, logabsdet: Tensor | float | None = None) -> Tensor:
    """0.5 [sum_i log (J J^T)_ii - log det J J^T] / d for a square Jacobian J (d, d), in nats per
    dimension (``logabsdet``: log|det J| when already known). It is >= 0 (Hadamard's inequality), 0
    exactly when J's rows are orthogonal (for a triangular J: when J is diagonal), and it is the KL
    divergence from N(m, c^2 J J^T) to the closest diagonal Gaussian, for every c."""
    J = J.double()
    if logabsdet is None:
        logabsdet = torch.linalg.slogdet(J)[1]
    return 0.5 * (J.square().sum(1).log().sum() - 2 * torch.as_tensor(logabsdet, dtype=J.dtype)) / J.shape[0]


def coupling_gap(model, x: Tensor, steps: int | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The price each reverse step pays for the transporter's coupling between dimensions, on raw x (B, ...).

    Once a step is fine, q(x_s | x_t) is nearly N(m, C^2 I) (the data's share of its covariance
    shrinks as B^2 against C^2), so in u-space it is N(f_T(m, s), C^2 J J^T) with J = df_T/dx at level
    s, while the predictor's Gaussian is diagonal: the step pays at least the Hadamard gap of J
    (:func:`hadamard_gap`), whatever its size. On a trajectory of T levels that floor is paid at each
    noisy level, so a finer grid pays it more often. -> (t (T,) the target levels t_0 ... t_{T-1},
    gap (B, T) nats per dimension), from one forward trajectory per sample; the Jacobian of f_T at
    each level is built by autograd (d backward passes: meant for small images and a few samples).
    """
    x0, _ = _prepare(model, x, None)
    T = steps or model.config.trajectory.T
    t = model.grid(x0.shape[0], 0.0, T=T)
    with torch.no_grad():
        X = forward_trajectory(x0, t, generator=generator)
    shape, TT = x0.shape[1:], model.steps_tensor(1, T)
    gaps = torch.zeros(x0.shape[0], T, dtype=torch.float64)
    for i in range(x0.shape[0]):
        for k in range(T):
            level = t[i, k:k + 1]
            J = torch.autograd.functional.jacobian(
                lambda z: model.transporter(z.view(1, *shape), level, TT)[0].reshape(-1), X[i, k].reshape(-1),
                vectorize=True)
            with torch.no_grad():
                logabsdet = model.transporter(X[i, k][None], level, TT)[1][0]
            gaps[i, k] = hadamard_gap(J, logabsdet)
    return t[0, :T].cpu(), gaps
