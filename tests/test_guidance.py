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
