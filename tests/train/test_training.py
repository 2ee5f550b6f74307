"""Training: exact resume, the non-finite guard, atomic checkpoints, EMA and the LR schedule."""

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from ntm import io as io_mod
from ntm.config import (NTMConfig, PredictorConfig, TrainConfig, TrajectoryConfig, TransporterConfig,
                        validate_train_config)
from ntm.data import DataSource, sample_toy, toy_log_density
from ntm.errors import CheckpointError, ConfigError
from ntm.model import NTM
from ntm.train import EMA, make_optimizer, train
from ntm.train import checkpoint as ckpt_mod


@pytest.mark.slow
def test_trained_bound_is_above_true_nll():
    """A briefly trained model's bounds on 8gaussians are >= the exact NLL minus Monte Carlo error."""
    import tempfile

    from ntm.config import TrainConfig
    from ntm.data import DataSource
    from ntm.train import train

    src = DataSource("8gaussians")
    cfg = NTMConfig(data=src.spec(), trajectory=TrajectoryConfig(T=4, shift=-1.0),
                      transporter=TransporterConfig(blocks=2, layers=1, width=16, heads=2),
                      predictor=PredictorConfig(layers=2, width=32, heads=2))
    with tempfile.TemporaryDirectory() as d:
        train(cfg, TrainConfig(steps=150, batch_size=256, warmup=10, lr=2e-3, checkpoint_every=1000), src, d, progress=False, device="cpu")
        model = NTM.from_pretrained(d)
    x = sample_toy("8gaussians", 2000, torch.Generator().manual_seed(5))
    true_nll = -toy_log_density("8gaussians", x).float()
    untrained = NTM(cfg).nll_bound(x, num_trajectories=4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for iw in (False, True):
        bound = model.nll_bound(x, num_trajectories=8, importance_weighted=iw, generator=g)
        diff = bound - true_nll
        assert float(diff.mean()) >= -3 * float(diff.std()) / math.sqrt(len(diff))
    from ntm.likelihood import nll_bounds
    elbo, iwb = nll_bounds(model, x, num_trajectories=8, generator=torch.Generator().manual_seed(3))
    assert (iwb <= elbo + 1e-5).all()  # same trajectories: the IW bound is tighter point by point
    assert float(elbo.mean()) < float(untrained.mean()) - 0.3  # the test exercises a trained model


def _configs(steps=20, checkpoint_every=5):
    src = DataSource("moons")
    mc = NTMConfig(data=src.spec(n_stats=2000), trajectory=TrajectoryConfig(T=4, shift=-1.0),
                     transporter=TransporterConfig(blocks=2, layers=1, width=16, heads=2),
                     predictor=PredictorConfig(layers=1, width=16, heads=2))
    tc = TrainConfig(steps=steps, batch_size=32, warmup=3, checkpoint_every=checkpoint_every, log_every=5)
    return src, mc, tc


def _weights(run_dir, which="train"):
    ck = io_mod.resolve(run_dir)
    return load_file(str(ck / f"{which}.safetensors"))


class Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    src, mc, tc = _configs(checkpoint_every=10)
    train(mc, tc, src, tmp_path / "straight", progress=False, device="cpu")

    def crash(step, x):
        if step == 17:
            raise Interrupt()  # like a kill: the work after the step-10 checkpoint is lost
        return x

    with pytest.raises(Interrupt):
        train(mc, tc, src, tmp_path / "resumed", progress=False, device="cpu", batch_hook=crash)
    assert io_mod.resolve(tmp_path / "resumed").name == "step-00000010"
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 16, "lo')  # a record cut short by the kill
    summary = train(None, None, src, tmp_path / "resumed", resume=True, progress=False, device="cpu")
    assert summary["steps"] == 20 and summary["steps_this_run"] == 10
    # the log reads like the uninterrupted run's: step 15, logged before the kill, is not there twice
    logs = [[json.loads(line)["step"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("straight", "resumed")]
    assert logs[0] == logs[1] == [5, 10, 15, 20]
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea, eb = _weights(tmp_path / "straight", "model"), _weights(tmp_path / "resumed", "model")
    for k in ea:
        assert torch.equal(ea[k], eb[k]), k


def test_resume_refuses_a_different_step_budget(tmp_path):
    src, mc, tc = _configs(steps=10)
    train(mc, tc, src, tmp_path / "r", progress=False, device="cpu")
    with pytest.raises(ConfigError):
        train(None, TrainConfig(steps=50), src, tmp_path / "r", resume=True, progress=False, device="cpu")


def test_non_finite_batch_is_skipped_and_counted(tmp_path):
    src, mc, tc = _configs(steps=12)

    def poison(step, x):
        if step in (4, 7):
            x = x.clone()
            x[0, 0] = float("nan")
        return x

    summary = train(mc, tc, src, tmp_path / "r", progress=False, device="cpu", batch_hook=poison)
    assert summary["skipped"] == 2 and summary["steps"] == 12
    for v in _weights(tmp_path / "r").values():
        assert torch.isfinite(v).all()
    model = NTM.from_pretrained(tmp_path / "r")
    assert torch.isfinite(model.sample(8)).all()


def test_failed_checkpoint_write_leaves_previous_loadable(tmp_path, monkeypatch):
    src, mc, tc = _configs(steps=10)
    train(mc, tc, src, tmp_path / "r", progress=False, device="cpu")
    real = io_mod.save_file
    calls = {"n": 0}

    def dying_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(filename, "wb") as fh:
                fh.write(b"\x00" * 10)  # half-written file, then the process "dies"
            raise KeyboardInterrupt
        return real(tensors, filename, metadata=metadata)

    model = NTM.from_pretrained(tmp_path / "r")
    monkeypatch.setattr(io_mod, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt_mod.save_checkpoint(tmp_path / "r", 99, "ntm", {}, tc, model.state_dict(), model.state_dict())
    monkeypatch.setattr(io_mod, "save_file", real)
    assert io_mod.resolve(tmp_path / "r").name == "step-00000010"
    again = NTM.from_pretrained(tmp_path / "r")
    x = torch.randn(4, 2)
    assert torch.equal(model.nll_bound(x, generator=torch.Generator().manual_seed(0)),
                       again.nll_bound(x, generator=torch.Generator().manual_seed(0)))


def test_from_pretrained_round_trip_and_errors(tmp_path):
    src, mc, tc = _configs(steps=6)
    train(mc, tc, src, tmp_path / "r", progress=False, device="cpu")
    m1 = NTM.from_pretrained(tmp_path / "r")
    m2 = NTM.from_pretrained(io_mod.resolve(tmp_path / "r"))
    assert m1.config == mc
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError):
        NTM.from_pretrained(tmp_path / "missing")


def test_lr_schedule_warmup_then_cosine():
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-5)
    opt, sched = make_optimizer(model, cfg)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < 1e-5 and lrs[10] == pytest.approx(1e-3, rel=1e-6)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    mid = 10 + 45
    expected = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * 45 / 90)) / 2
    assert lrs[mid] == pytest.approx(expected, rel=1e-6)
    assert lrs[-1] >= 1e-5
    opt, sched = make_optimizer(model, replace(cfg, warmup_start_factor=0.5))
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4, rel=1e-6)  # the warmup's first step
    for bad, says in (({"warmup_start_factor": 0.0}, "start factor must be in"),
                      ({"warmup_start_factor": 1.5}, "start factor must be in"), ({"ema_warmup": 0}, "EMA warmup"),
                      ({"lr": 0.0}, "learning rate"), ({"lr": float("nan")}, "learning rate"),
                      ({"lr": float("inf")}, "learning rate"), ({"lr": 1e-6}, "learning rate")):  # below min_lr 1e-5
        with pytest.raises(ConfigError, match=says):
            validate_train_config(replace(cfg, **bad))


