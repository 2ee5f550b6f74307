"""Exactness of the per-step density, the trajectory NLL and the bound on -log p(x_0)."""

import math

import pytest
import torch

from ntm.config import DataSpec, NTMConfig, TrajectoryConfig, TransporterConfig
from ntm.data import to_tokens
from ntm.model import NTM
from ntm.predictor import GaussianDataPosterior
from ntm.trajectory import forward_trajectory


@pytest.mark.slow
def test_each_reverse_step_integrates_to_one(small_config):
    """Integrate exp(log p(x_s | x_t)) over a fine 2-D grid for a random non-identity model."""
    from conftest import randomize

    torch.manual_seed(0)
    model = NTM(small_config)
    randomize(model, 0.15)  # large random weights give tails beyond any affordable grid
    model.eval()
    n = 480
    lin = torch.linspace(-16, 16, n)
    cell = float((lin[1] - lin[0]) ** 2)
    gx, gy = torch.meshgrid(lin, lin, indexing="ij")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)[:, :, None]  # (n^2, 2, 1)
    for (s, t) in [(0.3, 0.6), (0.55, 0.85), (0.7, 1.0)]:
        x_t = torch.tensor([[[0.4], [-0.8]]]).expand(grid.shape[0], 2, 1)
        with torch.no_grad():
            logp = model.step_log_prob(grid, x_t, torch.full((grid.shape[0],), s), torch.full((grid.shape[0],), t))
        mass = float(torch.exp(logp.double()).sum() * cell)
        assert mass == pytest.approx(1.0, abs=0.01)
        u, ld = model.transporter(grid[:10], torch.full((10,), s))
        assert ld.abs().max() > 1e-3  # the transporter is really non-identity here


def test_batched_trajectory_log_probs_equal_step_by_step(random_model):
    model = random_model
    x0 = torch.randn(5, 2, 1)
    t = model.grid(5, torch.tensor([0.0, 0.01, 0.02, 0.03, 0.05]))
    X = forward_trajectory(x0, t, generator=torch.Generator().manual_seed(0))
    y = None
    with torch.no_grad():
        batched = model.trajectory_log_probs(X, t, y)
        for k in range(1, t.shape[1]):
            single = model.step_log_prob(X[:, k - 1], X[:, k], t[:, k - 1], t[:, k], y)
            assert torch.allclose(batched[:, k - 1], single, atol=1e-5)
            pair = model.pair_log_prob(X, t, torch.full((5,), k), y)
            assert torch.allclose(pair, single, atol=1e-5)


@pytest.mark.parametrize("std", [(1.0, 1.0), (2.0, 0.5)])
def test_bound_is_exact_for_gaussian_data_with_true_kernel(std):
    """With p(x_s | x_t) the true reverse kernel of N(m, v) data, every trajectory's weight is p(x_0)."""
    m = torch.tensor([[0.5], [-1.0]])
    v = torch.tensor([[0.3], [2.0]])
    spec = DataSpec(shape=(2,), mean=(0.0, 0.0), std=std)
    cfg = NTMConfig(data=spec, trajectory=TrajectoryConfig(T=4, shift=-1.0), transporter=TransporterConfig(enabled=False))
    model = NTM(cfg, predictor=GaussianDataPosterior(m, v))
    x = torch.randn(64, 2) * 1.5
    bound = model.nll_bound(x, num_trajectories=3, generator=torch.Generator().manual_seed(0))
    iw = model.nll_bound(x, num_trajectories=3, importance_weighted=True, generator=torch.Generator().manual_seed(1))
    z = to_tokens(x, spec)[:, :, 0]
    sd = torch.tensor(std)
    exact = -(-0.5 * (z - m.T) ** 2 / v.T - 0.5 * torch.log(2 * math.pi * v.T)).sum(1) + torch.log(sd).sum()
    assert (bound - exact).abs().max() < 5e-5
    assert (iw - exact).abs().max() < 5e-5


