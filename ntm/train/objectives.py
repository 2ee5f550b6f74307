"""Training objectives: each is a module holding the model it trains, with

    objective.draw_noise(batch, generator, device) -> noise     (every random choice of a batch, shardable)
    objective(x0 (B, N, D), y (B,) | None, noise, progress) -> (loss, parts)

``progress`` in [0, 1] is the share of training done (for scheduled weights); ``parts`` is a dict of
floats that the fit loop logs. DDP and FSDP wrap the objective, so everything it computes is in the
one forward pass they see. ``objective.model`` is the module that is trained and saved.

* :class:`NTMObjective`: the paper's trajectory NLL (Eq. 3.4), end-to-end over all T steps or
  pair-wise (one uniformly drawn step, scaled by T: an unbiased estimate of the same sum);
* :class:`FinetuneObjective`: the same plus the mean-alignment loss against a frozen FM teacher;
* :class:`FlowMatchingObjective`: the velocity MSE of the FM baseline;
* :class:`DistillObjective`: the denoiser g_phi regressed on trajectory score denoising targets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import AUX_WEIGHT, DataSpec
from ..denoising import Denoiser, trajectory_score_denoise
from ..flow_matching import FlowMatching
from ..model import NTM, StepOutput
from ..predictor import as_column, posterior_mean_from_velocity
from ..text import Prompts
from ..trajectory import forward_pair, forward_trajectory, posterior_coefficients, rand, randn, shift_time


def drop_labels(y: Tensor | None, drop: Tensor, num_classes: int) -> Tensor | None:
    """Replace the labels where ``drop`` (B,) is true by the null label ``num_classes`` (prompts:
    mark those rows as dropped, i.e. the null prompt)."""
    if isinstance(y, Prompts):
        return y.dropped(drop)
    if y is None or num_classes == 0:
        return y
    return torch.where(drop, torch.full_like(y, num_classes), y)


# ------------------------------------------------------------------------------------------ NTM
@dataclass
class TrainingNoise:
    """All randomness of one NTM training batch, drawn up front so it can be split across processes.

    t_min (B,), T (B,) long trajectory lengths, drop (B,) bool label dropout, eps the trajectory noise:
    e2e (B, T_max + 1, N, D), sample i using its first T_i + 1 levels; pair-wise (B, 2, N, D), the noise
    of the two levels of the scored step (see :func:`forward_pair`); k_unif (B,) in [0, 1) picking the
    step scored in pairwise mode.
    """

    t_min: Tensor
    T: Tensor
    drop: Tensor
    eps: Tensor
    k_unif: Tensor

    def shard(self, lo: int, hi: int) -> "TrainingNoise":
        return TrainingNoise(*(v[lo:hi] for v in (self.t_min, self.T, self.drop, self.eps, self.k_unif)))


@dataclass
class ScoredSteps:
    """The reverse steps scored for a group of samples (e2e: one trajectory length T; pair-wise: the
    whole batch, lengths mixed): M = n * per_sample steps ordered (sample, step). Each step k (M,) goes from level x_t at time t to x_s at time s
    (M, N, D; s, t (M,)) of a trajectory of the clean x0 (M, N, D), with label y (M,); ``weight``
    scales each step (pair-wise mode: each sample's T (M,), else 1)."""

    out: StepOutput
    x_s: Tensor
    x_t: Tensor
    x0: Tensor
    s: Tensor
    t: Tensor
    k: Tensor
    y: Tensor | None
    per_sample: int
    weight: float | Tensor

    def per_sample_sum(self, values: Tensor) -> Tensor:
        """(M,) per-step values -> (n,) weighted sums over each sample's steps."""
        return self.weight * values.reshape(-1, self.per_sample).sum(1)

    def x0_hat(self) -> Tensor:
        """The predictor's own estimate of x_0 inside mu_P = A u_t + B x0_hat, (M, N, D). It lives in
        u-space: the hybrid term compares it with x_0 itself, a regulariser that assumes f_T is close
        to the identity on the noisy levels (where it starts)."""
        A, B, _ = (as_column(c) for c in posterior_coefficients(self.t, self.s))
        return (self.out.mu - A * self.out.u_t) / B


def rao_blackwell_cv(steps: ScoredSteps) -> Tensor:
    """The control variate of each step (M,), zero-mean given (x_t, x_0) for every parameter value:

        cv = sum_{n,d} [ B C (x_0 - x0_hat) eps_post / sigma_P^2 + 1/2 C^2 (eps_post^2 - 1) / sigma_P^2 ],
        eps_post = (x_s - A x_t - B x_0) / C ~ N(0, I) given (x_t, x_0)   (0 where C < 1e-4).

    With an identity transporter, NLL - cv is the NLL's analytic expectation over eps_post. Gradients
    flow through x0_hat and sigma_P (detaching them would break the zero mean)."""
    A, B, C = (as_column(c) for c in posterior_coefficients(steps.t, steps.s))
    usable = C > 1e-4
    eps = torch.where(usable, (steps.x_s - A * steps.x_t - B * steps.x0) / C.clamp_min(1e-4), torch.zeros_like(steps.x_s))
    var = steps.out.sigma.square()
    cv = B * C * (steps.x0 - steps.x0_hat()) * eps / var + 0.5 * C.square() * (eps.square() - 1) / var
    return torch.where(usable, cv, torch.zeros_like(cv)).flatten(1).sum(1)


def hybrid_weight_at(progress: float, weight: float, schedule: str) -> float:
    """lambda(p): constant, or "cosine": constant for p < 1/2, then (1 + cos(pi (2p - 1))) / 2 down to 0."""
    if schedule == "constant" or progress <= 0.5:
        return weight
    p = min(progress, 1.0)
    return weight * 0.5 * (1.0 + math.cos(math.pi * (2 * p - 1)))


class NTMObjective(nn.Module):
    """The trajectory NLL per sample and dimension (nats) of an :class:`NTM`, and its variants.

    ``mode`` "e2e" sums all T step NLLs of each sampled trajectory; "pairwise" scores one step per
    sample, scaled by T (uniform, or ``stratified``: each step gets B/T samples of the batch). Multi-T
    models draw T per sample. ``class_dropout`` replaces that share of labels by the null label.
    ``objective`` "nll" (the paper's) or "nll-rb" (minus :func:`rao_blackwell_cv`: the same
    expectation); ``step_weights`` w_k multiply the step NLLs; ``hybrid_weight`` adds
    lambda(p) sum_{k >= 2} ||x0_hat - x_0||^2 / t_k^2 / dim (see ``TrainConfig``); ``T_weights``
    are the relative frequencies of a multi-T model's lengths (empty: uniform).
    """

    def __init__(self, model: NTM, mode: str = "e2e", class_dropout: float = 0.1, objective: str = "nll",
                 stratified: bool = False, step_weights: tuple[float, ...] = (), hybrid_weight: float = 0.0,
                 hybrid_schedule: str = "constant", T_weights: tuple[float, ...] = ()):
        super().__init__()
        if mode not in ("e2e", "pairwise"):
            raise ValueError(f"unknown training mode '{mode}' (use 'e2e' or 'pairwise')")
        if objective not in ("nll", "nll-rb"):
            raise ValueError(f"unknown objective '{objective}' (use 'nll' or 'nll-rb')")
        if stratified and mode != "pairwise":
            raise ValueError("stratified steps apply to pair-wise training")
        if step_weights and any(T != len(step_weights) for T in model.train_Ts):
            raise ValueError(f"{len(step_weights)} step weights for a model of T in {list(model.train_Ts)}")
        if T_weights and (len(T_weights) != len(model.train_Ts) or min(T_weights) <= 0):
            raise ValueError(f"T weights {list(T_weights)} for a model of T in {list(model.train_Ts)} "
                             "(one weight > 0 per length)")
        self.model = model
        self.mode = mode
        self.class_dropout = class_dropout
        self.objective = objective
        self.stratified = stratified
        self.step_weights = tuple(step_weights)
        self.hybrid_weight = hybrid_weight
        self.hybrid_schedule = hybrid_schedule
        self.T_weights = tuple(T_weights)

    @classmethod
    def from_config(cls, model: NTM, cfg) -> "NTMObjective":
        """The objective a ``TrainConfig`` names."""
        return cls(model, cfg.mode, cfg.class_dropout, cfg.objective, cfg.stratified, cfg.step_weights,
                   cfg.hybrid_weight, cfg.hybrid_schedule, cfg.T_weights)

    @property
    def spec(self) -> DataSpec:
        return self.model.spec

    def draw_noise(self, batch: int, generator: torch.Generator | None = None,
                   device: torch.device | None = None) -> TrainingNoise:
        """Every random choice of a training batch (see :class:`TrainingNoise`)."""
        m = self.model
        tc = m.config.trajectory
        dev = device or m.device
        Ts = torch.tensor(m.train_Ts, device=dev)
        u = rand((batch,), generator, dev)
        if self.T_weights:  # the length whose share of the cumulative weights holds u
            edges = torch.tensor(self.T_weights, device=dev, dtype=torch.float64).cumsum(0)
            T = Ts[torch.searchsorted((edges / edges[-1]).to(u.dtype)[:-1].contiguous(), u, right=True)]
        else:
            T = Ts[(u * len(Ts)).long().clamp(max=len(Ts) - 1)]
        # t_min ~ U[lo, hi_T] with hi_T = min(t_min_high, t_1(T) / 2), so t_0 < t_1 even for long grids
        hi = torch.tensor([m.t_min_high(int(v)) for v in m.train_Ts], device=dev)[
            (T[:, None] == Ts[None]).float().argmax(1)]
        t_min = tc.t_min_low + (hi - tc.t_min_low).clamp_min(0) * rand((batch,), generator, dev)
        drop = rand((batch,), generator, dev) < self.class_dropout
        levels = 2 if self.mode == "pairwise" else int(Ts.max()) + 1  # pair-wise: only the scored step's levels
        eps = randn((batch, levels, m.spec.num_tokens, m.spec.token_dim), generator, dev)
        k_unif = rand((batch,), generator, dev)
        if self.stratified:  # the r-th sample of length T scores step (r + offset) mod T: each step B_T / T times
            offset = torch.floor(k_unif[:1] * T.float())
            rank = torch.zeros(batch, device=dev)
            for v in m.train_Ts:
                group = T == v
                rank[group] = torch.arange(int(group.sum()), device=dev, dtype=rank.dtype)
            k_unif = (torch.remainder(rank + offset, T.float()) + 0.5) / T.float()
        return TrainingNoise(t_min, T, drop, eps, k_unif)

    def scored_steps(self, x0: Tensor, y: Tensor | None, noise: TrainingNoise, idx: Tensor, T: int) -> ScoredSteps:
        """e2e mode: draw the trajectories of samples ``idx`` (all of length T) and score all their steps."""
        m = self.model
        yi = None if y is None else y[idx]
        t = m.grid(len(idx), noise.t_min[idx], T=T)
        X = forward_trajectory(x0[idx], t, noise=noise.eps[idx, : T + 1])
        shape = X.shape[2:]
        out = m.trajectory_steps(X, t, yi)
        k = torch.arange(1, T + 1, device=X.device).repeat(len(idx))
        return ScoredSteps(out, X[:, :T].reshape((-1,) + shape), X[:, 1:].reshape((-1,) + shape),
                           x0[idx].float().repeat_interleave(T, 0), t[:, :T].reshape(-1), t[:, 1:].reshape(-1), k,
                           None if yi is None else yi.repeat_interleave(T), T, 1.0)

    def scored_pairs(self, x0: Tensor, y: Tensor | None, noise: TrainingNoise) -> ScoredSteps:
        """Pair-wise mode: one step k of each sample's trajectory (of its own length T), scored for the
        whole batch in one pass of f_T and the predictor, whatever mix of lengths it holds. Only the
        step's two levels are drawn (:func:`forward_pair`)."""
        m = self.model
        B = x0.shape[0]
        s, t, k = x0.new_empty(B).float(), x0.new_empty(B).float(), noise.T.clone()
        for T in m.train_Ts:  # each length's grid and scored step k, put back in batch order
            idx = (noise.T == T).nonzero().squeeze(1)
            times = m.grid(len(idx), noise.t_min[idx], T=T)
            kk = (noise.k_unif[idx] * T).long().clamp(max=T - 1) + 1
            rows = torch.arange(len(idx), device=times.device)
            s[idx], t[idx], k[idx] = times[rows, kk - 1], times[rows, kk], kk
        x_s, x_t = forward_pair(x0, s, t, noise.eps)
        out = m.step(x_s, x_t, s, t, y, noise.T.float() if m.multi_T else None)
        return ScoredSteps(out, x_s, x_t, x0.float(), s, t, k, y, 1, noise.T.float())

    def step_losses(self, steps: ScoredSteps) -> tuple[Tensor, Tensor]:
        """(the NLL of each step (M,), the training loss of each step (M,): weighted, minus the
        control variate for "nll-rb")."""
        nll = -steps.out.log_prob()
        loss = nll - rao_blackwell_cv(steps) if self.objective == "nll-rb" else nll
        if self.step_weights:
            loss = loss * torch.tensor(self.step_weights, device=loss.device)[steps.k - 1]
        return nll, loss

    def extra_terms(self, steps: ScoredSteps, progress: float) -> dict[str, Tensor]:
        """Further loss terms per sample (n,), before the weights of :meth:`term_weights`."""
        if self.hybrid_weight == 0:
            return {}
        err = (steps.x0_hat() - steps.x0).square().flatten(1).sum(1) / steps.t.square()
        return {"hybrid": steps.per_sample_sum(torch.where(steps.k >= 2, err, torch.zeros_like(err)))}

    def term_weights(self, progress: float) -> dict[str, float]:
        return {"hybrid": hybrid_weight_at(progress, self.hybrid_weight, self.hybrid_schedule)}

    def forward(self, x0: Tensor, y: Tensor | None, noise: TrainingNoise, progress: float = 0.0):
        """x0 (B, N, D) standardised tokens -> (loss, parts): loss = the (variance-reduced, weighted)
        NLL / dim + weighted extra terms; parts["nll"] is the plain NLL / dim of the same steps."""
        m = self.model
        B = x0.shape[0]
        y = drop_labels(y, noise.drop, m.spec.num_classes)
        nll = torch.zeros(B, device=x0.device)
        base = torch.zeros(B, device=x0.device)
        extras: dict[str, Tensor] = {}
        # pair-wise: one pass for the whole batch; e2e: one per trained length, in a fixed order (empty
        # groups included) so that the sequence of forward passes is identical on every process, which
        # FSDP's collectives require
        if self.mode == "e2e":
            groups = (((noise.T == T).nonzero().squeeze(1), T) for T in m.train_Ts)
        else:
            groups = ((torch.arange(B, device=x0.device), None),)
        for idx, T in groups:
            steps = self.scored_steps(x0, y, noise, idx, T) if T else self.scored_pairs(x0, y, noise)
            step_nll, step_loss = self.step_losses(steps)
            nll = nll.index_put((idx,), steps.per_sample_sum(step_nll))
            base = base.index_put((idx,), steps.per_sample_sum(step_loss))
            for name, value in self.extra_terms(steps, progress).items():
                extras[name] = extras.get(name, torch.zeros(B, device=x0.device)).index_put((idx,), value)
        loss = base.mean() / m.spec.dim
        parts = {"nll": float(nll.mean().detach()) / m.spec.dim}
        weights = self.term_weights(progress)
        for name, value in extras.items():
            term = value.mean() / m.spec.dim
            parts[name] = float(term.detach())
            parts[f"{name}_weight"] = weights[name]
            if weights[name] > 0:
                loss = loss + weights[name] * term
        return loss, parts


def aux_weight_at(progress: float, weight: float) -> float:
    """Cosine decay of the mean-alignment weight: weight (1 + cos(pi p)) / 2, p in [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    return weight * 0.5 * (1.0 + math.cos(math.pi * p))


class FinetuneObjective(NTMObjective):
    """The NTM objective plus the mean-alignment loss against a frozen flow-matching teacher
    (paper §3.3) working in x-space:

        L_aux = lambda(p) sum_k || mu_P^(k) - mu_FM^(k) ||^2 / dim,   mu_FM = A x_t + B (x_t - t v_teacher(x_t, t, y)),

    with lambda(p) = ``aux_weight`` (1 + cos(pi p)) / 2 over training progress p. The teacher is held
    here, frozen and out of the trained model.
    """

    def __init__(self, model: NTM, teacher: FlowMatching, aux_weight: float = AUX_WEIGHT, mode: str = "e2e",
                 class_dropout: float = 0.1, **objective_options):
        super().__init__(model, mode, class_dropout, **objective_options)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher.eval()
        self.aux_weight = aux_weight

    def extra_terms(self, steps: ScoredSteps, progress: float) -> dict[str, Tensor]:
        terms = super().extra_terms(steps, progress)
        if self.aux_weight == 0:
            return terms
        with torch.no_grad():
            v = self.teacher.velocity(steps.x_t, steps.t, steps.y).float()
            target = posterior_mean_from_velocity(v, steps.x_t.float(), steps.t, steps.s)
        return {**terms, "aux": steps.per_sample_sum((steps.out.mu - target).pow(2).flatten(1).sum(1))}

    def term_weights(self, progress: float) -> dict[str, float]:
        return {**super().term_weights(progress), "aux": aux_weight_at(progress, self.aux_weight)}


# ------------------------------------------------------------------------------- flow matching
@dataclass
class FlowNoise:
    """All randomness of one flow-matching batch: t (B,), eps (B, N, D), drop (B,) label dropout."""

    t: Tensor
    eps: Tensor
    drop: Tensor

    def shard(self, lo: int, hi: int) -> "FlowNoise":
        return FlowNoise(self.t[lo:hi], self.eps[lo:hi], self.drop[lo:hi])


class FlowMatchingObjective(nn.Module):
    """Velocity MSE per sample and dimension, || v(x_t, t, y) - (eps - x_0) ||^2 / dim, with training
    times t = shift(u), u ~ U[0, 1] (the model's time shift)."""

    def __init__(self, model: FlowMatching, class_dropout: float = 0.1):
        super().__init__()
        self.model = model
        self.class_dropout = class_dropout

    @property
    def spec(self) -> DataSpec:
        return self.model.spec

    def draw_noise(self, batch: int, generator: torch.Generator | None = None,
                   device: torch.device | None = None) -> FlowNoise:
        m = self.model
        dev = device or m.device
        t = shift_time(rand((batch,), generator, dev), m.time_shift)
        eps = randn((batch, m.spec.num_tokens, m.spec.token_dim), generator, dev)
        drop = rand((batch,), generator, dev) < self.class_dropout
        return FlowNoise(t, eps, drop)

    def forward(self, x0: Tensor, y: Tensor | None, noise: FlowNoise, progress: float = 0.0):
        m = self.model
        y = drop_labels(y, noise.drop, m.spec.num_classes)
        tt = noise.t.reshape(-1, 1, 1)
        x_t = (1 - tt) * x0 + tt * noise.eps
        v = m.velocity(x_t, noise.t, y)
        loss = ((v - (noise.eps - x0)) ** 2).flatten(1).sum(1).mean() / m.spec.dim
        return loss, {"mse": float(loss.detach())}


# ------------------------------------------------------------------------------------- denoiser
@dataclass
class DistillNoise:
    """Randomness of one distillation batch: t_min (B,) and trajectory noise eps (B, T + 1, N, D)."""

    t_min: Tensor
    eps: Tensor

    def shard(self, lo: int, hi: int) -> "DistillNoise":
        return DistillNoise(self.t_min[lo:hi], self.eps[lo:hi])


class DistillObjective(nn.Module):
    """MSE per dimension between g_phi(f_T(x_{t_0}, t_0), t_0, y) and the trajectory score denoising
    estimate of x_0 from the frozen NTM, on forward trajectories of real data (t_0 ~ U[t_min_low,
    t_min_high], as in training). ``model`` is the denoiser; the NTM is held frozen."""

    def __init__(self, ntm: NTM, denoiser: Denoiser, clip_percentile: float | None = None):
        super().__init__()
        for p in ntm.parameters():
            p.requires_grad_(False)
        self.ntm = ntm.eval()
        self.model = denoiser
        self.clip_percentile = clip_percentile
        if ntm.spec.is_text:  # the denoiser's null prompt is the NTM's
            source = next(mod for mod in ntm.modules() if getattr(mod, "text_dim", 0))
            denoiser.set_null_prompt(source.null_tokens, source.null_mask, source.null_pooled)

    @property
    def spec(self) -> DataSpec:
        return self.ntm.spec

    def draw_noise(self, batch: int, generator: torch.Generator | None = None,
                   device: torch.device | None = None) -> DistillNoise:
        m = self.ntm
        tc = m.config.trajectory
        dev = device or m.device
        t_min = tc.t_min_low + (m.t_min_high(tc.T) - tc.t_min_low) * rand((batch,), generator, dev)
        eps = randn((batch, tc.T + 1, m.spec.num_tokens, m.spec.token_dim), generator, dev)
        return DistillNoise(t_min, eps)

    def forward(self, x0: Tensor, y: Tensor | None, noise: DistillNoise, progress: float = 0.0):
        m = self.ntm
        B = x0.shape[0]
        y = None if m.spec.num_classes == 0 and not m.spec.is_text else y
        t = m.grid(B, noise.t_min)
        X = forward_trajectory(x0, t, noise=noise.eps)
        target = trajectory_score_denoise(m, X, t, y, self.clip_percentile)
        with torch.no_grad():
            u0, _ = m.transporter(X[:, 0], t[:, 0], m.steps_tensor(B, m.config.trajectory.T))
        loss = ((self.model(u0, t[:, 0], y) - target) ** 2).flatten(1).sum(1).mean() / m.spec.dim
        return loss, {"mse": float(loss.detach())}
