"""The flow-matching baseline from the command line: train, sample, eval, reload."""
import json
import math

import numpy as np
import pytest

from ntm import NTM, FlowMatching, load_model
from ntm.cli import main
from ntm.errors import CheckpointError


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
    # NTM-only options are refused by name on an FM run (they were ignored), and nothing is written
    for extra, name in ((["--decode", "inverse"], "--decode"), (["--noise-scale", "0.5"], "--noise-scale"),
                        (["--inverse", "jacobi"], "--inverse")):
        capsys.readouterr()
        assert main(["sample", str(run), "--n", "5", *extra, "--out", str(tmp_path / "x.npy")]) == 2
        assert f"{name}: NTM option; this is a flow-matching run" in capsys.readouterr().err
    # a --png that is not a .png fails before the samples are written
    assert main(["sample", str(run), "--n", "5", "--png", str(tmp_path / "g.txt"), "--out", str(tmp_path / "x.npy")]) == 2
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "g.txt").exists()

