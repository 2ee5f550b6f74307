"""Starting NTM from a flow-matching model: exact equivalence at step 0, the aux-loss schedule, the
sign convention, and the CLI."""
import json
import math

import pytest
import torch

from ntm import NTM, FlowMatching
from ntm.cli import main
from ntm.config import DataSpec, ModelConfig, PredictorConfig, TrajectoryConfig
from ntm.finetune import (VelocityAdapter, VelocityPredictor, aux_weight_at, finetune_config, initial_weights)
from ntm.predictor import gaussian_log_prob
from ntm.trajectory import forward_trajectory, posterior_coefficients

from conftest import randomize


def _fm_and_ntm(seed=0, velocity_scale="floor"):
    fm_cfg = ModelConfig(kind="fm", data=DataSpec(shape=(3,), mean=(0.0,) * 3, std=(1.0,) * 3, num_classes=2),
                         trajectory=TrajectoryConfig(T=4, shift=-1.0), predictor=PredictorConfig(layers=2, width=16, heads=2))
    torch.manual_seed(seed)
    fm = FlowMatching(fm_cfg)
    randomize(fm, 0.3, seed)
    ntm = NTM(finetune_config(fm_cfg, "tiny", velocity_scale))
    ntm.load_state_dict(initial_weights(ntm, fm))
    return fm.eval(), ntm.eval()


def test_step_zero_mean_and_scale_are_the_gaussian_posterior():
    fm, ntm = _fm_and_ntm()
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
    fm, ntm = _fm_and_ntm(5, "x0")
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


def test_pretrained_weights_get_their_own_learning_rate():
    from dataclasses import replace

    from ntm.config import TrainConfig
    from ntm.training import make_optimizer

    _, ntm = _fm_and_ntm()
    cfg = TrainConfig(lr=2e-3, steps=100, warmup=10)
    opt, _ = make_optimizer(ntm, cfg)  # not finetuning: one learning rate
    assert len(opt.param_groups) == 2
    opt, sched = make_optimizer(ntm, replace(cfg, teacher="fm-run", pretrained_lr_scale=0.25))
    velocity = {id(p) for p in ntm.predictor.velocity.parameters()}
    seen = set()
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= velocity or not ids & velocity
        assert group["initial_lr"] == pytest.approx(5e-4 if ids <= velocity else 2e-3)
        seen |= ids
    assert seen == {id(p) for p in ntm.parameters()}
    for _ in range(10):
        opt.step()
        sched.step()
    lrs = {g["initial_lr"]: g["lr"] for g in opt.param_groups}
    assert lrs[2e-3] == pytest.approx(4 * lrs[5e-4], rel=0.05)  # the warmup/cosine schedule scales both
    opt, _ = make_optimizer(ntm, replace(cfg, teacher="fm-run", pretrained_lr_scale=0.0))  # frozen backbone
    kept = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not kept & velocity and kept == {id(p) for p in ntm.parameters()} - velocity


def test_step_zero_samples_and_nll_equal_the_fm_gaussian_posterior_sampler():
    fm, ntm = _fm_and_ntm(3)
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


def test_aux_weight_follows_the_cosine_schedule():
    assert aux_weight_at(0.0, 2.5) == 2.5 and aux_weight_at(1.0, 2.5) == pytest.approx(0.0, abs=1e-12)
    assert aux_weight_at(0.5, 2.5) == pytest.approx(1.25)
    assert aux_weight_at(0.25, 2.0) == pytest.approx(1.0 + math.cos(math.pi / 4))


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


