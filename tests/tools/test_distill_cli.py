"""The distilled denoiser from the command line: distil, then every decoder."""
import json

import numpy as np
import pytest
import torch

from ntm import NTM
from ntm.cli import main
from ntm.config import DenoiserConfig
from ntm.data import open_source, to_tokens
from ntm.denoising import Denoiser
from ntm.io import latest_checkpoint
from ntm.train.objectives import DistillObjective


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("den") / "run"
    assert main(["train", "--data", "moons", "--preset", "tiny", "--steps", "30", "--out", str(run), "--no-progress"]) == 0
    return run


def test_distil_lowers_the_loss_and_every_decoder_runs(tiny_run, tmp_path, capsys):
    assert main(["sample", str(tiny_run), "--n", "5", "--decode", "denoiser", "--out", str(tmp_path / "no.npy")]) == 1
    assert "ntm distill" in capsys.readouterr().err
    # a checkpoint folder is refused (its denoiser would land where no load looks), and nothing is written
    ckpt = latest_checkpoint(tiny_run)
    assert main(["distill", str(ckpt), "--data", "moons", "--steps", "5", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "is a checkpoint folder; distil from its run" in err and len(err.strip().splitlines()) == 1
    assert not (ckpt / "denoiser").exists()
    assert main(["distill", str(tmp_path / "nothing"), "--data", "moons", "--no-progress"]) == 1
    assert "no such run" in capsys.readouterr().err and not (tmp_path / "nothing").exists()
    assert main(["distill", str(tiny_run), "--data", "moons", "--steps", "60", "--no-progress"]) == 0
    log = [json.loads(line) for line in (tiny_run / "denoiser" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 60
    model = NTM.from_pretrained(tiny_run)
    assert model.denoiser is not None
    # the denoiser was distilled from the averaged weights: the raw training weights come without it
    assert NTM.from_pretrained(tiny_run, weights="train").denoiser is None
    # on one fixed large batch, the distilled denoiser is closer to its targets than the untrained one
    x0 = to_tokens(open_source("moons").held_out(1024, seed=3)[0], model.spec)
    losses = []
    for den in (Denoiser(DenoiserConfig(), model.spec), model.denoiser):
        objective = DistillObjective(model, den)
        losses.append(float(objective(x0, None, objective.draw_noise(1024, torch.Generator().manual_seed(4)))[0].detach()))
    assert losses[1] < losses[0]
    outs = {}
    for decode in ("inverse", "inverse+score", "denoiser"):
        for inverse in ("sequential", "jacobi"):
            f = tmp_path / f"{decode}-{inverse}.npy"
            assert main(["sample", str(tiny_run), "--n", "40", "--decode", decode, "--inverse", inverse,
                         "--seed", "1", "--out", str(f)]) == 0
            outs[decode, inverse] = np.load(f)
            assert outs[decode, inverse].shape == (40, 2) and np.isfinite(outs[decode, inverse]).all()
    assert np.allclose(outs["inverse", "sequential"], outs["inverse", "jacobi"], atol=1e-4)
    assert not np.allclose(outs["inverse", "sequential"], outs["inverse+score", "sequential"])
    # a finished denoiser is never silently replaced
    capsys.readouterr()
    assert main(["distill", str(tiny_run), "--data", "moons", "--steps", "60", "--no-progress"]) == 1
    assert "already holds" in capsys.readouterr().err
    assert main(["distill", str(tiny_run), "--data", "8gaussians", "--no-progress"]) == 1

