"""Multi-process training under torchrun, kills at any moment, and multi-T models."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ntm import io as io_mod
from ntm.config import NTMConfig, PredictorConfig, TrajectoryConfig, TransporterConfig
from ntm.model import NTM
from ntm.train.objectives import NTMObjective

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _weights(run_dir, which="train"):
    return load_file(str(io_mod.resolve(run_dir) / f"{which}.safetensors"))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _train_args(out, steps=6, extra=()):
    return ["train", "--data", "moons", "--preset", "tiny", "--steps", str(steps), "--batch-size", "64",
            "--out", str(out), "--no-progress", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--fsdp",)], ids=["ddp", "fsdp2"])
def test_two_processes_match_one_process_with_the_combined_batch(tmp_path, extra):
    assert TORCHRUN, "torchrun not found next to the interpreter"
    one = subprocess.run([sys.executable, "-m", "ntm", *_train_args(tmp_path / "one")], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "ntm",
                          *_train_args(tmp_path / "two", extra=extra)], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("done:") == 1  # only rank 0 reports
    assert _max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 1e-5
    assert _max_diff(_weights(tmp_path / "one", "model"), _weights(tmp_path / "two", "model")) < 1e-5


def _latest_step(run_dir: Path) -> int:
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    steps = 600
    args = ["train", "--data", "moons", "--preset", "tiny", "--steps", str(steps), "--batch-size", "16",
            "--checkpoint-every", "25", "--no-progress"]
    straight = subprocess.run([sys.executable, "-m", "ntm", *args, "--out", str(tmp_path / "a")], env=ENV,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    run_b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "ntm", *args, "--out", str(run_b)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _latest_step(run_b) < 50 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _latest_step(run_b)
    assert 50 <= killed_at < steps, f"the run was not killed mid-way (last checkpoint {killed_at})"
    resumed = subprocess.run([sys.executable, "-m", "ntm", *args, "--out", str(run_b), "--resume"], env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert _max_diff(_weights(tmp_path / "a"), _weights(run_b)) == 0.0
    assert _max_diff(_weights(tmp_path / "a", "model"), _weights(run_b, "model")) == 0.0


KILL_DURING_WRITE = r"""
import os, signal, sys
import ntm.io as io_mod
from ntm.cli import main
real, calls = io_mod.save_file, {"n": 0}
def dying(tensors, filename, metadata=None):
    calls["n"] += 1
    if calls["n"] == 5:  # first file of the third checkpoint (steps 0, 20, then 40)
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 64)
            fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, filename, metadata=metadata)
io_mod.save_file = dying
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_leaves_previous_checkpoint(tmp_path):
    run = tmp_path / "r"
    args = ["train", "--data", "moons", "--preset", "tiny", "--steps", "40", "--checkpoint-every", "20",
            "--out", str(run), "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, *args], env=ENV, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert _latest_step(run) == 20
    model = NTM.from_pretrained(run)
    assert torch.isfinite(model.sample(4)).all()
    resumed = subprocess.run([sys.executable, "-m", "ntm", *args, "--resume"], env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _latest_step(run) == 40


def test_multi_t_model_samples_and_scores_at_each_trained_length():
    torch.manual_seed(0)
    cfg = NTMConfig(trajectory=TrajectoryConfig(T=4, shift=-1.0, train_Ts=(4, 8, 16)),
                      transporter=TransporterConfig(blocks=2, layers=1, width=16, heads=2),
                      predictor=PredictorConfig(layers=1, width=16, heads=2))
    model = NTM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    objective = NTMObjective(model)
    noise = objective.draw_noise(300, torch.Generator().manual_seed(0))
    assert set(noise.T.tolist()) == {4, 8, 16}
    loss, _ = objective(torch.randn(300, 2, 1), None, noise)
    assert torch.isfinite(loss)
    x = torch.randn(8, 2)
    for T in (4, 8, 16):
        assert model.sample(8, steps=T, generator=torch.Generator().manual_seed(0)).shape == (8, 2)
        assert torch.isfinite(model.nll_bound(x, num_trajectories=2, steps=T)).all()
    with pytest.raises(ValueError, match="trained for T"):
        model.sample(8, steps=5)
    # the networks really see T: the same (u_t, t, s) gives different predictions for different T
    u, t, s = torch.randn(4, 2, 1), torch.full((4,), 0.5), torch.full((4,), 0.3)
    mu4, _ = model.predictor(u, t, s, None, torch.full((4,), 4.0))
    mu16, _ = model.predictor(u, t, s, None, torch.full((4,), 16.0))
    assert not torch.allclose(mu4, mu16)

