"""The Normalizing Trajectory Model: transporter f_T + predictor f_P + the exact per-step density.

For a reverse step s < t (paper Eq. 3.3), with u = f_T(x, level time):

    log p(x_s | x_t, y) = log N(f_T(x_s, s); mu_P, diag sigma_P^2) + log|det df_T/dx (x_s, s)|,
    (mu_P, sigma_P) = f_P(f_T(x_t, t), t, s, y).

The model works on standardised tokens (B, N, D); ``DataSpec`` maps raw data in and out, and all
reported likelihoods are converted back to raw data units. The model holds the networks and the
density only; training objectives live in ``ntm.train.objectives``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .base import TokenModel
from .config import NTMConfig
from .denoising import Denoiser, load_denoiser
from .guidance import product_rule
from .io import run_dir_of
from .likelihood import nll_bound, score_samples, trajectory_nll
from .predictor import build_predictor, gaussian_log_prob
from .sampling import sample
from .text import cat_conditions, null_condition
from .trajectory import first_level, time_grid
from .transporter import Transporter


@dataclass
class StepOutput:
    """Everything one batch of reverse steps computes, M steps of tokens (N, D).

    u_s = f_T(x_s, s) (M, N, D), logdet = log|det df_T/dx (x_s, s)| (M,), the predictor's input
    u_t = f_T(x_t, t) (M, N, D) and its Gaussian (mu, sigma) of u_s (M, N, D). All fp32.
    """

    u_s: Tensor
    logdet: Tensor
    mu: Tensor
    sigma: Tensor
    u_t: Tensor

    def log_prob(self) -> Tensor:
        """Exact log p(x_s | x_t, y) per step (M,)."""
        return gaussian_log_prob(self.u_s, self.mu, self.sigma) + self.logdet


class NTM(TokenModel):
    """A Normalizing Trajectory Model.

    ``predictor`` may be replaced by any module with the signature
    ``(u_t (B, N, D), t (B,), s (B,), y (B,) | None, T (B,) | None) -> (mu, sigma)`` (e.g. a
    closed-form reference).
    """

    FORMAT = "ntm"
    CONFIG = NTMConfig

    def __init__(self, config: NTMConfig, predictor: nn.Module | None = None):
        super().__init__()
        self.config = config
        spec = config.data
        self.transporter = Transporter(config.transporter, spec.num_tokens, spec.token_dim, multi_T=self.multi_T)
        self.predictor = predictor if predictor is not None else build_predictor(config.predictor, spec, self.multi_T)
        self._denoiser: tuple[Denoiser, ...] = ()  # kept out of the state dict: it is its own artifact

    # ----------------------------------------------------------------------------------- helpers
    @property
    def shift_setting(self) -> float | None:
        return self.config.trajectory.shift

    @property
    def multi_T(self) -> bool:
        return len(self.config.trajectory.train_Ts) > 0

    @property
    def train_Ts(self) -> tuple[int, ...]:
        tc = self.config.trajectory
        return tuple(tc.train_Ts) if tc.train_Ts else (tc.T,)

    def grid(self, batch: int, t_min: Tensor | float, T: int | None = None) -> Tensor:
        """Trajectory times (B, T + 1), ascending from t_min to 1."""
        T = T or self.config.trajectory.T
        if isinstance(t_min, Tensor) and t_min.numel() == 0:
            return torch.zeros(0, T + 1, device=self.device)
        t = time_grid(T, t_min, self.time_shift, batch=batch)
        return t.to(self.device)

    def t_min_high(self, T: int) -> float:
        """Upper end of the training t_min range for T steps: min(t_min_high, t_1(T) / 2)."""
        return min(self.config.trajectory.t_min_high, 0.5 * first_level(T, self.time_shift))

    def steps_tensor(self, batch: int, T: int) -> Tensor | None:
        """The T input of multi-T networks, (B,) float; None for single-T models."""
        return torch.full((batch,), float(T), device=self.device) if self.multi_T else None

    # ------------------------------------------------------------------------------- denoiser
    @property
    def denoiser(self) -> Denoiser | None:
        """The distilled g_phi of this run (``ntm distill``), or None."""
        return self._denoiser[0] if self._denoiser else None

    def attach_denoiser(self, denoiser: Denoiser | None) -> None:
        """Use ``denoiser`` for ``decode="denoiser"`` (None detaches it); it is not a submodule, so the
        NTM's own state dict does not change."""
        self._denoiser = () if denoiser is None else (denoiser,)

    def after_load(self, path: Path, meta: dict) -> None:
        run = run_dir_of(path)
        if run is not None:
            self.attach_denoiser(load_denoiser(run, self.spec, step=meta.get("step")))

    # ---------------------------------------------------------------------------------- density
    def predict(self, u_t: Tensor, t: Tensor, s: Tensor, y: Tensor | None = None, guidance: float = 0.0,
                T: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(mu_P, sigma_P) of u_s (B, N, D), with product-rule guidance of scale ``guidance`` when y is given."""
        if guidance < 0 or guidance != guidance:
            raise ValueError(f"the guidance scale must be >= 0, got {guidance}")
        if y is None or guidance == 0.0:
            return self.predictor(u_t, t, s, y, T)
        B = u_t.shape[0]
        TT = None if T is None else torch.cat([T, T])
        mu, sigma = self.predictor(torch.cat([u_t, u_t]), torch.cat([t, t]), torch.cat([s, s]),
                                   cat_conditions(y, null_condition(y, self.spec.num_classes)), TT)
        return product_rule(mu[:B], sigma[:B], mu[B:], sigma[B:], guidance)

    def step(self, x_s: Tensor, x_t: Tensor, s: Tensor, t: Tensor, y: Tensor | None = None,
             T: Tensor | None = None) -> StepOutput:
        """The reverse step x_t -> x_s for standardised tokens x_s, x_t (B, N, D); s, t (B,).

        T (B,) is the trajectory length, needed only by multi-T models (default: the configured T).
        """
        if T is None and self.multi_T:
            T = self.steps_tensor(x_s.shape[0], self.config.trajectory.T)
        B = x_s.shape[0]
        TT = None if T is None else torch.cat([T, T])
        U, logdets = self.transporter(torch.cat([x_s, x_t]), torch.cat([s, t]), TT)  # one pass for both levels
        mu, sigma = self.predictor(U[B:], t, s, y, T)
        return StepOutput(U[:B], logdets[:B], mu, sigma, U[B:])

    def step_log_prob(self, x_s: Tensor, x_t: Tensor, s: Tensor, t: Tensor, y: Tensor | None = None,
                      T: Tensor | None = None) -> Tensor:
        """Exact log p(x_s | x_t, y) (B,) for standardised tokens x_s, x_t (B, N, D); s, t (B,)."""
        return self.step(x_s, x_t, s, t, y, T).log_prob()

    def trajectory_steps(self, X: Tensor, t: Tensor, y: Tensor | None = None) -> StepOutput:
        """All T reverse steps of trajectories X (B, T + 1, N, D) at times t (B, T + 1) in one batched
        pass, as B * T steps ordered (sample, step k = 1..T).

        f_T runs once on levels 0..T-1 (each is the target of step k and the input of step k + 1);
        level T (t = 1) is the identity.
        """
        T = t.shape[1] - 1
        U, logdet, u_t, TT = self._transport_levels(X, t)
        yk = None if y is None else y.repeat_interleave(T)
        mu, sigma = self.predictor(u_t, t[:, 1:].reshape(-1), t[:, :T].reshape(-1), yk, TT)
        return StepOutput(U, logdet, mu, sigma, u_t)

    def _transport_levels(self, X: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The class-free half of ``trajectory_steps``: (u_s (B T, N, D), logdet (B T,), u_t (B T, N, D), T input)."""
        B, K = t.shape
        T = K - 1
        shape = X.shape[2:]
        TT = self.steps_tensor(B * T, T)
        U, logdet = self.transporter(X[:, :T].reshape((B * T,) + shape), t[:, :T].reshape(-1), TT)
        inputs = torch.cat([U.reshape((B, T) + shape)[:, 1:], X[:, T:].float()], dim=1)  # u_{t_k}, k = 1..T
        return U, logdet, inputs.reshape((B * T,) + shape), TT

    def class_trajectory_log_probs(self, X: Tensor, t: Tensor, classes: Tensor) -> Tensor:
        """log p(x_{t_{k-1}} | x_{t_k}, y = c) (B, C, T) for each class c of ``classes`` (C,): as
        ``trajectory_log_probs`` once per class, but f_T (which takes no label) runs only once."""
        B, T = t.shape[0], t.shape[1] - 1
        U, logdet, u_t, TT = self._transport_levels(X, t)
        out = []
        for c in classes.tolist():
            yk = torch.full((B * T,), int(c), dtype=torch.long, device=X.device)
            mu, sigma = self.predictor(u_t, t[:, 1:].reshape(-1), t[:, :T].reshape(-1), yk, TT)
            out.append(StepOutput(U, logdet, mu, sigma, u_t).log_prob().reshape(B, T))
        return torch.stack(out, 1)

    def trajectory_log_probs(self, X: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(x_{t_{k-1}} | x_{t_k}, y) for k = 1..T: X (B, T + 1, N, D), t (B, T + 1) -> (B, T)."""
        return self.trajectory_steps(X, t, y).log_prob().reshape(t.shape[0], t.shape[1] - 1)

    def pair_steps(self, X: Tensor, t: Tensor, k: Tensor, y: Tensor | None = None) -> StepOutput:
        """The reverse step k (B,) in 1..T of each trajectory X (B, T + 1, N, D) at times t (B, T + 1)."""
        rows = torch.arange(X.shape[0], device=X.device)
        TT = self.steps_tensor(X.shape[0], t.shape[1] - 1)
        return self.step(X[rows, k - 1], X[rows, k], t[rows, k - 1], t[rows, k], y, TT)

    def pair_log_prob(self, X: Tensor, t: Tensor, k: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(x_{t_{k-1}} | x_{t_k}, y) for one step k (B,) in 1..T per sample. -> (B,)"""
        return self.pair_steps(X, t, k, y).log_prob()

    # ----------------------------------------------------------------------- public conveniences
    def trajectory_nll(self, x: Tensor, y: Tensor | None = None, t_min: float | None = None,
                       generator: torch.Generator | None = None, steps: int | None = None) -> Tensor:
        """Exact NLL (nats, raw data units) of one sampled forward trajectory per sample. x: raw (B, ...)."""
        return trajectory_nll(self, x, y=y, t_min=t_min, generator=generator, steps=steps)

    def nll_bound(self, x: Tensor, y: Tensor | None = None, num_trajectories: int = 16,
                  importance_weighted: bool = False, generator: torch.Generator | None = None,
                  steps: int | None = None) -> Tensor:
        """Upper bound on -log p(x_0) in nats (raw data units), per sample (B,), with T = ``steps``."""
        return nll_bound(self, x, y=y, num_trajectories=num_trajectories,
                         importance_weighted=importance_weighted, generator=generator, steps=steps)

    def score(self, x: Tensor, y: Tensor | None = None, num_trajectories: int = 16,
              generator: torch.Generator | None = None, steps: int | None = None, batch_size: int = 4096,
              progress=None) -> dict[str, Tensor]:
        """Per-sample scores of raw x (B, ...): the ELBO and IW bounds on -log p(x_0) (``elbo``,
        ``iw``; ``nll`` = ``iw``), bits/dim for images and the per-step terms ``step_terms`` (B, T);
        see :func:`ntm.likelihood.score_samples`."""
        if steps is not None and self.multi_T and steps not in self.train_Ts:
            raise ValueError(f"this model was trained for T in {list(self.train_Ts)}; got {steps} steps")
        return score_samples(self, x, y=y, num_trajectories=num_trajectories, generator=generator,
                             batch_size=batch_size, steps=steps, progress=progress)

    def sample(self, n: int, y: Tensor | None = None, guidance: float = 0.0, steps: int | None = None,
               t_min: float | None = None, generator: torch.Generator | None = None, decode: str = "auto",
               inverse_method: str = "sequential", noise_scale: float = 1.0, prompt=None) -> Tensor:
        """n raw samples (n, ...) in ``steps`` predictor steps (default: the trained T).
        ``prompt`` (text models): one string, n strings, or encoded ``Prompts``, in place of ``y``.

        ``decode``: "inverse" (one transporter inverse), "inverse+score" (inverse of every level and
        trajectory score denoising), "denoiser" (the distilled g_phi; see ``ntm distill``) or "auto"
        (the default: the denoiser when the model has one, else the inverse).
        ``inverse_method``: "sequential" or "jacobi". ``noise_scale`` gamma != 1 scales sigma_P on the
        noisy steps (k >= 2): such samples leave the model's density.
        """
        if prompt is not None:
            y = self.prompt_batch(prompt, n)
        return sample(self, n, y=y, guidance=guidance, steps=steps, t_min=t_min, generator=generator,
                      decode=decode, inverse_method=inverse_method, noise_scale=noise_scale)
