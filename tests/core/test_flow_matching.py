"""The flow-matching baseline: closed-form velocity on Gaussian data, its ODE likelihood, guidance,
checkpoints, and the CLI."""


import pytest
import torch
from conftest import GaussianVelocity, gaussian_flow
from torch import nn

from ntm import NTM, FlowMatching
from ntm.config import DataSpec, FMConfig, PredictorConfig, Preset, TrainConfig, TrajectoryConfig, TransporterConfig
from ntm.flow_matching import network_evaluations, solve_ode


@pytest.mark.parametrize("solver,steps,tol", [("euler", 4000, 2e-3), ("heun", 400, 2e-4)])
def test_sampler_transports_noise_to_the_gaussian_exactly(solver, steps, tol):
    # the probability-flow map of Gaussian data is affine: x_1 = z  ->  x_0 = m + s z
    m, s = 0.7, 0.4
    fm = gaussian_flow(m, s)
    z = torch.randn(64, 3, 1, generator=torch.Generator().manual_seed(0))
    x0 = solve_ode(lambda x, t: fm.velocity(x, t), z.clone(), fm.sampling_times(steps), solver)
    assert torch.allclose(x0, m + s * z, atol=tol)


def test_sample_uses_the_generator_and_shapes():
    fm = gaussian_flow()
    a = fm.sample(10, steps=8, generator=torch.Generator().manual_seed(1))
    b = fm.sample(10, steps=8, generator=torch.Generator().manual_seed(1))
    assert a.shape == (10, 3) and torch.equal(a, b)
    with pytest.raises(ValueError):
        fm.sample(4, steps=4, solver="rk45")


def test_network_evaluation_counts():
    calls = []

    class Counting(GaussianVelocity):
        def forward(self, x, t, y=None):
            calls.append(1)
            return super().forward(x, t, y)

    fm = gaussian_flow()
    fm.velocity = Counting(0.7, 0.4)
    for solver, steps in (("euler", 5), ("heun", 4)):
        calls.clear()
        fm.sample(3, steps=steps, solver=solver)
        assert len(calls) == network_evaluations(steps, solver)


@pytest.mark.parametrize("exact", [True, False])
def test_ode_likelihood_matches_the_gaussian_density(exact):
    m, s, dim = 0.7, 0.4, 3
    fm = gaussian_flow(m, s, dim)
    x = m + s * torch.randn(32, dim, generator=torch.Generator().manual_seed(3))
    true_nll = -torch.distributions.Normal(m, s).log_prob(x).sum(1)
    est = fm.nll(x, steps=200, exact=exact, probes=64, generator=torch.Generator().manual_seed(0))
    # Hutchinson is unbiased; with a linear field its variance is tiny but not zero
    assert torch.allclose(est, true_nll, atol=2e-3 if exact else 5e-2), (est - true_nll).abs().max()


def test_raw_units_likelihood_includes_the_standardisation():
    dim = 2
    cfg = FMConfig(data=DataSpec(shape=(dim,), mean=(1.0, -2.0), std=(2.0, 0.5)))
    fm = FlowMatching(cfg, velocity=GaussianVelocity(0.0, 1.0)).eval()  # standardised data ~ N(0, 1)
    x = torch.tensor([[1.0, -2.0], [3.0, -1.5]])
    true = -torch.distributions.Normal(torch.tensor([1.0, -2.0]), torch.tensor([2.0, 0.5])).log_prob(x).sum(1)
    assert torch.allclose(fm.nll(x, steps=200), true, atol=1e-4)


def test_linear_cfg_on_the_velocity():
    class LabelVelocity(nn.Module):
        def forward(self, x, t, y=None):
            return x * 0 + (0.0 if y is None else y.float().reshape(-1, 1, 1) + 1)

    cfg = FMConfig(data=DataSpec(shape=(2,), num_classes=3))
    fm = FlowMatching(cfg, velocity=LabelVelocity())
    x, t = torch.zeros(2, 2, 1), torch.full((2,), 0.5)
    y = torch.tensor([0, 1])
    v = fm.guided_velocity(x, t, y, guidance=2.0)
    v_c, v_u = y.float() + 1, torch.full((2,), 3.0 + 1)  # the null label is 3
    assert torch.allclose(v[:, 0, 0], v_c + 2.0 * (v_c - v_u))
    with pytest.raises(ValueError):
        fm.guided_velocity(x, t, y, guidance=-1.0)


def test_same_backbone_as_the_predictor():
    spec = DataSpec(kind="image", shape=(1, 8, 8), mean=(0.0,), std=(1.0,), patch=2)
    preset = Preset(TrajectoryConfig(), TransporterConfig(blocks=1, layers=1, width=16, heads=2),
                    PredictorConfig(layers=2, width=32, heads=2), TrainConfig())
    fm, ntm = FlowMatching(preset.fm(spec)), NTM(preset.ntm(spec))
    fm_keys = {k: v.shape for k, v in fm.velocity.state_dict().items() if "time_s" not in k}
    pred_keys = {k: v.shape for k, v in ntm.predictor.state_dict().items() if "time_s" not in k and "proj_out" not in k}
    assert set(pred_keys) <= set(fm_keys)
    assert all(fm_keys[k] == v for k, v in pred_keys.items())

