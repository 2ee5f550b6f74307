"""Trajectory score denoising against the analytic posterior mean, the block-Jacobi inverse against
the sequential one, the distilled denoiser, and every decoder from the CLI."""


import pytest
import torch
from conftest import randomize

from ntm import NTM
from ntm.config import DataSpec, NTMConfig, TrajectoryConfig, TransporterConfig
from ntm.denoising import trajectory_score_denoise
from ntm.predictor import GaussianDataPosterior
from ntm.trajectory import forward_trajectory
from ntm.transporter import Transporter


@pytest.mark.parametrize("t_min", [0.0, 0.02, 0.1])
def test_score_denoising_is_the_posterior_mean_for_gaussian_data(t_min):
    # every step is the exact reverse kernel of N(m, v) data, so -grad L is the exact score of the
    # trajectory (minus the prior term, which S never lets reach t_0) and Tweedie is exact:
    # the output must equal E[x_0 | trajectory] = E[x_0 | x_{t_0}] (the chain is Markov)
    m = torch.tensor([[0.5], [-1.0], [2.0]])
    v = torch.tensor([[0.3], [2.0], [0.05]])
    cfg = NTMConfig(data=DataSpec(shape=(3,), mean=(0.0,) * 3, std=(1.0,) * 3),
                      trajectory=TrajectoryConfig(T=4, shift=-1.0), transporter=TransporterConfig(enabled=False))
    model = NTM(cfg, predictor=GaussianDataPosterior(m, v))
    g = torch.Generator().manual_seed(0)
    x0 = m + v.sqrt() * torch.randn(256, 3, 1, generator=g)
    t = model.grid(256, t_min)
    X = forward_trajectory(x0, t, generator=g)
    den = trajectory_score_denoise(model, X, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in a bf16 distillation: the arithmetic stays fp32
        den_autocast = trajectory_score_denoise(model, X, t)
    assert den_autocast.dtype == torch.float32 and torch.allclose(den_autocast, den, atol=1e-6)
    a = 1 - t[:, 0].reshape(-1, 1, 1)
    tt = t[:, 0].reshape(-1, 1, 1)
    posterior_mean = m + a * v / (a**2 * v + tt**2) * (X[:, 0] - a * m)
    assert torch.allclose(den, posterior_mean, atol=2e-5), (den - posterior_mean).abs().max()


def test_score_denoising_clip_percentile_validates():
    cfg = NTMConfig(data=DataSpec(shape=(2,)), trajectory=TrajectoryConfig(T=4, shift=-1.0),
                      transporter=TransporterConfig(enabled=False))
    model = NTM(cfg, predictor=GaussianDataPosterior(torch.zeros(2, 1), torch.ones(2, 1)))
    t = model.grid(4, 0.02)
    X = forward_trajectory(torch.zeros(4, 2, 1), t)
    assert trajectory_score_denoise(model, X, t, clip_percentile=50.0).shape == (4, 2, 1)
    with pytest.raises(ValueError):
        trajectory_score_denoise(model, X, t, clip_percentile=0.0)


@pytest.mark.parametrize("kw", [{}, {"chunk": 5}, {"max_iters": 2}, {"chunk": 4, "max_iters": 1}])
def test_jacobi_inverse_equals_sequential(kw):
    torch.manual_seed(0)
    tr = Transporter(TransporterConfig(blocks=2, layers=1, width=16, heads=2), 12, 3)
    randomize(tr, 0.1)
    tr.eval()
    x = torch.randn(16, 12, 3)
    t = torch.rand(16) * 0.9
    with torch.no_grad():
        u, _ = tr(x, t)
        seq = tr.inverse(u, t)
        jac, sweeps = tr.inverse_with_stats(u, t, method="jacobi", tol=1e-7, **kw)
    assert torch.allclose(jac, seq, atol=1e-4) and torch.allclose(jac, x, atol=1e-4)
    assert sweeps >= 2
    with pytest.raises(ValueError):
        tr.inverse(u, t, method="newton")

