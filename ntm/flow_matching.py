"""The flow-matching baseline on the NTM predictor's backbone, with Euler/Heun samplers and its ODE
likelihood.

Convention (the same as NTM's forward process): x_t = (1 - t) x_0 + t eps, t = 0 clean, t = 1 noise,
and the network regresses the velocity v = dx_t/dt = eps - x_0 (the loss is
``ntm.train.objectives.FlowMatchingObjective``):

    L_FM = E_{t, x_0, eps} || v_theta(x_t, t, y) - (eps - x_0) ||^2 / dim.

Training times are t = shift(u), u ~ U[0, 1], with the same time shift as the NTM grid; sampling
integrates dx/dt = v from t = 1 to 0 over the shifted grid (t_k = shift(k / K), K steps).
Classifier-free guidance is linear on the velocity: v = v_c + w (v_c - v_u).

The likelihood solves the probability-flow ODE from the data to the noise end:

    log p_0(x_0) = log N(x_1; 0, I) + int_0^1 div v(x_t, t) dt,

with the exact divergence (one autograd pass per dimension) for small data and the Hutchinson
estimator (Rademacher probes) above. It is an estimate at a finite step count, not a bound.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import TokenModel
from .config import FMConfig
from .likelihood import bits_per_dim, log_scale_correction
from .predictor import VelocityField
from .text import cat_conditions, null_condition
from .trajectory import rand, randn, shift_time

DEFAULT_SAMPLING_STEPS = 50
SOLVERS = ("euler", "heun")
EXACT_DIVERGENCE_MAX_DIM = 16


class FlowMatching(TokenModel):
    """A conditional flow-matching model. ``velocity`` may be replaced by any module
    ``(x_t (B, N, D), t (B,), y (B,) | None) -> v (B, N, D)``, e.g. a closed form."""

    FORMAT = "ntm-fm"
    CONFIG = FMConfig

    def __init__(self, config: FMConfig, velocity: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.velocity = velocity if velocity is not None else VelocityField(config.velocity, config.data)

    @property
    def shift_setting(self) -> float | None:
        return self.config.shift

    # ---------------------------------------------------------------------------------- sample
    def guided_velocity(self, x: Tensor, t: Tensor, y: Tensor | None = None, guidance: float = 0.0) -> Tensor:
        """v_c + w (v_c - v_u) (plain v when y is None or w = 0). x: (B, N, D), t: (B,)."""
        if guidance < 0 or guidance != guidance:
            raise ValueError(f"the guidance scale must be >= 0, got {guidance}")
        if y is None or guidance == 0.0:
            return self.velocity(x, t, y)
        B = x.shape[0]
        v = self.velocity(torch.cat([x, x]), torch.cat([t, t]), cat_conditions(y, null_condition(y, self.spec.num_classes)))
        return (1 + guidance) * v[:B] - guidance * v[B:]

    def sampling_times(self, steps: int) -> Tensor:
        """(steps + 1,) descending times 1 = t_K > ... > t_0 = 0 on the shifted grid."""
        if steps < 1:
            raise ValueError("the number of sampling steps must be at least 1")
        u = torch.arange(steps, -1, -1, dtype=torch.float64) / steps
        return shift_time(u, self.time_shift).float().to(self.device)

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, guidance: float = 0.0, steps: int | None = None,
               solver: str = "euler", generator: torch.Generator | None = None, prompt=None) -> Tensor:
        """n raw samples (n, ...) by integrating the ODE from noise in ``steps`` Euler or Heun steps.
        ``prompt`` (text models): one string, n strings, or encoded ``Prompts``, in place of ``y``.

        Network evaluations: ``steps`` (Euler) or 2 ``steps`` - 1 (Heun; the last step is Euler),
        doubled under guidance.
        """
        if n < 1:
            raise ValueError("the number of samples must be at least 1")
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver '{solver}' (use {' or '.join(SOLVERS)})")
        y = self.check_labels(self.prompt_batch(prompt, n) if prompt is not None else y)
        if y is not None and y.shape[0] != n:
            raise ValueError(f"got {y.shape[0]} labels for {n} samples")
        times = self.sampling_times(steps or DEFAULT_SAMPLING_STEPS)
        x = randn((n, self.spec.num_tokens, self.spec.token_dim), generator, self.device)
        x = solve_ode(lambda z, t: self.guided_velocity(z, t, y, guidance), x, times, solver)
        return self.from_tokens(x)

    # ------------------------------------------------------------------------------- likelihood
    def log_prob_tokens(self, x0: Tensor, y: Tensor | None = None, steps: int = 64,
                        exact: bool | None = None, probes: int = 1,
                        generator: torch.Generator | None = None) -> Tensor:
        """ODE estimate of log p_0(x0) for standardised tokens (B, N, D) -> (B,) nats.

        ``steps`` Heun steps on the shifted grid, applied to x and the divergence integral together.
        ``exact`` None: exact divergence when the data have at most 16 dimensions, else Hutchinson
        with ``probes`` Rademacher vectors."""
        y = self.check_labels(y)
        dim = self.spec.dim
        exact = dim <= EXACT_DIVERGENCE_MAX_DIM if exact is None else exact
        probe_vecs = None
        if not exact:
            probe_vecs = [(rand(x0.shape, generator, x0.device) < 0.5).float() * 2 - 1 for _ in range(probes)]

        def field(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                v = self.velocity(x, t, y)
                if exact:
                    flat = v.flatten(1)
                    div = sum(torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < dim - 1)[0].flatten(1)[:, i]
                              for i in range(dim))
                else:
                    div = 0.0
                    for j, e in enumerate(probe_vecs):
                        g = torch.autograd.grad(v, x, e, retain_graph=j < len(probe_vecs) - 1)[0]
                        div = div + (g * e).flatten(1).sum(1)
                    div = div / len(probe_vecs)
            return v.detach(), div.detach()

        times = self.sampling_times(steps).flip(0)  # 0 -> 1
        x = x0.float()
        B = x.shape[0]
        integral = torch.zeros(B, device=x.device)
        for k in range(steps):  # Heun on the augmented state (x, int div): two evaluations per step
            t, s = times[k], times[k + 1]
            h = s - t
            v, div = field(x, t.expand(B))
            v_next, div_next = field(x + h * v, s.expand(B))
            x = x + 0.5 * h * (v + v_next)
            integral = integral + 0.5 * h * (div + div_next)
        log_p1 = (-0.5 * x**2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        return log_p1 + integral

    def nll(self, x: Tensor, y: Tensor | None = None, steps: int = 64, exact: bool | None = None,
            probes: int = 1, generator: torch.Generator | None = None, chunk: int = 256) -> Tensor:
        """ODE estimate of -log p(x) in nats (raw data units) per sample. x: raw (B, ...), in chunks."""
        tokens = self.to_tokens(x)
        y = self.check_labels(y)
        lp = torch.cat([self.log_prob_tokens(tokens[lo:lo + chunk], None if y is None else y[lo:lo + chunk], steps=steps,
                                             exact=exact, probes=probes, generator=generator)
                        for lo in range(0, tokens.shape[0], chunk)])
        return -lp + log_scale_correction(self.spec)


    def score(self, x: Tensor, y: Tensor | None = None, steps: int = 64, generator: torch.Generator | None = None,
              batch_size: int = 256, progress=None) -> dict[str, Tensor]:
        """Per-sample scores of raw x (B, ...) from the ODE estimate (``steps`` Heun steps): ``nll``
        (B,) nats in raw units and, for images, ``bpd``; tensors on the CPU. ``progress``, if given,
        is called with the number of samples after each batch."""
        out = []
        for lo in range(0, x.shape[0], batch_size):
            out.append(self.nll(x[lo:lo + batch_size], None if y is None else y[lo:lo + batch_size], steps=steps,
                                generator=generator, chunk=batch_size).float().cpu())
            if progress is not None:
                progress(out[-1].shape[0])
        nll = torch.cat(out)
        res = {"nll": nll}
        if self.spec.kind == "image":
            res["bpd"] = bits_per_dim(nll, self.spec.dim)
        return res


def solve_ode(velocity, x: Tensor, times: Tensor, solver: str = "euler") -> Tensor:
    """Integrate dx/dt = velocity(x, t (B,)) over ``times`` (K + 1,), from times[0] to times[-1].

    Euler: x <- x + h v(x, t). Heun: a trapezoidal corrector with the Euler predictor, except on the
    final step when it ends at t = 0, which stays Euler (as in EDM's sampler).
    """
    B = x.shape[0]
    for k in range(len(times) - 1):
        t, s = times[k], times[k + 1]
        h = s - t
        v = velocity(x, t.expand(B))
        x_next = x + h * v
        if solver == "heun" and not (k == len(times) - 2 and float(s) == 0.0):
            x_next = x + 0.5 * h * (v + velocity(x_next, s.expand(B)))
        x = x_next
    return x


def network_evaluations(steps: int, solver: str, guided: bool = False) -> int:
    """Velocity-network calls of one sample: K (Euler) or 2K - 1 (Heun), doubled with guidance."""
    nfe = steps if solver == "euler" else 2 * steps - 1
    return nfe * (2 if guided else 1)


def ode_likelihood_report(model: FlowMatching, x: Tensor, y: Tensor | None = None, steps: int = 64,
                          generator: torch.Generator | None = None) -> dict:
    """What ``ntm eval`` prints for an FM run on raw data x (B, ...): the ODE estimate of -log p(x_0)
    (mean and standard error, nats per sample, raw units) and bits/dim for images."""
    nll = model.nll(x, y, steps=steps, generator=generator)
    m = x.shape[0]
    exact = model.spec.dim <= EXACT_DIVERGENCE_MAX_DIM
    res = {"n": m, "model": "fm", "ode_nll_nats": float(nll.mean()),
           "ode_nll_se": float(nll.std() / math.sqrt(m)) if m > 1 else None, "ode_steps": steps,
           "divergence": "exact" if exact else "hutchinson (1 Rademacher probe)", "conditional": y is not None}
    if model.spec.kind == "image":
        res["bits_per_dim"] = float(bits_per_dim(res["ode_nll_nats"], model.spec.dim))
    return res
