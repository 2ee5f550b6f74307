"""Product-rule guidance against the exact Gaussian proportional to p_c^(1+w) / p_u^w."""

import torch

from ntm.guidance import product_rule


def _grid_moments(mu_c, s_c, mu_u, s_u, w):
    """Mean and std of the density proportional to N(mu_c, s_c)^(1+w) / N(mu_u, s_u)^w on a fine grid."""
    x = torch.linspace(-30, 30, 400_001, dtype=torch.float64)
    logp = (1 + w) * (-0.5 * ((x - mu_c) / s_c) ** 2 - torch.log(torch.tensor(s_c))) \
        - w * (-0.5 * ((x - mu_u) / s_u) ** 2 - torch.log(torch.tensor(s_u)))
    p = torch.softmax(logp, 0)
    m = (p * x).sum()
    return float(m), float(((p * (x - m) ** 2).sum()).sqrt())


def test_product_rule_equals_exact_gaussian_product():
    cases = [(0.3, 0.5, -0.4, 0.9, 1.0), (1.0, 0.2, 0.0, 0.3, 3.0), (-2.0, 1.0, 1.0, 1.5, 0.5), (0.0, 0.7, 0.5, 0.7, 2.0)]
    for mu_c, s_c, mu_u, s_u, w in cases:
        mu, sigma = product_rule(*(torch.tensor([v]) for v in (mu_c, s_c, mu_u, s_u)), w)
        m_ref, s_ref = _grid_moments(mu_c, s_c, mu_u, s_u, w)
        assert abs(float(mu) - m_ref) < 1e-4
        assert abs(float(sigma) - s_ref) < 1e-4


def test_product_rule_clips_to_conditional_precision():
    # sigma_c > sigma_u: the unclipped product would be wider than p_c (or improper); clipping keeps sigma <= sigma_c
    mu, sigma = product_rule(torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.5]), 2.0)
    assert float(sigma) <= 1.0 + 1e-7
    assert float(mu) == 0.5 * 3 / 1  # r = 1: mu = ((1 + w) mu_c - w mu_u) / 1


def test_zero_guidance_is_conditional():
    mu_c, s_c = torch.randn(10), torch.rand(10) + 0.1
    mu, sigma = product_rule(mu_c, s_c, torch.randn(10), torch.rand(10) + 0.1, 0.0)
    assert torch.allclose(mu, mu_c) and torch.allclose(sigma, s_c)


def test_ntm_predict_is_the_product_of_its_conditional_and_null_gaussians():
    """A randomised predictor (so the conditional and null predictions differ): NTM.predict with w > 0
    equals the Gaussian proportional to p_c^(1+w) / p_u^w in precision form, elementwise, where
    sigma_c <= sigma_u, and the clipped rule ((1 + w) mu_c - w mu_u, sigma_c) elsewhere."""
    from conftest import randomize

    from ntm.config import DataSpec, NTMConfig, PredictorConfig, TrajectoryConfig, TransporterConfig
    from ntm.model import NTM

    torch.manual_seed(0)
    cfg = NTMConfig(data=DataSpec(shape=(3,), mean=(0.0,) * 3, std=(1.0,) * 3, num_classes=4),
                    trajectory=TrajectoryConfig(T=4, shift=-1.0), transporter=TransporterConfig(blocks=1, layers=1, width=16, heads=2),
                    predictor=PredictorConfig(layers=2, width=32, heads=2))
    model = NTM(cfg)
    randomize(model.predictor, 0.5, seed=3)
    g = torch.Generator().manual_seed(1)
    u, t = torch.randn(64, 3, 1, generator=g), torch.rand(64, generator=g) * 0.9 + 0.1
    s, y = t * torch.rand(64, generator=g), torch.randint(0, 4, (64,), generator=g)
    with torch.no_grad():
        mu_c, s_c = model.predictor(u, t, s, y)
        mu_u, s_u = model.predictor(u, t, s, torch.full_like(y, 4))
        assert (mu_c - mu_u).abs().max() > 1e-2 and (s_c - s_u).abs().max() > 1e-3  # guidance has work to do
        for w in (0.5, 2.0):
            mu, sigma = model.predict(u, t, s, y, guidance=w)
            mu_c64, s_c64, mu_u64, s_u64 = (v.double() for v in (mu_c, s_c, mu_u, s_u))
            precision = (1 + w) / s_c64**2 - w / s_u64**2
            mean = ((1 + w) * mu_c64 / s_c64**2 - w * mu_u64 / s_u64**2) / precision
            product = s_c64 <= s_u64
            assert product.any() and (~product).any()
            assert torch.allclose(sigma.double()[product], precision[product].rsqrt(), rtol=1e-4)
            assert torch.allclose(mu.double()[product], mean[product], rtol=1e-4, atol=1e-5)
            assert torch.allclose(sigma.double()[~product], s_c64[~product], rtol=1e-5)
            assert torch.allclose(mu.double()[~product], ((1 + w) * mu_c64 - w * mu_u64)[~product], rtol=1e-4, atol=1e-5)

