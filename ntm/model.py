"""The Normalizing Trajectory Model: transporter f_T + predictor f_P + the exact per-step density.

For a reverse step s < t (paper Eq. 3.3), with u = f_T(x, level time):

    log p(x_s | x_t, y) = log N(f_T(x_s, s); mu_P, diag sigma_P^2) + log|det df_T/dx (x_s, s)|,
    (mu_P, sigma_P) = f_P(f_T(x_t, t), t, s, y).

The model works on standardised tokens (B, N, D); ``DataSpec`` maps raw data in and out, and all
reported likelihoods are converted back to raw data units.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import data as data_mod
from .config import ModelConfig
from .errors import CheckpointError
from .guidance import product_rule
from .predictor import Predictor, gaussian_log_prob
from .trajectory import first_level, forward_trajectory, rand, randn, shift_for_length, time_grid
from .transporter import Transporter


@dataclass
class TrainingNoise:
    """All randomness of one training batch, drawn up front so it can be split across processes.

    t_min (B,), T (B,) long trajectory lengths, drop (B,) bool label dropout, eps (B, T_max + 1, N, D)
    trajectory noise (sample i uses its first T_i + 1 levels), k_unif (B,) in [0, 1) picking the step
    scored in pairwise mode.
    """

    t_min: Tensor
    T: Tensor
    drop: Tensor
    eps: Tensor
    k_unif: Tensor

    def shard(self, lo: int, hi: int) -> "TrainingNoise":
        return TrainingNoise(*(v[lo:hi] for v in (self.t_min, self.T, self.drop, self.eps, self.k_unif)))


class TokenModel(nn.Module):
    """What every generator here shares: a config, a data layout, token conversion, label checks and
    one-call loading. Subclasses: :class:`NTM` and :class:`ntm.flow_matching.FlowMatching`."""

    config: ModelConfig

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

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device | None = None):
        """Load a run directory or a checkpoint folder written by training (EMA weights)."""
        from .checkpoint import load_model
        model = load_model(path, map_location=map_location)
        if not isinstance(model, cls):
            raise CheckpointError(f"{path} holds a '{model.config.kind}' model, not {cls.__name__} "
                                  "(ntm.load_model loads either kind)")
        return model


class NTM(TokenModel):
    """A Normalizing Trajectory Model.

    ``predictor`` may be replaced by any module with the signature
    ``(u_t (B, N, D), t (B,), s (B,), y (B,) | None, T (B,) | None) -> (mu, sigma)`` (e.g. a
    closed-form reference). ``forward`` is the training loss, so wrappers such as DDP see it.
    """

    def __init__(self, config: ModelConfig, predictor: nn.Module | None = None):
        super().__init__()
        self.config = config
        spec = config.data
        multi_T = self.multi_T
        self.transporter = Transporter(config.transporter, spec.num_tokens, spec.token_dim, multi_T=multi_T)
        if predictor is None and config.predictor.kind == "velocity":  # started from a flow-matching model
            from .finetune import VelocityPredictor
            from .flow_matching import VelocityField
            pc = config.predictor
            predictor = VelocityPredictor(VelocityField(config), spec.num_tokens, spec.token_dim,
                                          pc.s0_std_floor, pc.log_var_clip, scale=pc.velocity_scale)
        self.predictor = predictor if predictor is not None else Predictor(
            config.predictor, spec.num_tokens, spec.token_dim, spec.num_classes, multi_T=multi_T)
        self.denoiser = None  # the distilled g_phi, attached by from_pretrained when the run has one
        self._teacher: tuple = ()  # finetuning: the frozen FM teacher (kept out of the state dict)
        self.aux_weight_now = 0.0  # finetuning: the current mean-alignment weight (set by the trainer)
        self.last_parts: dict[str, float] = {}

    def set_teacher(self, teacher: nn.Module | None) -> None:
        """Attach the frozen flow-matching teacher of the mean-alignment loss (not saved, not trained)."""
        self._teacher = () if teacher is None else (teacher,)

    # ----------------------------------------------------------------------------------- helpers
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

    # ---------------------------------------------------------------------------------- density
    def predict(self, u_t: Tensor, t: Tensor, s: Tensor, y: Tensor | None = None, guidance: float = 0.0,
                T: Tensor | None = None):
        """(mu_P, sigma_P) of u_s, with product-rule guidance of scale ``guidance`` when y is given."""
        if guidance < 0 or guidance != guidance:
            raise ValueError(f"the guidance scale must be >= 0, got {guidance}")
        if y is None or guidance == 0.0:
            return self.predictor(u_t, t, s, y, T)
        B = u_t.shape[0]
        null = torch.full_like(y, self.spec.num_classes)
        TT = None if T is None else torch.cat([T, T])
        mu, sigma = self.predictor(torch.cat([u_t, u_t]), torch.cat([t, t]), torch.cat([s, s]), torch.cat([y, null]), TT)
        return product_rule(mu[:B], sigma[:B], mu[B:], sigma[B:], guidance)

    def step_log_prob(self, x_s: Tensor, x_t: Tensor, s: Tensor, t: Tensor, y: Tensor | None = None,
                      T: Tensor | None = None, aux: list | None = None) -> Tensor:
        """Exact log p(x_s | x_t, y) for standardised tokens x_s, x_t: (B, N, D); s, t: (B,). -> (B,)

        T (B,) is the trajectory length, needed only by multi-T models.
        """
        if T is None and self.multi_T:
            T = self.steps_tensor(x_s.shape[0], self.config.trajectory.T)
        B = x_s.shape[0]
        TT = None if T is None else torch.cat([T, T])
        U, logdets = self.transporter(torch.cat([x_s, x_t]), torch.cat([s, t]), TT)  # one pass for both levels
        u_s, u_t, logdet = U[:B], U[B:], logdets[:B]
        mu, sigma = self.predictor(u_t, t, s, y, T)
        if aux is not None:
            aux.append(self.mean_alignment(x_t, t, s, y, mu))
        return gaussian_log_prob(u_s, mu, sigma) + logdet

    def trajectory_log_probs(self, X: Tensor, t: Tensor, y: Tensor | None = None, aux: list | None = None) -> Tensor:
        """log p(x_{t_{k-1}} | x_{t_k}, y) for k = 1..T, all steps in one batched pass.

        X: (B, T + 1, N, D) standardised trajectory (ascending times), t: (B, T + 1). -> (B, T).
        f_T runs once on levels 0..T-1 (each is the target of step k and the input of step k + 1);
        level T (t = 1) is the identity.
        """
        B, K = t.shape
        T = K - 1
        shape = X.shape[2:]
        TT = self.steps_tensor(B * T, T)
        U, logdet = self.transporter(X[:, :T].reshape((B * T,) + shape), t[:, :T].reshape(-1), TT)
        U = U.reshape((B, T) + shape)
        inputs = torch.cat([U[:, 1:], X[:, T:].float()], dim=1)  # u_{t_k}, k = 1..T
        yk = None if y is None else y.repeat_interleave(T)
        mu, sigma = self.predictor(inputs.reshape((B * T,) + shape), t[:, 1:].reshape(-1), t[:, :T].reshape(-1), yk, TT)
        logp = gaussian_log_prob(U.reshape((B * T,) + shape), mu, sigma) + logdet
        if aux is not None:  # the mean-alignment term of every step (finetuning)
            aux.append(self.mean_alignment(X[:, 1:].reshape((B * T,) + shape), t[:, 1:].reshape(-1),
                                           t[:, :T].reshape(-1), yk, mu).reshape(B, T).sum(1))
        return logp.reshape(B, T)

    def mean_alignment(self, x_t: Tensor, t: Tensor, s: Tensor, y: Tensor | None, mu: Tensor) -> Tensor:
        """|| mu_P - mu_FM ||^2 per sample (B,), mu_FM from the frozen teacher on x_t (data space)."""
        from .finetune import posterior_mean_from_velocity
        with torch.no_grad():
            v = self._teacher[0].velocity(x_t, t, y).float()
            target = posterior_mean_from_velocity(v, x_t.float(), t, s)
        return (mu - target).pow(2).flatten(1).sum(1)

    def pair_log_prob(self, X: Tensor, t: Tensor, k: Tensor, y: Tensor | None = None, aux: list | None = None) -> Tensor:
        """log p(x_{t_{k-1}} | x_{t_k}, y) for one step k (B,) in 1..T per sample. -> (B,)"""
        rows = torch.arange(X.shape[0], device=X.device)
        TT = self.steps_tensor(X.shape[0], t.shape[1] - 1)
        return self.step_log_prob(X[rows, k - 1], X[rows, k], t[rows, k - 1], t[rows, k], y, TT, aux=aux)

    # ------------------------------------------------------------------------------------ train
    def draw_training_noise(self, batch: int, generator: torch.Generator | None = None,
                            device: torch.device | None = None) -> TrainingNoise:
        """Draw every random choice of a training batch (see :class:`TrainingNoise`)."""
        tc = self.config.trajectory
        dev = device or self.device
        Ts = torch.tensor(self.train_Ts, device=dev)
        T = Ts[(rand((batch,), generator, dev) * len(Ts)).long().clamp(max=len(Ts) - 1)]
        # t_min ~ U[lo, hi_T] with hi_T = min(t_min_high, t_1(T) / 2), so t_0 < t_1 even for long grids
        hi = torch.tensor([self.t_min_high(int(v)) for v in self.train_Ts], device=dev)[
            (T[:, None] == Ts[None]).float().argmax(1)]
        t_min = tc.t_min_low + (hi - tc.t_min_low).clamp_min(0) * rand((batch,), generator, dev)
        drop = rand((batch,), generator, dev) < self.config.class_dropout
        eps = randn((batch, int(Ts.max()) + 1, self.spec.num_tokens, self.spec.token_dim), generator, dev)
        k_unif = rand((batch,), generator, dev)
        return TrainingNoise(t_min, T, drop, eps, k_unif)

    def forward(self, x0: Tensor, y: Tensor | None = None, noise: TrainingNoise | None = None,
                mode: str = "e2e") -> Tensor:
        """The training loss; see :meth:`loss`."""
        return self.loss(x0, y, mode=mode, noise=noise)

    def loss(self, x0: Tensor, y: Tensor | None = None, mode: str = "e2e",
             generator: torch.Generator | None = None, noise: TrainingNoise | None = None) -> Tensor:
        """Training loss: trajectory NLL per sample and dimension (nats), standardised tokens x0 (B, N, D).

        ``e2e`` sums all T step NLLs of each sampled trajectory; ``pairwise`` scores one uniformly drawn
        step per sample, scaled by T (an unbiased estimate of the same sum). Multi-T models draw T per
        sample. Randomness comes from ``noise`` or, if None, is drawn from ``generator``.
        """
        if mode not in ("e2e", "pairwise"):
            raise ValueError(f"unknown training mode '{mode}' (use 'e2e' or 'pairwise')")
        B = x0.shape[0]
        if noise is None:
            noise = self.draw_training_noise(B, generator, x0.device)
        if y is not None and self.spec.num_classes > 0 and self.config.class_dropout > 0:
            y = torch.where(noise.drop, torch.full_like(y, self.spec.num_classes), y)
        nll = torch.zeros(B, device=x0.device)
        use_aux = bool(self._teacher) and self.aux_weight_now > 0
        aux_total = torch.zeros(B, device=x0.device)
        # a fixed order over all trained lengths (empty groups included) keeps the sequence of forward
        # passes identical on every process, which FSDP's collectives require
        for T in self.train_Ts:
            idx = (noise.T == T).nonzero().squeeze(1)
            yi = None if y is None else y[idx]
            t = self.grid(len(idx), noise.t_min[idx], T=T)
            X = forward_trajectory(x0[idx], t, noise=noise.eps[idx, : T + 1])
            aux = [] if use_aux else None
            if mode == "e2e":
                part = -self.trajectory_log_probs(X, t, yi, aux=aux).sum(1)
            else:
                k = (noise.k_unif[idx] * T).long().clamp(max=T - 1) + 1
                part = -T * self.pair_log_prob(X, t, k, yi, aux=aux)
                if aux:
                    aux[0] = T * aux[0]
            nll = nll.index_put((idx,), part)
            if aux:
                aux_total = aux_total.index_put((idx,), aux[0])
        loss = nll.mean() / self.spec.dim
        self.last_parts = {"nll": float(loss.detach())}
        if use_aux:
            aux_loss = aux_total.mean() / self.spec.dim
            self.last_parts.update(aux=float(aux_loss.detach()), aux_weight=self.aux_weight_now)
            loss = loss + self.aux_weight_now * aux_loss
        return loss

    # ----------------------------------------------------------------------- public conveniences
    def trajectory_nll(self, x: Tensor, y: Tensor | None = None, t_min: float | None = None,
                       generator: torch.Generator | None = None, steps: int | None = None) -> Tensor:
        """Exact NLL (nats, raw data units) of one sampled forward trajectory per sample. x: raw (B, ...)."""
        from .likelihood import trajectory_nll
        return trajectory_nll(self, x, y=y, t_min=t_min, generator=generator, steps=steps)

    def nll_bound(self, x: Tensor, y: Tensor | None = None, num_trajectories: int = 16,
                  importance_weighted: bool = False, generator: torch.Generator | None = None,
                  steps: int | None = None) -> Tensor:
        """Upper bound on -log p(x_0) in nats (raw data units), per sample (B,), with T = ``steps``."""
        from .likelihood import nll_bound
        return nll_bound(self, x, y=y, num_trajectories=num_trajectories,
                         importance_weighted=importance_weighted, generator=generator, steps=steps)

    def sample(self, n: int, y: Tensor | None = None, guidance: float = 0.0, steps: int | None = None,
               t_min: float | None = None, generator: torch.Generator | None = None, decode: str = "auto",
               inverse_method: str = "sequential") -> Tensor:
        """n raw samples (n, ...) in ``steps`` predictor steps (default: the trained T).

        ``decode``: "inverse" (one transporter inverse), "inverse+score" (inverse of every level and
        trajectory score denoising), "denoiser" (the distilled g_phi; see ``ntm distill``) or "auto"
        (the default: the denoiser when the model has one, else the inverse).
        ``inverse_method``: "sequential" or "jacobi".
        """
        from .sampling import sample
        return sample(self, n, y=y, guidance=guidance, steps=steps, t_min=t_min, generator=generator,
                      decode=decode, inverse_method=inverse_method)
