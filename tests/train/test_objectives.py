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


def test_multi_t_pairwise_loss_is_each_samples_own_step_times_its_t(small_config):
    """One pass over a batch that mixes lengths T in {2, 4, 8}: the loss is the mean of T_i times
    -log p of sample i's scored step, each rebuilt here alone from its own grid, levels and T."""
    from conftest import randomize

    from dataclasses import replace

    from ntm.model import NTM
    from ntm.train.objectives import NTMObjective

    torch.manual_seed(0)
    model = NTM(replace(small_config, trajectory=TrajectoryConfig(T=4, shift=-1.0, train_Ts=(2, 4, 8)),
                        transporter=replace(small_config.transporter, transform="spline")))
    randomize(model, 0.1, 0)
    objective = NTMObjective(model, "pairwise", 0.0)
    x0 = torch.randn(24, 2, 1)
    noise = objective.draw_noise(24, torch.Generator().manual_seed(3))
    assert len(set(noise.T.tolist())) == 3
    with torch.no_grad():
        loss, _ = objective(x0, None, noise)
        total = 0.0
        for i in range(24):
            T = int(noise.T[i])
            t = model.grid(1, noise.t_min[i:i + 1], T=T)
            k = int(noise.k_unif[i] * T) + 1
            s_, t_ = float(t[0, k - 1]), float(t[0, k])
            x_s = (1 - s_) * x0[i:i + 1] + s_ * noise.eps[i:i + 1, 0]  # the two levels by hand
            x_t = (1 - t_) / (1 - s_) * x_s + math.sqrt(t_**2 - ((1 - t_) / (1 - s_) * s_) ** 2) * noise.eps[i:i + 1, 1]
            lp = model.step_log_prob(x_s, x_t, t[:, k - 1], t[:, k], T=torch.tensor([float(T)]))
            total -= T * float(lp)
    assert float(loss) == pytest.approx(total / 24 / 2, rel=1e-5)


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


def _identity_model(seed=0):
    """A randomised predictor on 3-d data behind an identity transporter."""
    from conftest import randomize

    from ntm.config import DataSpec, NTMConfig, PredictorConfig, TransporterConfig
    from ntm.model import NTM

    torch.manual_seed(seed)
    model = NTM(NTMConfig(data=DataSpec(shape=(3,), mean=(0.0,) * 3, std=(1.0,) * 3),
                          trajectory=TrajectoryConfig(T=4, shift=-1.0), transporter=TransporterConfig(enabled=False),
                          predictor=PredictorConfig(layers=1, width=16, heads=2)))
    randomize(model.predictor, 0.3, seed)
    return model.eval()


def test_rao_blackwellised_step_is_the_closed_form_expectation():
    """With an identity transporter, NLL - cv = sum [ (B^2 (x0 - x0_hat)^2 + C^2) / (2 sigma^2) + log sigma ] + D/2 log 2 pi."""
    from ntm.train.objectives import NTMObjective, rao_blackwell_cv
    from ntm.trajectory import posterior_coefficients

    model = _identity_model()
    objective = NTMObjective(model, "e2e", 0.0, objective="nll-rb")
    x0 = torch.randn(64, 3, 1)
    noise = objective.draw_noise(64, torch.Generator().manual_seed(0))
    noise.t_min.fill_(0.02)  # every step has C > 0
    with torch.no_grad():
        steps = objective.scored_steps(x0, None, noise, torch.arange(64), 4)
        nll, loss = objective.step_losses(steps)
        A, B, C = (c.reshape(-1, 1, 1) for c in posterior_coefficients(steps.t, steps.s))
        x0_hat = (steps.out.mu - A * steps.x_t) / B
        sigma = steps.out.sigma
        closed = (0.5 * (B**2 * (steps.x0 - x0_hat) ** 2 + C**2) / sigma**2 + torch.log(sigma)).flatten(1).sum(1) \
            + 1.5 * math.log(2 * math.pi)
    assert torch.allclose(loss, closed, rtol=1e-4, atol=1e-4)
    assert torch.allclose(loss, nll - rao_blackwell_cv(steps), atol=1e-5) and not torch.allclose(loss, nll)