def test_loss_decreases_on_a_short_run(tmp_path):
    src, mc, tc = _configs(steps=60, checkpoint_every=100)
    train(mc, TrainConfig(steps=60, batch_size=128, warmup=5, lr=3e-3, log_every=5), src, tmp_path / "r",
          progress=False, device="cpu")
    import json
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] < recs[0]["loss"]


@pytest.mark.parametrize("warmup", [10, 3])
def test_ema_follows_the_closed_form_recursion(warmup):
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9, warmup=warmup)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, -1.0, 4.0, 3.0, 0.5] * 15):
        with torch.no_grad():
            model.weight.fill_(value)
        d = min(0.9, (1 + n) / (warmup + n))
        expected = d * expected + (1 - d) * value
        ema.update(model)
        assert float(ema.shadow[0]) == pytest.approx(expected, rel=1e-6)
    assert ema.current_decay() == 0.9


def test_a_run_killed_before_its_first_step_can_be_resumed(tmp_path):
    src, mc, tc = _configs(steps=6)

    def crash(step, x):
        raise Interrupt()

    with pytest.raises(Interrupt):
        train(mc, tc, src, tmp_path / "r", progress=False, device="cpu", batch_hook=crash)
    assert io_mod.resolve(tmp_path / "r").name == "step-00000000"
    assert train(None, None, src, tmp_path / "r", resume=True, progress=False, device="cpu")["steps"] == 6


def test_resume_refuses_other_data(tmp_path):
    src, mc, tc = _configs(steps=4)
    train(mc, tc, src, tmp_path / "r", progress=False, device="cpu")
    with pytest.raises(ConfigError, match="trained on 'moons'"):
        train(None, None, DataSource("checkerboard"), tmp_path / "r", resume=True, progress=False, device="cpu")