def test_sampling_is_seeded_and_guidance_runs(small_config):
    from dataclasses import replace
    cfg = replace(small_config, data=replace(small_config.data, num_classes=3))
    torch.manual_seed(0)
    model = NTM(cfg).eval()
    a = model.sample(16, generator=torch.Generator().manual_seed(7))
    b = model.sample(16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (16, 2)
    y = torch.full((16,), 2)
    g = model.sample(16, y=y, guidance=2.0, steps=8, generator=torch.Generator().manual_seed(7))
    assert g.shape == (16, 2) and torch.isfinite(g).all()
    with pytest.raises(ValueError):
        model.sample(16, y=torch.full((16,), 3))


def test_bound_by_step_adds_up_to_the_elbo_bound(random_model):
    """The per-step split uses the same trajectories as nll_bounds: its terms sum to the ELBO bound,
    and each forward term equals the closed-form Gaussian transition density computed here."""
    from ntm.likelihood import bound_by_step, nll_bounds

    x = torch.randn(64, 2)
    parts = bound_by_step(random_model, x, num_trajectories=3, generator=torch.Generator().manual_seed(5))
    elbo, _ = nll_bounds(random_model, x, num_trajectories=3, generator=torch.Generator().manual_seed(5))
    total = sum(parts["neg_log_p"]) + parts["neg_log_prior"] + sum(parts["log_q"]) + parts["raw_correction"]
    assert total == pytest.approx(float(elbo.mean()), abs=1e-4)
    assert len(parts["neg_log_p"]) == len(parts["log_q"]) == random_model.config.trajectory.T
    t = torch.tensor(parts["times"])
    assert t[0] == 0 and t[-1] == 1
    # E[log q(x_{t_k} | x_{t_{k-1}})] for a Markov Gaussian chain: -d/2 log(2 pi e var_k) (d = 2)
    a = (1 - t[1:]) / (1 - t[:-1])
    var = t[1:] ** 2 - (a * t[:-1]) ** 2
    expected = -(math.log(2 * math.pi * math.e) + torch.log(var))  # 2 dims: 2 * (1/2) * ...
    assert torch.allclose(torch.tensor(parts["log_q"]), expected, atol=0.25)



def test_discretised_last_step_sums_to_one_over_the_bins():
    from ntm.likelihood import discretized_log_prob

    q = torch.arange(256.0).reshape(256, 1)
    for t0 in (1e-3, 0.02, 0.3):
        for centre in (-1.2, -0.996, 0.3, 0.9999):
            x = torch.full((256, 1), centre * (1 - t0))
            assert float(discretized_log_prob(x, q, t0).double().exp().sum()) == pytest.approx(1.0, abs=1e-6)


def test_discrete_bound_for_gaussian_data_with_the_exact_kernel_matches_the_bin_probabilities():
    """Pixels ~ N(m, v) and the exact reverse kernel: p(x_{t_0}) is exact, so the IW bound with many
    trajectories tends to -log P(q) with P(q_i) the bin mass of N(m, v + 2 (t_0 / (1 - t_0))^2)
    (x_{t_0} / (1 - t_0) adds one N(0, s^2), the decoder another), computed here independently;
    the ELBO lies above it."""
    from ntm.likelihood import discrete_nll_bounds

    m, v = torch.tensor([[0.1], [-0.5]]), torch.tensor([[0.04], [0.01]])
    spec = DataSpec(kind="image", shape=(1, 1, 2), mean=(0.0,), std=(1.0,), patch=1)
    cfg = NTMConfig(data=spec, trajectory=TrajectoryConfig(T=4, shift=-1.0), transporter=TransporterConfig(enabled=False))
    model = NTM(cfg, predictor=GaussianDataPosterior(m, v))
    t0 = 0.02
    q = torch.tensor([[[[140.0, 64.0]]], [[[128.0, 60.0]]]])
    elbo, iw = discrete_nll_bounds(model, q, num_trajectories=4000, t0=t0, generator=torch.Generator().manual_seed(0))
    s2 = (t0 / (1 - t0)) ** 2
    normal = torch.distributions.Normal(m[:, 0].double(), (v[:, 0].double() + 2 * s2).sqrt())
    flat = q.reshape(2, 2).double()
    exact = -torch.log(normal.cdf((flat + 1) / 128 - 1) - normal.cdf(flat / 128 - 1)).sum(1)
    assert torch.allclose(iw.double(), exact, atol=0.02), (iw, exact)
    assert (elbo.double() >= exact - 0.02).all() and (elbo >= iw).all()
    with pytest.raises(ValueError):
        discrete_nll_bounds(model, q + 0.5, t0=t0)


def test_hadamard_gap_closed_form_and_the_coupling_gap_of_a_model(random_model):
    """The gap of a unit-diagonal triangular 2x2 Jacobian is log(1 + a^2) / 4 per dimension whatever
    its row scales, and 0 for a diagonal one; on a model, each level's gap equals that of a
    finite-difference Jacobian of f_T at the same trajectory's level, and the identity pays nothing."""
    from ntm.likelihood import coupling_gap, hadamard_gap

    a = 0.7
    J = torch.tensor([[1.0, 0.0], [a, 1.0]], dtype=torch.float64) * torch.tensor([[2.0], [0.5]], dtype=torch.float64)
    assert float(hadamard_gap(J)) == pytest.approx(math.log(1 + a * a) / 4, rel=1e-9)
    assert float(hadamard_gap(torch.diag(torch.tensor([3.0, 0.2])))) == pytest.approx(0.0, abs=1e-12)
    x = torch.randn(3, 2)
    t, gap = coupling_gap(random_model, x, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4,) and gap.shape == (3, 4) and float(t[0]) == 0.0
    x0 = random_model.to_tokens(x)
    X = forward_trajectory(x0, random_model.grid(3, 0.0), generator=torch.Generator().manual_seed(0))
    eps = 1e-3
    for i in range(3):
        for k in range(4):
            level = X[i, k].reshape(-1).double()
            f = lambda z: random_model.transporter(z.float().view(1, *x0.shape[1:]), t[k:k + 1])[0].reshape(-1).double()  # noqa: E731
            with torch.no_grad():
                cols = [(f(level + eps * e) - f(level - eps * e)) / (2 * eps) for e in torch.eye(2, dtype=torch.float64)]
            assert float(gap[i, k]) == pytest.approx(float(hadamard_gap(torch.stack(cols, 1))), abs=2e-3)
    assert float(gap[:, 1:].max()) > 1e-3  # a random transporter couples its two tokens
    fresh = NTM(random_model.config)  # zero-initialised: the identity
    assert float(coupling_gap(fresh, x)[1].abs().max()) < 1e-9
