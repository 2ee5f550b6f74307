"""The velocity predictor of a model started from flow matching: exact equivalence with the FM
Gaussian posterior sampler at step 0, the x0-uncertainty scale, and the sign convention."""


from dataclasses import replace

import pytest
import torch
from conftest import fm_and_ntm, randomize

from ntm.config import DataSpec
from ntm.predictor import VelocityAdapter, VelocityPredictor, gaussian_log_prob
from ntm.trajectory import forward_trajectory, posterior_coefficients


def test_step_zero_mean_and_scale_are_the_gaussian_posterior():
    fm, ntm = fm_and_ntm()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 1, generator=g)
    t = torch.rand(32, generator=g) * 0.9 + 0.1
    s = 0.05 + (t - 0.06) * torch.rand(32, generator=g)  # steps with C >= the floor
    y = torch.randint(0, 2, (32,), generator=g)
    u, logdet = ntm.transporter(x, t)
    assert torch.equal(u, x) and torch.all(logdet == 0)  # identity transporter at init
    mu, sigma = ntm.predictor(x, t, s, y)
    v = fm.velocity(x, t, y)
    A, B, C = (c.reshape(-1, 1, 1) for c in posterior_coefficients(t, s))
    x0_hat = x - t.reshape(-1, 1, 1) * v
    assert torch.allclose(mu, A * x + B * x0_hat, atol=1e-6)
    assert (C > ntm.config.predictor.s0_std_floor).all()
    assert torch.allclose(sigma, C.expand_as(sigma), atol=1e-7)
    for s_small in (0.0, 1e-4):  # the point-mass end: floored
        _, sigma0 = ntm.predictor(x, t, torch.full((32,), s_small), y)
        assert torch.allclose(sigma0, torch.full_like(sigma0, ntm.config.predictor.s0_std_floor))


def test_x0_uncertainty_scale_is_the_posterior_marginalised_over_x0_hat():
    """"x0" scale: sigma_P^2 = C^2 + B^2 tau^2, the variance of x_s | x_t when x_0 ~ N(x0_hat, tau^2),
    with tau from the head alone (the same for every s). Checked in closed form and by sampling."""
    fm, ntm = fm_and_ntm(5, "x0")
    floor = ntm.config.predictor.s0_std_floor
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 3, 1, generator=g)
    t = torch.rand(16, generator=g) * 0.8 + 0.2
    y = torch.randint(0, 2, (16,), generator=g)
    s0 = torch.zeros(16)
    mu0, sigma0 = ntm.predictor(x, t, s0, y)  # at init tau = floor; at s = 0, C = 0 and B = 1
    assert torch.allclose(sigma0, torch.full_like(sigma0, floor), rtol=1e-6)
    s_mid = 0.5 * t  # at init: the FM posterior mean, and the posterior scale widened by B * floor
    mu, sigma = ntm.predictor(x, t, s_mid, y)
    A, B, C = (c.reshape(-1, 1, 1) for c in posterior_coefficients(t, s_mid))
    assert torch.allclose(mu, A * x + B * (x - t.reshape(-1, 1, 1) * fm.velocity(x, t, y)), atol=1e-6)
    assert torch.allclose(sigma, torch.sqrt(C ** 2 + (B * floor) ** 2).expand_as(sigma), rtol=1e-6)
    randomize(ntm.predictor.sigma_head, 0.5, 9)
    _, tau = ntm.predictor(x, t, s0, y)  # sigma at s = 0 is tau itself
    assert not torch.allclose(tau, torch.full_like(tau, floor))
    for frac in (0.1, 0.5, 0.9):
        s = frac * t
        mu, sigma = ntm.predictor(x, t, s, y)
        A, B, C = (c.reshape(-1, 1, 1) for c in posterior_coefficients(t, s))
        assert torch.allclose(sigma, torch.sqrt(C ** 2 + (B * tau) ** 2), rtol=1e-5)
        # Monte Carlo: draw x_0 ~ N(x0_hat, tau^2), then x_s ~ q(x_s | x_t, x_0)
        x0_hat = (mu - A * x) / B
        n = 20000
        x0 = x0_hat + tau * torch.randn((n,) + x.shape, generator=g)
        xs = A * x + B * x0 + C * torch.randn((n,) + x.shape, generator=g)
        assert torch.allclose(xs.mean(0), mu, atol=4 * float(sigma.detach().max()) / n ** 0.5)
        assert torch.allclose(xs.std(0), sigma, rtol=0.03)
    # the s embedding is not used: the head's output is the same for every s
    v1, d1 = ntm.predictor.velocity_and_log_scale(x, t, torch.full((16,), 0.1), y)
    v2, d2 = ntm.predictor.velocity_and_log_scale(x, t, torch.full((16,), 0.01), y)
    assert torch.equal(d1, d2) and torch.equal(v1, v2)


