"""The flow-matching baseline: closed-form velocity on Gaussian data, its ODE likelihood, guidance,
checkpoints, and the CLI."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from ntm import FlowMatching, NTM, load_model
from ntm.cli import main
from ntm.config import DataSpec, ModelConfig, PredictorConfig, TrajectoryConfig
from ntm.errors import CheckpointError
from ntm.flow_matching import network_evaluations, solve_ode


class GaussianVelocity(nn.Module):
    """E[eps - x_0 | x_t] when x_0 ~ N(m, s^2) per coordinate, under x_t = (1 - t) x_0 + t eps."""

    def __init__(self, m: float, s: float):
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x, t, y=None):
        tt = t.double().reshape(-1, 1, 1)
        var = (1 - tt) ** 2 * self.s**2 + tt**2
        r = x.double() - (1 - tt) * self.m
        e_x0 = self.m + (1 - tt) * self.s**2 / var * r
        e_eps = tt / var * r
        return (e_eps - e_x0).float()


def gaussian_flow(m=0.7, s=0.4, dim=3, shift=0.0):
    cfg = ModelConfig(kind="fm", data=DataSpec(shape=(dim,), mean=(0.0,) * dim, std=(1.0,) * dim),
                      trajectory=TrajectoryConfig(shift=shift))
    return FlowMatching(cfg, velocity=GaussianVelocity(m, s)).eval()


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
    cfg = ModelConfig(kind="fm", data=DataSpec(shape=(dim,), mean=(1.0, -2.0), std=(2.0, 0.5)))
    fm = FlowMatching(cfg, velocity=GaussianVelocity(0.0, 1.0)).eval()  # standardised data ~ N(0, 1)
    x = torch.tensor([[1.0, -2.0], [3.0, -1.5]])
    true = -torch.distributions.Normal(torch.tensor([1.0, -2.0]), torch.tensor([2.0, 0.5])).log_prob(x).sum(1)
    assert torch.allclose(fm.nll(x, steps=200), true, atol=1e-4)


def test_linear_cfg_on_the_velocity():
    class LabelVelocity(nn.Module):
        def forward(self, x, t, y=None):
            return x * 0 + (0.0 if y is None else y.float().reshape(-1, 1, 1) + 1)

    cfg = ModelConfig(kind="fm", data=DataSpec(shape=(2,), num_classes=3))
    fm = FlowMatching(cfg, velocity=LabelVelocity())
    x, t = torch.zeros(2, 2, 1), torch.full((2,), 0.5)
    y = torch.tensor([0, 1])
    v = fm.guided_velocity(x, t, y, guidance=2.0)
    v_c, v_u = y.float() + 1, torch.full((2,), 3.0 + 1)  # the null label is 3
    assert torch.allclose(v[:, 0, 0], v_c + 2.0 * (v_c - v_u))
    with pytest.raises(ValueError):
        fm.guided_velocity(x, t, y, guidance=-1.0)


def test_same_backbone_as_the_predictor():
    cfg = ModelConfig(kind="fm", data=DataSpec(kind="image", shape=(1, 8, 8), mean=(0.0,), std=(1.0,), patch=2),
                      predictor=PredictorConfig(layers=2, width=32, heads=2))
    fm, ntm = FlowMatching(cfg), NTM(cfg)
    fm_keys = {k: v.shape for k, v in fm.velocity.state_dict().items() if "time_s" not in k}
    pred_keys = {k: v.shape for k, v in ntm.predictor.state_dict().items() if "time_s" not in k and "proj_out" not in k}
    assert set(pred_keys) <= set(fm_keys)
    assert all(fm_keys[k] == v for k, v in pred_keys.items())


def test_loss_is_the_velocity_regression():
    fm = gaussian_flow()
    x0 = torch.randn(16, 3, 1)
    noise = fm.draw_training_noise(16, torch.Generator().manual_seed(0))
    tt = noise.t.reshape(-1, 1, 1)
    x_t = (1 - tt) * x0 + tt * noise.eps
    expected = ((fm.velocity(x_t, noise.t) - (noise.eps - x0)) ** 2).sum((1, 2)).mean() / 3
    assert torch.allclose(fm.loss(x0, noise=noise), expected)


def test_fm_cli_train_sample_eval_and_reload(tmp_path, capsys):
    run = tmp_path / "fm"
    assert main(["train", "--data", "moons", "--model", "fm", "--preset", "tiny", "--out", str(run), "--no-progress"]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    model = load_model(run)
    assert isinstance(model, FlowMatching) and isinstance(FlowMatching.from_pretrained(run), FlowMatching)
    with pytest.raises(CheckpointError):
        NTM.from_pretrained(run)
    for solver in ("euler", "heun"):
        out = tmp_path / f"{solver}.npy"
        assert main(["sample", str(run), "--n", "50", "--steps", "4", "--solver", solver, "--out", str(out)]) == 0
        assert np.load(out).shape == (50, 2)
    capsys.readouterr()
    assert main(["eval", str(run), "--data", "moons", "--n", "40", "--steps", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["divergence"] == "exact" and math.isfinite(res["ode_nll_nats"])
    assert main(["sample", str(run), "--n", "5", "--t-min", "0.1", "--out", str(tmp_path / "x.npy")]) == 2


def test_toy_bench_fm_rows(tmp_path, capsys):
    out = tmp_path / "fm.json"
    assert main(["bench", "toy", "--preset", "tiny", "--steps", "4", "--data", "8gaussians", "--models", "fm",
                 "--out", str(out), "--n-eval", "40", "--n-samples", "60", "--seeds", "1", "--no-progress"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["steps"], r["solver"], r["nfe"]) for r in rows] == [
        ("fm", 1, "euler", 1), ("fm", 2, "euler", 2), ("fm", 4, "euler", 4), ("fm", 8, "euler", 8),
        ("fm", 64, "euler", 64), ("fm", 4, "heun", 7)]
    assert all(math.isfinite(r["nll_bound"]) and r["iw_bound"] is None and "ODE" in r["nll_kind"] for r in rows)
    assert "4 heun" in out.with_suffix(".md").read_text()
