"""Training objectives: what each one computes, checked against closed forms and independent sums."""
import math

import pytest
import torch
from conftest import gaussian_flow
from torch import nn

from ntm import FlowMatching
from ntm.config import TrajectoryConfig
from ntm.train.objectives import aux_weight_at


def test_training_t_min_stays_below_t1_for_every_length():
    from ntm.config import NTMConfig
    from ntm.model import NTM
    from ntm.train.objectives import NTMObjective
    from ntm.trajectory import first_level
    model = NTM(NTMConfig(trajectory=TrajectoryConfig(T=4, shift=-1.0, train_Ts=(4, 8, 16))))
    noise = NTMObjective(model).draw_noise(20_000, torch.Generator().manual_seed(0))
    for T in (4, 8, 16):
        sel = noise.t_min[noise.T == T]
        assert sel.numel() > 1000 and float(sel.max()) < first_level(T, -1.0)
        assert float(sel.max()) == pytest.approx(min(0.05, first_level(T, -1.0) / 2), rel=0.01)


class Shifted(nn.Module):
    """A velocity off the exact one by a constant c."""

    def __init__(self, exact: nn.Module, c: float):
        super().__init__()
        self.exact, self.c = exact, c

    def forward(self, x, t, y=None):
        return self.exact(x, t, y) + self.c


def test_loss_at_the_exact_velocity_is_the_conditional_variance():
    """For x_0 ~ N(m, s^2), w = eps - x_0 and x_t are jointly Gaussian, so the loss of the exact
    velocity E[w | x_t] is Var[w | x_t] = 1 + s^2 - (t - (1 - t) s^2)^2 / ((1 - t)^2 s^2 + t^2), and
    a velocity off by c costs c^2 more."""
    from ntm.train.objectives import FlowMatchingObjective

    m, s, n = 0.7, 0.4, 40_000
    fm = gaussian_flow(m, s)
    objective = FlowMatchingObjective(fm, class_dropout=0.0)
    noise = objective.draw_noise(n, torch.Generator().manual_seed(0))
    x0 = m + s * torch.randn(n, 3, 1, generator=torch.Generator().manual_seed(1))
    t = noise.t.double()
    cond_var = 1 + s**2 - (t - (1 - t) * s**2) ** 2 / ((1 - t) ** 2 * s**2 + t**2)
    loss, parts = objective(x0, None, noise)
    se = float(cond_var.std()) / math.sqrt(n) + 2 * float(cond_var.mean()) * math.sqrt(2 / (3 * n))
    assert abs(float(loss) - float(cond_var.mean())) < 4 * se and parts["mse"] == pytest.approx(float(loss))
    off, _ = FlowMatchingObjective(FlowMatching(fm.config, velocity=Shifted(fm.velocity, 0.3)), 0.0)(x0, None, noise)
    assert float(off - loss) == pytest.approx(0.09, abs=4 * 0.6 * math.sqrt(float(cond_var.mean()) / (3 * n)))


def test_aux_weight_follows_the_cosine_schedule():
    assert aux_weight_at(0.0, 2.5) == 2.5 and aux_weight_at(1.0, 2.5) == pytest.approx(0.0, abs=1e-12)
    assert aux_weight_at(0.5, 2.5) == pytest.approx(1.25)
    assert aux_weight_at(0.25, 2.0) == pytest.approx(1.0 + math.cos(math.pi / 4))



def test_e2e_objective_is_the_trajectory_nll_per_dimension(random_model):
    """The e2e loss equals -sum_k log p(x_{t_{k-1}} | x_{t_k}) / dim on the same trajectories, rebuilt
    here from the objective's noise with forward_trajectory and the model's step-by-step density."""
    from ntm.train.objectives import NTMObjective
    from ntm.trajectory import forward_trajectory

    objective = NTMObjective(random_model, mode="e2e", class_dropout=0.0)
    x0 = torch.randn(32, 2, 1)
    noise = objective.draw_noise(32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss, parts = objective(x0, None, noise)
        t = random_model.grid(32, noise.t_min)
        X = forward_trajectory(x0, t, noise=noise.eps[:, :5])
        nll = -sum(random_model.step_log_prob(X[:, k - 1], X[:, k], t[:, k - 1], t[:, k]) for k in range(1, 5))
    assert float(loss) == pytest.approx(float(nll.mean()) / 2, rel=1e-5) and parts["nll"] == pytest.approx(float(loss))


def test_pairwise_loss_is_unbiased_for_e2e(random_model):
    from ntm.train.objectives import NTMObjective

    torch.manual_seed(0)
    x0 = torch.randn(256, 2, 1)
    e2e, pw = NTMObjective(random_model, "e2e", 0.0), NTMObjective(random_model, "pairwise", 0.0)
    with torch.no_grad():
        a = torch.stack([e2e(x0, None, e2e.draw_noise(256, torch.Generator().manual_seed(i)))[0] for i in range(20)])
        b = torch.stack([pw(x0, None, pw.draw_noise(256, torch.Generator().manual_seed(100 + i)))[0] for i in range(200)])
    assert abs(float(b.mean() - a.mean())) < 4 * float(b.std()) / math.sqrt(200) + 4 * float(a.std()) / math.sqrt(20)


def test_mean_alignment_term_against_the_teacher_by_hand():
    """FinetuneObjective's aux part is sum_k ||mu_P - mu_FM||^2 / dim with mu_FM = A x_t + B (x_t - t v);
    at progress p its weight is the cosine schedule, and the loss is nll + weight * aux."""
    from conftest import fm_and_ntm, randomize

    from ntm.train.objectives import FinetuneObjective
    from ntm.trajectory import forward_trajectory, posterior_coefficients

    fm, ntm = fm_and_ntm(2, "x0")
    randomize(ntm.predictor.velocity, 0.1, seed=5)  # the student drifts from its teacher
    objective = FinetuneObjective(ntm, fm, aux_weight=2.5, mode="e2e", class_dropout=0.0)
    x0, y = torch.randn(16, 3, 1), torch.randint(0, 2, (16,))
    noise = objective.draw_noise(16, torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss, parts = objective(x0, y, noise, progress=0.25)
        t = ntm.grid(16, noise.t_min)
        X = forward_trajectory(x0, t, noise=noise.eps[:, :5])
        aux = 0.0
        for k in range(1, 5):
            mu, _ = ntm.predictor(X[:, k], t[:, k], t[:, k - 1], y)  # identity transporter: u = x
            A, B, _ = (c.reshape(-1, 1, 1) for c in posterior_coefficients(t[:, k], t[:, k - 1]))
            target = A * X[:, k] + B * (X[:, k] - t[:, k].reshape(-1, 1, 1) * fm.velocity(X[:, k], t[:, k], y))
            aux = aux + (mu - target).pow(2).flatten(1).sum(1)
    assert parts["aux"] == pytest.approx(float(aux.mean()) / 3, rel=1e-5) and parts["aux"] > 0
    assert parts["aux_weight"] == pytest.approx(aux_weight_at(0.25, 2.5))
    assert float(loss) == pytest.approx(parts["nll"] + parts["aux_weight"] * parts["aux"], rel=1e-5)
    assert not any(p.requires_grad for p in objective.teacher.parameters())