def test_control_variate_has_mean_zero_and_keeps_the_objective():
    """For fixed (x_t, x_0), cv averages to 0 over x_s ~ q(x_s | x_t, x_0); over whole trajectories,
    the "nll-rb" and "nll" losses agree in expectation, and the RB one varies less."""
    from ntm.train.objectives import NTMObjective, ScoredSteps, rao_blackwell_cv
    from ntm.trajectory import posterior_coefficients

    model = _identity_model(1)
    n = 20_000
    x0 = torch.randn(1, 3, 1).expand(n, 3, 1)
    t, s = torch.full((n,), 0.7), torch.full((n,), 0.4)
    g = torch.Generator().manual_seed(2)
    x_t = 0.3 * x0 + 0.7 * torch.randn(1, 3, 1, generator=g)  # one fixed noisy level
    A, B, C = (c.reshape(-1, 1, 1) for c in posterior_coefficients(t, s))
    x_s = A * x_t + B * x0 + C * torch.randn(n, 3, 1, generator=g)
    with torch.no_grad():
        out = model.step(x_s, x_t, s, t)
        cv = rao_blackwell_cv(ScoredSteps(out, x_s, x_t, x0, s, t, torch.full((n,), 2), None, 1, 1.0))
    assert abs(float(cv.mean())) < 4 * float(cv.std()) / math.sqrt(n) and float(cv.std()) > 0.1
    plain, rb = NTMObjective(model, "e2e", 0.0), NTMObjective(model, "e2e", 0.0, objective="nll-rb")
    data = torch.randn(4096, 3, 1, generator=g)
    with torch.no_grad():
        a = torch.stack([plain(data, None, plain.draw_noise(4096, torch.Generator().manual_seed(i)))[0] for i in range(8)])
        b = torch.stack([rb(data, None, rb.draw_noise(4096, torch.Generator().manual_seed(i)))[0] for i in range(8)])
    diff = a - b  # same noise: the difference is the control variate's batch mean
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(8) + 1e-3
    assert float(b.std()) < float(a.std())


