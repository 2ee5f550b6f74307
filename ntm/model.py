"""The Normalizing Trajectory Model: transporter f_T + predictor f_P + the exact per-step density.

For a reverse step s < t (paper Eq. 3.3), with u = f_T(x, level time):

    log p(x_s | x_t, y) = log N(f_T(x_s, s); mu_P, diag sigma_P^2) + log|det df_T/dx (x_s, s)|,
    (mu_P, sigma_P) = f_P(f_T(x_t, t), t, s, y).

The model works on standardised tokens (B, N, D); ``DataSpec`` maps raw data in and out, and all
reported likelihoods are converted back to raw data units.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from . import data as data_mod
from .config import ModelConfig
from .guidance import product_rule
from .predictor import Predictor, gaussian_log_prob
from .trajectory import forward_trajectory, shift_for_length, time_grid
from .transporter import Transporter


class NTM(nn.Module):
    """A Normalizing Trajectory Model.

    ``predictor`` may be replaced by any module with the signature
    ``(u_t (B, N, D), t (B,), s (B,), y (B,) | None) -> (mu, sigma)`` (e.g. a closed-form reference).
    """

    def __init__(self, config: ModelConfig, predictor: nn.Module | None = None):
        super().__init__()
        self.config = config
        spec = config.data
        self.transporter = Transporter(config.transporter, spec.num_tokens, spec.token_dim)
        self.predictor = predictor if predictor is not None else Predictor(
            config.predictor, spec.num_tokens, spec.token_dim, spec.num_classes)

    # ----------------------------------------------------------------------------------- helpers
    @property
    def spec(self):
        return self.config.data

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def time_shift(self) -> float:
        tc = self.config.trajectory
        return tc.shift if tc.shift is not None else shift_for_length(self.spec.num_tokens)

    def grid(self, batch: int, t_min: Tensor | float, T: int | None = None) -> Tensor:
        """Trajectory times (B, T + 1), ascending from t_min to 1."""
        T = T or self.config.trajectory.T
        t = time_grid(T, t_min, self.time_shift, batch=batch)
        return t.to(self.device)

    def to_tokens(self, x: Tensor) -> Tensor:
        return data_mod.to_tokens(x.to(self.device), self.spec)

    def from_tokens(self, z: Tensor) -> Tensor:
        return data_mod.from_tokens(z, self.spec)

    def check_labels(self, y: Tensor | None) -> Tensor | None:
        if y is None:
            return None
        n = self.spec.num_classes
        if n == 0:
            raise ValueError("this model is unconditional; it takes no class label")
        y = y.to(self.device).long()
        if ((y < 0) | (y >= n)).any():
            raise ValueError(f"class labels must lie in [0, {n - 1}]")
        return y

    # ---------------------------------------------------------------------------------- density
    def predict(self, u_t: Tensor, t: Tensor, s: Tensor, y: Tensor | None = None, guidance: float = 0.0):
        """(mu_P, sigma_P) of u_s, with product-rule guidance of scale ``guidance`` when y is given."""
        if y is None or guidance == 0.0:
            return self.predictor(u_t, t, s, y)
        B = u_t.shape[0]
        null = torch.full_like(y, self.spec.num_classes)
        mu, sigma = self.predictor(torch.cat([u_t, u_t]), torch.cat([t, t]), torch.cat([s, s]), torch.cat([y, null]))
        return product_rule(mu[:B], sigma[:B], mu[B:], sigma[B:], guidance)

    def step_log_prob(self, x_s: Tensor, x_t: Tensor, s: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Exact log p(x_s | x_t, y) for standardised tokens x_s, x_t: (B, N, D); s, t: (B,). -> (B,)"""
        u_s, logdet = self.transporter(x_s, s)
        u_t, _ = self.transporter(x_t, t)
        mu, sigma = self.predictor(u_t, t, s, y)
        return gaussian_log_prob(u_s, mu, sigma) + logdet

    def trajectory_log_probs(self, X: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(x_{t_{k-1}} | x_{t_k}, y) for k = 1..T, all steps in one batched pass.

        X: (B, T + 1, N, D) standardised trajectory (ascending times), t: (B, T + 1). -> (B, T).
        f_T runs once on levels 0..T-1 (each is the target of step k and the input of step k + 1);
        level T (t = 1) is the identity.
        """
        B, K = t.shape
        T = K - 1
        shape = X.shape[2:]
        U, logdet = self.transporter(X[:, :T].reshape((B * T,) + shape), t[:, :T].reshape(-1))
        U = U.reshape((B, T) + shape)
        inputs = torch.cat([U[:, 1:], X[:, T:].float()], dim=1)  # u_{t_k}, k = 1..T
        yk = None if y is None else y.repeat_interleave(T)
        mu, sigma = self.predictor(inputs.reshape((B * T,) + shape), t[:, 1:].reshape(-1), t[:, :T].reshape(-1), yk)
        logp = gaussian_log_prob(U.reshape((B * T,) + shape), mu, sigma) + logdet
        return logp.reshape(B, T)

    def pair_log_prob(self, X: Tensor, t: Tensor, k: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(x_{t_{k-1}} | x_{t_k}, y) for one step k (B,) in 1..T per sample. -> (B,)"""
        rows = torch.arange(X.shape[0], device=X.device)
        return self.step_log_prob(X[rows, k - 1], X[rows, k], t[rows, k - 1], t[rows, k], y)

    # ------------------------------------------------------------------------------------ train
    def loss(self, x0: Tensor, y: Tensor | None = None, mode: str = "e2e",
             generator: torch.Generator | None = None) -> Tensor:
        """Training loss: trajectory NLL per sample and dimension (nats), standardised tokens x0 (B, N, D).

        ``e2e`` sums all T step NLLs of each sampled trajectory; ``pairwise`` scores one uniformly drawn
        step per sample, scaled by T (an unbiased estimate of the same sum).
        """
        B = x0.shape[0]
        tc = self.config.trajectory
        dev = x0.device
        t_min = tc.t_min_low + (tc.t_min_high - tc.t_min_low) * torch.rand(B, generator=generator, device=dev)
        t = self.grid(B, t_min)
        if y is not None and self.spec.num_classes > 0 and self.config.class_dropout > 0:
            drop = torch.rand(B, generator=generator, device=dev) < self.config.class_dropout
            y = torch.where(drop, torch.full_like(y, self.spec.num_classes), y)
        X = forward_trajectory(x0, t, generator=generator)
        if mode == "e2e":
            nll = -self.trajectory_log_probs(X, t, y).sum(1)
        elif mode == "pairwise":
            T = t.shape[1] - 1
            k = torch.randint(1, T + 1, (B,), generator=generator, device=dev)
            nll = -T * self.pair_log_prob(X, t, k, y)
        else:
            raise ValueError(f"unknown training mode '{mode}' (use 'e2e' or 'pairwise')")
        return nll.mean() / self.spec.dim

    # ----------------------------------------------------------------------- public conveniences
    def trajectory_nll(self, x: Tensor, y: Tensor | None = None, t_min: float | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
        """Exact NLL (nats, raw data units) of one sampled forward trajectory per sample. x: raw (B, ...)."""
        from .likelihood import trajectory_nll
        return trajectory_nll(self, x, y=y, t_min=t_min, generator=generator)

    def nll_bound(self, x: Tensor, y: Tensor | None = None, num_trajectories: int = 16,
                  importance_weighted: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Upper bound on -log p(x_0) in nats (raw data units), per sample (B,)."""
        from .likelihood import nll_bound
        return nll_bound(self, x, y=y, num_trajectories=num_trajectories,
                         importance_weighted=importance_weighted, generator=generator)

    def sample(self, n: int, y: Tensor | None = None, guidance: float = 0.0, steps: int | None = None,
               t_min: float | None = None, generator: torch.Generator | None = None) -> Tensor:
        """n raw samples (n, ...) in ``steps`` predictor steps (default: the trained T)."""
        from .sampling import sample
        return sample(self, n, y=y, guidance=guidance, steps=steps, t_min=t_min, generator=generator)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device | None = None) -> "NTM":
        """Load a run directory or a checkpoint folder written by training (EMA weights)."""
        from .checkpoint import load_model
        return load_model(path, map_location=map_location)