def test_finetune_cli_with_and_without_aux(tmp_path, capsys, monkeypatch):
    fm_run = tmp_path / "fm"
    assert main(["train", "--data", "moons", "--model", "fm", "--preset", "tiny", "--out", str(fm_run), "--no-progress"]) == 0
    for w in ("2.5", "0"):
        run = tmp_path / f"ft-{w}"
        assert main(["finetune", "--from", str(fm_run), "--out", str(run), "--data", "moons", "--preset", "tiny",
                     "--steps", "12", "--aux-weight", w, "--no-progress"]) == 0
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        if w == "2.5":
            assert recs[0]["aux_weight"] < 2.5 and all("aux" in r for r in recs[:-1])
        else:
            assert all("aux" not in r for r in recs)
        model = NTM.from_pretrained(run)
        assert model.config.predictor.kind == "velocity" and model.sample(8).shape == (8, 2)
    frozen = tmp_path / "ft-frozen"
    clip, graded = torch.nn.utils.clip_grad_norm_, []

    def recording_clip(params, *args, **kwargs):  # which parameters reach gradient clipping with a gradient?
        params = list(params)
        graded.append(sum(p.grad is not None for p in params))
        return clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    assert main(["finetune", "--from", str(fm_run), "--out", str(frozen), "--data", "moons", "--preset", "tiny",
                 "--steps", "6", "--freeze-backbone", "--no-progress"]) == 0
    monkeypatch.undo()
    n_fresh = sum(1 for name, _ in NTM.from_pretrained(frozen).named_parameters()
                  if not name.startswith("predictor.velocity."))
    assert graded and all(n <= n_fresh for n in graded)  # the frozen backbone never enters the gradient norm
    fm, ft = FlowMatching.from_pretrained(fm_run), NTM.from_pretrained(frozen)
    for k, v in fm.velocity.state_dict().items():  # the backbone did not move; the fresh parts did
        assert torch.equal(ft.predictor.velocity.state_dict()[k], v)
    assert any(b.proj_out.weight.abs().sum() > 0 for b in ft.transporter.blocks)  # zero at init
    assert main(["finetune", "--from", str(fm_run), "--out", str(frozen), "--data", "moons", "--resume",
                 "--freeze-backbone"]) == 2
    assert main(["finetune", "--from", str(tmp_path / "ft-0"), "--out", str(tmp_path / "x"), "--data", "moons"]) == 1
    assert main(["finetune", "--from", str(fm_run), "--out", str(tmp_path / "y"), "--data", "8gaussians"]) == 1
    assert main(["finetune", "--from", str(fm_run), "--out", str(tmp_path / "z"), "--data", "moons",
                 "--velocity-scale", "wide"]) == 2
    assert not (tmp_path / "z").exists() or not any((tmp_path / "z").iterdir())


def test_ablation_needs_the_bench_teacher(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "finetune", "--ablation", "--quick", "--no-progress"]) == 1
    assert "no FM teacher" in capsys.readouterr().err


def test_finetune_bench_end_to_end(tmp_path, monkeypatch):
    from ntm.image_bench import run_finetune_bench

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NTM_CACHE_DIR", str(tmp_path / "cache"))
    res = run_finetune_bench("mnist", quick=True, steps=4, n_samples=20, progress=False, classifier_steps=10,
                             settings={"n_bpd": 4, "n_bpd_fm": 2, "fm_ode_steps": 2, "bpd_trajectories": 1})
    assert [(r["model"], r["steps"], r.get("aux_weight")) for r in res["rows"]] == [
        ("fm", 4, None), ("fm", 50, None), ("ntm-ft", 4, 2.5), ("ntm-ft", 4, 0.0), ("ntm-ft", 4, 2.5), ("ntm", 4, None)]
    assert [r.get("backbone") for r in res["rows"][2:]] == ["trained", "trained", "frozen", None]
    assert res["config"]["finetune_steps"] == 1 and res["config"]["scratch_steps"] == 5
    assert (tmp_path / "results" / "mnist-finetune-quick.json").is_file()
    assert (tmp_path / "results" / "mnist-finetune-quick" / "finetune-loss-curves.png").is_file()
    # the ablation reuses that teacher
    from ntm.image_bench import run_finetune_ablation
    abl = run_finetune_ablation("mnist", quick=True, steps=2, n_samples=20, n_bpd=4, progress=False,
                                classifier_steps=10, variants=(("a", "floor", 1e-3, 1e-3, 0.01), ("b", "x0", 0.0, 4e-3, 0.005)))
    assert [r["variant"] for r in abl["rows"]] == ["step-0", "a", "b"] and abl["rows"][2]["fresh_lr"] == pytest.approx(4e-3)
    assert all(math.isfinite(r["bpd"]) and math.isfinite(r["fid"]) for r in abl["rows"])
    assert (tmp_path / "results" / "mnist-finetune-ablation-quick.md").is_file()
    from ntm.benchmarks import check_bench_output
    check_bench_output(tmp_path / "results" / "mnist-finetune-ablation-quick.json")  # a re-run may replace it