def test_step_zero_samples_and_nll_equal_the_fm_gaussian_posterior_sampler():
    fm, ntm = fm_and_ntm(3)
    n, y = 16, torch.tensor([0, 1] * 8)
    t = ntm.grid(n, 0.02)
    # the FM Gaussian posterior sampler, written independently with the same noise
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 3, 1, generator=g)
    for k in range(4, 0, -1):
        tk, sk = t[:, k], t[:, k - 1]
        A, B, C = (c.reshape(-1, 1, 1) for c in posterior_coefficients(tk, sk))
        x0_hat = x - tk.reshape(-1, 1, 1) * fm.velocity(x, tk, y)
        x = A * x + B * x0_hat + C * torch.randn(n, 3, 1, generator=g)
    expected = x / (1 - t[:, 0]).reshape(-1, 1)[:, :, None]
    got = ntm.sample(n, y=y, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(got, expected[..., 0], atol=1e-5)
    # trajectory NLL against the Gaussian-posterior NLL computed by hand
    X = forward_trajectory(torch.randn(n, 3, 1), t, generator=torch.Generator().manual_seed(2))
    lp = ntm.trajectory_log_probs(X, t, y)
    for k in range(1, 5):
        tk, sk = t[:, k], t[:, k - 1]
        A, B, C = (c.reshape(-1, 1, 1) for c in posterior_coefficients(tk, sk))
        mean = A * X[:, k] + B * (X[:, k] - tk.reshape(-1, 1, 1) * fm.velocity(X[:, k], tk, y))
        ref = gaussian_log_prob(X[:, k - 1], mean, C.expand_as(mean))
        assert torch.allclose(lp[:, k - 1], ref, rtol=1e-5, atol=1e-3)


def test_both_velocity_sign_conventions_give_the_same_model():
    spec = DataSpec(kind="image", shape=(1, 4, 4), mean=(0.0,), std=(1.0,), patch=2)
    w = torch.randn(16, 16) * 0.1

    def eps_minus_x0(x, t, y):  # images (B, 1, 4, 4)
        return (x.flatten(1) @ w).reshape(x.shape) * (1 + t.reshape(-1, 1, 1, 1))

    def x0_minus_eps(x, t, y):
        return -eps_minus_x0(x, t, y)

    a = VelocityPredictor(VelocityAdapter(eps_minus_x0, spec, +1.0), 4, 4)
    b = VelocityPredictor(VelocityAdapter(x0_minus_eps, spec, -1.0), 4, 4)
    b.load_state_dict(a.state_dict())
    u = torch.randn(5, 4, 4)
    t, s = torch.full((5,), 0.7), torch.full((5,), 0.3)
    ma, sa = a(u, t, s)
    mb, sb = b(u, t, s)
    assert torch.allclose(ma, mb) and torch.allclose(sa, sb)
    with pytest.raises(ValueError):
        VelocityAdapter(eps_minus_x0, spec, 2.0)



def test_data_preconditioning_starts_at_the_data_mean_and_survives_save_load(tmp_path):
    """With "data" preconditioning an untrained predictor's x0_hat is the exact posterior mean for
    Gaussian data of the stored per-dimension mean and variance (at t = 1: the mean itself); the
    statistics are part of the config, so a reloaded model predicts the same."""
    from ntm.config import DataSpec, NTMConfig, PredictorConfig, TrajectoryConfig, TransporterConfig
    from ntm.io import write_artifact
    from ntm.model import NTM
    from ntm.predictor import GaussianDataPosterior

    mean, var = (0.5, -0.7, 0.1, 0.9), (0.2, 0.05, 1.0, 0.3)
    spec = DataSpec(kind="image", shape=(1, 2, 2), mean=(0.0,), std=(1.0,), patch=1, token_mean=mean, token_var=var)
    cfg = NTMConfig(data=spec, trajectory=TrajectoryConfig(T=4, shift=-1.0), transporter=TransporterConfig(enabled=False),
                    predictor=PredictorConfig(layers=1, width=16, heads=2, precondition="data"))
    model = NTM(cfg).eval()
    exact = GaussianDataPosterior(torch.tensor(mean).reshape(4, 1), torch.tensor(var).reshape(4, 1))
    u, t = torch.randn(8, 4, 1), torch.rand(8) * 0.9 + 0.05
    s = t * 0.5
    mu, sigma = model.predictor(u, t, s)
    mu_ref, sigma_ref = exact(u, t, s)
    assert torch.allclose(mu, mu_ref, atol=1e-5) and torch.allclose(sigma, sigma_ref, atol=1e-5)
    B = posterior_coefficients(torch.ones(8), torch.zeros(8))[1].reshape(-1, 1, 1)
    mu1, _ = model.predictor(u, torch.ones(8), torch.zeros(8))
    assert torch.allclose(mu1, B * torch.tensor(mean).reshape(1, 4, 1).expand(8, 4, 1), atol=1e-6)
    unit = NTM(replace(cfg, predictor=replace(cfg.predictor, precondition="unit"))).eval()
    assert not torch.allclose(unit.predictor(u, t, s)[0], mu)
    from ntm.config import to_dict

    write_artifact(tmp_path / "m", "ntm", to_dict(cfg), {"model": model.state_dict()}, meta={"step": 0})
    again = NTM.from_pretrained(tmp_path / "m")
    assert again.config.data.token_var == var
    assert torch.allclose(again.predictor(u, t, s)[0], mu)