def test_hybrid_weight_zero_is_exactly_the_nll_objective_and_the_term_by_hand(random_model):
    from ntm.train.objectives import NTMObjective, hybrid_weight_at
    from ntm.trajectory import forward_pair, posterior_coefficients

    x0 = torch.randn(32, 2, 1)
    plain = NTMObjective(random_model, "pairwise", 0.0)
    zero = NTMObjective(random_model, "pairwise", 0.0, hybrid_weight=0.0)
    hybrid = NTMObjective(random_model, "pairwise", 0.0, hybrid_weight=1.5)
    noise = plain.draw_noise(32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(x0, None, noise)[0], zero(x0, None, noise)[0])
        loss, parts = hybrid(x0, None, noise)
        t = random_model.grid(32, noise.t_min)
        k = (noise.k_unif * 4).long().clamp(max=3) + 1
        rows = torch.arange(32)
        _, x_t = forward_pair(x0, t[rows, k - 1], t[rows, k], noise.eps)
        u_t, _ = random_model.transporter(x_t, t[rows, k])
        mu, _ = random_model.predictor(u_t, t[rows, k], t[rows, k - 1])
        A, B, _ = (c.reshape(-1, 1, 1) for c in posterior_coefficients(t[rows, k], t[rows, k - 1]))
        err = ((mu - A * u_t) / B - x0).square().sum((1, 2)) / t[rows, k] ** 2
        by_hand = float((4 * torch.where(k >= 2, err, torch.zeros_like(err))).mean()) / 2
    assert parts["hybrid"] == pytest.approx(by_hand, rel=1e-5) and parts["hybrid_weight"] == 1.5
    assert float(loss) == pytest.approx(parts["nll"] + 1.5 * by_hand, rel=1e-5)
    assert hybrid_weight_at(0.3, 2.0, "cosine") == 2.0 and hybrid_weight_at(0.75, 2.0, "cosine") == pytest.approx(1.0)
    assert hybrid_weight_at(1.0, 2.0, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_stratified_pairwise_steps_are_balanced_and_unbiased(random_model):
    from ntm.train.objectives import NTMObjective

    strat = NTMObjective(random_model, "pairwise", 0.0, stratified=True)
    noise = strat.draw_noise(64, torch.Generator().manual_seed(3))
    k = (noise.k_unif * 4).long() + 1
    assert torch.bincount(k, minlength=5)[1:].tolist() == [16, 16, 16, 16]
    e2e = NTMObjective(random_model, "e2e", 0.0)
    x0 = torch.randn(256, 2, 1)
    with torch.no_grad():
        a = torch.stack([e2e(x0, None, e2e.draw_noise(256, torch.Generator().manual_seed(i)))[0] for i in range(20)])
        b = torch.stack([strat(x0, None, strat.draw_noise(256, torch.Generator().manual_seed(50 + i)))[0] for i in range(100)])
    assert abs(float(b.mean() - a.mean())) < 4 * float(b.std()) / math.sqrt(100) + 4 * float(a.std()) / math.sqrt(20)


def test_pairwise_noise_holds_two_levels_and_shards_with_the_batch(random_model):
    """Pair-wise batches draw the noise of the scored step's two levels only, e2e the whole trajectory;
    a shard of the noise scores the same steps as the matching rows of the full batch."""
    from ntm.train.objectives import NTMObjective

    pair, e2e = NTMObjective(random_model, "pairwise", 0.0), NTMObjective(random_model, "e2e", 0.0)
    noise = pair.draw_noise(12, torch.Generator().manual_seed(5))
    assert noise.eps.shape == (12, 2, 2, 1)
    assert e2e.draw_noise(12, torch.Generator().manual_seed(5)).eps.shape == (12, 5, 2, 1)
    x0 = torch.randn(12, 2, 1)
    with torch.no_grad():
        whole = pair.scored_pairs(x0, None, noise)
        part = pair.scored_pairs(x0[4:8], None, noise.shard(4, 8))
    assert torch.equal(part.x_s, whole.x_s[4:8]) and torch.equal(part.x_t, whole.x_t[4:8])


def test_step_weights_scale_each_step(random_model):
    from ntm.train.objectives import NTMObjective

    x0 = torch.randn(16, 2, 1)
    plain = NTMObjective(random_model, "e2e", 0.0)
    weighted = NTMObjective(random_model, "e2e", 0.0, step_weights=(1.0, 0.0, 0.0, 0.0))
    noise = plain.draw_noise(16, torch.Generator().manual_seed(1))
    with torch.no_grad():
        steps = plain.scored_steps(x0, None, noise, torch.arange(16), 4)
        first = -steps.out.log_prob().reshape(16, 4)[:, 0]
        assert float(weighted(x0, None, noise)[0]) == pytest.approx(float(first.mean()) / 2, rel=1e-5)
    with pytest.raises(ValueError):
        NTMObjective(random_model, step_weights=(1.0, 2.0))


def test_t_weights_set_the_mix_of_lengths_and_default_to_uniform(small_config):
    from dataclasses import replace

    from ntm.model import NTM
    from ntm.train.objectives import NTMObjective

    model = NTM(replace(small_config, trajectory=TrajectoryConfig(T=4, shift=-1.0, train_Ts=(2, 4, 8))))
    n = 60_000
    for weights, expected in (((), (1 / 3, 1 / 3, 1 / 3)), ((2.0, 4.0, 8.0), (1 / 7, 2 / 7, 4 / 7))):
        T = NTMObjective(model, "pairwise", T_weights=weights).draw_noise(n, torch.Generator().manual_seed(0)).T
        for v, p in zip((2, 4, 8), expected):
            assert float((T == v).float().mean()) == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))
    for bad in ((1.0, 2.0), (1.0, 0.0, 1.0)):
        with pytest.raises(ValueError, match="T weights"):
            NTMObjective(model, "pairwise", T_weights=bad)
    from ntm.config import TrainConfig, validate_train_config
    from ntm.errors import ConfigError

    with pytest.raises(ConfigError, match="T weights"):
        validate_train_config(TrainConfig(T_weights=(1.0, -1.0)))
