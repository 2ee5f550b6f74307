"""Per-sample scores, the importance-weighted bound against K, Bayes classification and the
step-typicality statistic."""

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from ntm.config import DataSpec, NTMConfig, TrajectoryConfig, TransporterConfig
from ntm.likelihood import nll_bounds
from ntm.model import NTM
from ntm.predictor import GaussianDataPosterior, gaussian_log_prob
from ntm.scoring import (StepTypicality, bayes_posterior, class_log_likelihoods, level_mean, noisy_level_bound,
                         ntm_class_log_likelihoods, step_features)
from ntm.trajectory import forward_trajectory, transition_log_prob

from conftest import randomize


def test_scores_equal_the_bounds_of_nll_bound_on_the_same_seeds(random_model):
    x = torch.randn(37, 2)
    s = random_model.score(x, num_trajectories=5, generator=torch.Generator().manual_seed(3), batch_size=16)
    elbo, iw = nll_bounds(random_model, x, num_trajectories=5, generator=torch.Generator().manual_seed(3),
                          batch_size=16)
    assert torch.allclose(s["elbo"], elbo, atol=1e-4, rtol=1e-5)
    assert torch.allclose(s["iw"], iw, atol=1e-4, rtol=1e-5)
    assert torch.equal(s["nll"], s["iw"])
    # the per-step terms and the prior term add up to the ELBO bound (raw units: + sum log std = 0 here)
    assert torch.allclose(step_features(s).sum(1), s["elbo"], atol=1e-3)
    assert s["step_terms"].shape == (37, 4) and "bpd" not in s
    assert not torch.allclose(s["step_terms"][:, 0], s["step_terms"][:, 1])


def test_iw_bound_equals_elbo_at_one_trajectory_and_does_not_grow_with_k(random_model):
    x = torch.randn(200, 2) * 1.3
    one = random_model.score(x, num_trajectories=1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(one["iw"], one["elbo"], atol=1e-5)
    means = []
    for K in (1, 4, 16):
        # independent draws for each K: on average over samples the IW bound cannot rise with K
        s = random_model.score(x, num_trajectories=K, generator=torch.Generator().manual_seed(100 + K))
        means.append(float(s["iw"].mean()))
        assert (s["iw"] <= s["elbo"] + 1e-5).all()
    assert means[0] > means[1] > means[2]


def test_score_progress_is_called_once_per_batch(random_model):
    seen = []
    random_model.score(torch.randn(10, 2), num_trajectories=1, batch_size=4, progress=seen.append)
    assert seen == [4, 4, 2]


class ClassGaussians(nn.Module):
    """The exact reverse kernel of class-conditional Gaussian data x_0 | y ~ N(m_y, v)."""

    def __init__(self, means: torch.Tensor, var: torch.Tensor):
        super().__init__()
        self.posts = nn.ModuleList(GaussianDataPosterior(m, var) for m in means)

    def forward(self, x_t, t, s, y=None, T=None):
        outs = [p(x_t, t, s) for p in self.posts]
        pick = (y[:, None, None] == torch.arange(len(outs))[None, None, :]).float()[:, :, None]  # (B, 1, 1, C)
        mu = (torch.stack([o[0] for o in outs], -1) * pick).sum(-1)
        sigma = (torch.stack([o[1] for o in outs], -1) * pick).sum(-1)
        return mu, sigma


def test_bayes_classifier_reaches_the_bayes_optimal_accuracy_with_the_true_kernels():
    # two classes in 2-D, unit variance, means at distance delta: the optimal accuracy is Phi(delta / 2)
    means = torch.tensor([[[0.6], [0.0]], [[-0.6], [0.8]]])
    var = torch.ones(2, 1)
    delta = float((means[0] - means[1]).norm())
    spec = DataSpec(shape=(2,), mean=(0.0, 0.0), std=(1.0, 1.0), num_classes=2)
    cfg = NTMConfig(data=spec, trajectory=TrajectoryConfig(T=4, shift=-1.0), transporter=TransporterConfig(enabled=False))
    model = NTM(cfg, predictor=ClassGaussians(means, var)).eval()
    n = 4000
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = means[y][:, :, 0] + torch.randn(n, 2, generator=g)
    post = bayes_posterior(class_log_likelihoods(model, x, num_trajectories=2))
    exact_ll = torch.stack([-0.5 * (x - means[c][:, 0]).square().sum(1) for c in range(2)], 1)
    assert torch.allclose(post.exp(), bayes_posterior(exact_ll).exp(), atol=1e-3)
    acc = float((post.argmax(1) == y).float().mean())
    optimal = 0.5 * (1 + math.erf(delta / 2 / math.sqrt(2)))
    assert abs(acc - optimal) < 3 * math.sqrt(optimal * (1 - optimal) / n)


def test_class_log_likelihoods_share_the_transporter_and_equal_per_class_scores(small_config):
    torch.manual_seed(0)
    model = NTM(replace(small_config, data=replace(small_config.data, num_classes=3)))
    randomize(model, 0.2)
    model.eval()
    x = torch.randn(11, 2)
    ll = class_log_likelihoods(model, x, seed=5, num_trajectories=3, batch_size=4)
    both = ntm_class_log_likelihoods(model, x, (0, 1), seed=5, num_trajectories=3, batch_size=4)
    assert torch.equal(both[0], ll)
    for c in range(3):
        per_class = model.score(x, y=torch.full((11,), c), num_trajectories=3, batch_size=4,
                                generator=torch.Generator().manual_seed(5))
        assert torch.allclose(ll[:, c], -per_class["nll"], atol=1e-4, rtol=1e-5)
        # level 1: the bound on -log p(x_{t_1} | y) of the same trajectories, as read off the class's scores
        assert torch.allclose(both[1][:, c], -noisy_level_bound(per_class, level=1), atol=1e-4, rtol=1e-5)
    # the label-free transporter ran once per trajectory batch, not once per class
    calls = []
    model.transporter.register_forward_hook(lambda *a: calls.append(1))
    class_log_likelihoods(model, x, seed=5, num_trajectories=3, batch_size=4)
    assert len(calls) == 3 * 3  # 3 batches x 3 trajectories


def test_level_mean_pools_the_noisy_levels_of_each_class(small_config):
    """The mean over levels of log p(x_{t_j} | y) equals the mean of each class's level bounds read off
    its own scores (same trajectories); an empty or unscored level set is an error."""
    torch.manual_seed(0)
    model = NTM(replace(small_config, data=replace(small_config.data, num_classes=2)))
    randomize(model, 0.2)
    model.eval()
    x = torch.randn(5, 2)
    ll = ntm_class_log_likelihoods(model, x, (1, 2, 3), seed=3, num_trajectories=2)
    pooled = level_mean(ll, range(1, 4))
    for c in range(2):
        scores = model.score(x, y=torch.full((5,), c), num_trajectories=2, generator=torch.Generator().manual_seed(3))
        by_hand = -sum(noisy_level_bound(scores, level=j) for j in (1, 2, 3)) / 3
        assert torch.allclose(pooled[:, c], by_hand, atol=1e-4, rtol=1e-5)
    assert torch.equal(level_mean(ll, [2]), ll[2])
    for bad in ([], [0], [4]):
        with pytest.raises(ValueError, match="subset of the scored levels"):
            level_mean(ll, bad)


def test_bayes_classification_needs_labels_and_the_prior_shifts_the_posterior(random_model):
    with pytest.raises(ValueError, match="class-conditional"):
        class_log_likelihoods(random_model, torch.randn(3, 2))
    with pytest.raises(ValueError, match="class-conditional"):
        ntm_class_log_likelihoods(random_model, torch.randn(3, 2))
    ll = torch.tensor([[0.0, 0.0]])
    assert torch.allclose(bayes_posterior(ll).exp(), torch.tensor([[0.5, 0.5]]))
    skew = bayes_posterior(ll, torch.log(torch.tensor([0.9, 0.1]))).exp()
    assert torch.allclose(skew, torch.tensor([[0.9, 0.1]]))


def test_step_typicality_is_the_mahalanobis_distance_of_the_fitted_gaussian():
    g = torch.Generator().manual_seed(0)
    L = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.5, 0.0], [-0.3, 0.2, 0.4]])
    f = torch.randn(20000, 3, generator=g) @ L.T + torch.tensor([1.0, -2.0, 0.5])
    stat = StepTypicality(f, ridge=0.0)
    new = torch.randn(5, 3, generator=g)
    cov = L @ L.T
    d = new - torch.tensor([1.0, -2.0, 0.5])
    exact = (d @ torch.linalg.inv(cov) * d).sum(1)
    assert torch.allclose(stat.distance(new), exact, rtol=0.03, atol=0.03)
    # in-distribution distances are chi-square with 3 degrees of freedom: mean 3
    assert float(stat.distance(f[:5000]).mean()) == pytest.approx(3.0, abs=0.1)
    with pytest.raises(ValueError, match="more fitting samples"):
        StepTypicality(f[:3])


