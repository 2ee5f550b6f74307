"""The forward trajectory against Monte Carlo and independent Gaussian conditioning."""

import math
from dataclasses import replace

import pytest
import torch

from ntm.config import DataSpec, TrajectoryConfig, get_preset, validate_model_config
from ntm.trajectory import (
    forward_pair,
    forward_trajectory,
    markov_coefficients,
    posterior_coefficients,
    shift_for_length,
    time_grid,
    trajectory_covariance,
)


def test_time_grid_matches_paper_worked_values():
    t = time_grid(4, 0.02, shift_for_length(256))
    assert torch.allclose(t, torch.tensor([0.02, 0.355, 0.622, 0.832, 1.0]), atol=1e-3)
    t8 = time_grid(8, 0.02, shift_for_length(256))
    assert torch.allclose(t8, torch.tensor([0.02, 0.191, 0.355, 0.497, 0.622, 0.733, 0.832, 0.920, 1.0]), atol=1e-3)
    assert shift_for_length(1024) == pytest.approx(0.63, abs=1e-2)


def test_time_grid_per_sample_t_min():
    t_min = torch.tensor([0.0, 0.01, 0.05])
    t = time_grid(4, t_min, -1.0)
    assert t.shape == (3, 5)
    assert torch.equal(t[:, 0], t_min)
    assert (t[:, 1:] > t[:, :-1]).all() and (t[:, -1] == 1).all()


def test_posterior_coefficients_match_digest_values():
    t = torch.tensor([1.0, 0.832, 0.622, 0.355])
    s = torch.tensor([0.832, 0.622, 0.355, 0.02])
    A, B, C = posterior_coefficients(t, s)
    assert torch.allclose(A, torch.tensor([0.0, 0.249, 0.190, 0.002]), atol=2e-3)
    assert torch.allclose(B, torch.tensor([0.168, 0.336, 0.574, 0.979]), atol=2e-3)
    assert torch.allclose(C, torch.tensor([0.832, 0.587, 0.334, 0.020]), atol=2e-3)


def test_proposition1_marginals_and_covariance_by_monte_carlo():
    torch.manual_seed(0)
    n = 200_000
    t = time_grid(4, 0.02, 0.5, batch=n)
    x0 = torch.full((n, 1, 1), 1.7)
    X = forward_trajectory(x0, t, generator=torch.Generator().manual_seed(1))[:, :, 0, 0]  # (n, T+1)
    grid = t[0]
    se_mean = grid / math.sqrt(n)
    assert (X.mean(0) - (1 - grid) * 1.7).abs().le(5 * se_mean + 1e-6).all()
    assert torch.allclose(X.std(0), grid, rtol=1e-2)
    mc_cov = torch.cov(X.T.double())
    S = trajectory_covariance(grid.double())
    assert torch.allclose(mc_cov, S, atol=5e-3)


def test_forward_pair_has_the_law_of_two_consecutive_trajectory_levels():
    """(x_s, x_t) from forward_pair: means (1 - s) x0, (1 - t) x0 and the 2x2 block of Prop. 3's
    covariance min^2 (1 - max) / (1 - min), by Monte Carlo, for steps at both ends of the grid."""
    n = 200_000
    x0 = torch.full((n, 1, 1), -0.8)
    for s, t in [(0.02, 0.355), (0.622, 0.832), (0.832, 1.0), (0.0, 0.2)]:
        noise = torch.randn((n, 2, 1, 1), generator=torch.Generator().manual_seed(int(100 * t)))
        x_s, x_t = forward_pair(x0, torch.full((n,), s), torch.full((n,), t), noise)
        X = torch.stack([x_s[:, 0, 0], x_t[:, 0, 0]], 1).double()
        mean = torch.tensor([(1 - s) * -0.8, (1 - t) * -0.8], dtype=torch.float64)
        assert (X.mean(0) - mean).abs().le(5 * torch.tensor([s, t], dtype=torch.float64) / math.sqrt(n) + 1e-6).all()
        S = trajectory_covariance(torch.tensor([s, t], dtype=torch.float64))
        assert torch.allclose(torch.cov(X.T), S, atol=5 * math.sqrt(2 / n))  # 5 standard errors at variance 1


def test_posterior_coefficients_equal_gaussian_conditioning():
    """A, B, C against conditioning the joint Gaussian of (x_0, x_s, x_t) built from the Markov chain."""
    for s, t in [(0.02, 0.355), (0.355, 0.622), (0.3, 0.95), (0.0, 0.4), (0.7, 1.0)]:
        s_, t_ = torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
        alpha, sigma = markov_coefficients(s_, t_)
        # x_0 ~ N(0, 1) (any prior works); x_s = (1 - s) x_0 + s e1; x_t = alpha x_s + sigma e2.
        L = torch.tensor([[1.0, 0.0, 0.0],
                          [1 - s, s, 0.0],
                          [alpha * (1 - s), alpha * s, sigma]], dtype=torch.float64)
        cov = L @ L.T  # order (x_0, x_s, x_t)
        obs = [2, 0]  # condition on (x_t, x_0)
        coef = torch.linalg.solve(cov[obs][:, obs], cov[obs, 1])
        cond_var = cov[1, 1] - cov[1, obs] @ coef
        A, B, C = posterior_coefficients(t_, s_)
        assert float(A) == pytest.approx(float(coef[0]), abs=1e-10)
        assert float(B) == pytest.approx(float(coef[1]), abs=1e-10)
        assert float(C**2) == pytest.approx(float(cond_var), abs=1e-10)


def test_trajectory_covariance_structure():
    t = torch.tensor([0.02, 0.3, 0.6, 1.0], dtype=torch.float64)
    S = trajectory_covariance(t)
    assert torch.allclose(S.diagonal(), t**2)
    assert torch.equal(S[-1, :-1], torch.zeros(3, dtype=torch.float64)) and S[-1, -1] == 1
    assert torch.allclose(S, S.T)
    assert torch.linalg.eigvalsh(S).min() > 0


def test_time_grid_rejects_t_min_at_or_above_t1():
    from ntm.trajectory import first_level
    t1 = first_level(16, -1.0)
    with pytest.raises(ValueError, match="t_min"):
        time_grid(16, t1 + 1e-4, -1.0)
    with pytest.raises(ValueError, match="t_min"):
        time_grid(4, torch.tensor([0.01, -0.01]), -1.0)
    assert time_grid(16, 0.5 * t1, -1.0).diff().min() > 0



@pytest.mark.parametrize("bad, message", [
    (dict(T=4, train_Ts=(8, 16)), "not one of the trained lengths"),
    (dict(t_min_low=0.1, t_min_high=0.05), "t_min_low <= t_min_high"),
    (dict(t_min_high=1.0), "t_min_low <= t_min_high < 1"),
    (dict(sample_t_min=-0.1), "sample_t_min < 1"),
])
def test_a_trajectory_config_no_model_can_use_is_refused_when_built(bad, message):
    cfg = get_preset("tiny").ntm(DataSpec(shape=(2,), mean=(0.0, 0.0), std=(1.0, 1.0)))
    with pytest.raises(ValueError, match=message):
        validate_model_config(replace(cfg, trajectory=TrajectoryConfig(**bad)))