def test_noisy_level_bound_is_the_bound_on_the_first_noisy_level_of_the_same_trajectory(random_model):
    # an independent computation of -log p(x_{t_1}) + log q(x_{t_2:T} | x_{t_1}) - log N(x_1) from the same
    # draws: the forward trajectory redrawn with the score's seed, each step's log p from step_log_prob
    x = torch.randn(9, 2)
    s = random_model.score(x, num_trajectories=1, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    x0 = random_model.to_tokens(x)
    t = random_model.grid(9, 0.0)
    X = forward_trajectory(x0, t, generator=g)
    T = t.shape[1] - 1
    want = -gaussian_log_prob(X[:, -1], torch.zeros_like(X[:, -1]), torch.ones_like(X[:, -1]))
    for k in range(2, T + 1):
        with torch.no_grad():
            want = want - random_model.step_log_prob(X[:, k - 1], X[:, k], t[:, k - 1], t[:, k])
        want = want + transition_log_prob(X[:, k - 1], X[:, k], t[:, k - 1], t[:, k])
    assert torch.allclose(noisy_level_bound(s, level=1), want, atol=1e-3)
    # level 0 is the whole ELBO bound (raw units: no scale correction for this spec)
    assert torch.allclose(noisy_level_bound(s, level=0), s["elbo"], atol=1e-3)
    with pytest.raises(ValueError, match="level must be in 0..3"):
        noisy_level_bound(s, level=4)


def test_step_logdets_are_the_transporters_part_of_each_step(random_model):
    x = torch.randn(6, 2)
    s = random_model.score(x, num_trajectories=1, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(8)
    t = random_model.grid(6, 0.0)
    X = forward_trajectory(random_model.to_tokens(x), t, generator=g)
    with torch.no_grad():
        for k in range(1, t.shape[1]):
            _, logdet = random_model.transporter(X[:, k - 1], t[:, k - 1], random_model.steps_tensor(6, t.shape[1] - 1))
            assert torch.allclose(s["step_logdets"][:, k - 1], logdet, atol=1e-4)
