"""Distilling the denoiser through the fit loop: stop and resume, settings checks."""


import pytest

from ntm import NTM
from ntm.cli import main


def test_distil_resumes_after_a_stop(tmp_path, monkeypatch):
    from dataclasses import replace

    import ntm.train.loop as loop
    from ntm.config import DISTILL_TRAIN
    from ntm.data import open_source
    from ntm.train import distill

    run = tmp_path / "run"
    assert main(["train", "--data", "moons", "--preset", "tiny", "--steps", "10", "--out", str(run), "--no-progress"]) == 0
    src = open_source("moons")
    calls = {"n": 0}

    class StopAfterFive(loop.StopFlag):
        @property
        def requested(self):
            calls["n"] += 1
            return calls["n"] >= 5

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(loop, "StopFlag", StopAfterFive)
    cfg = replace(DISTILL_TRAIN, steps=20)
    first = distill(run, src, train_config=cfg, progress=False)
    assert first["stopped"] and first["steps"] == 5
    assert NTM.from_pretrained(run).denoiser is None  # an unfinished distillation is never used
    with pytest.raises(Exception, match="other settings"):
        distill(run, src, train_config=replace(cfg, batch_size=32), progress=False)
    monkeypatch.undo()
    second = distill(run, src, train_config=cfg, progress=False)
    assert not second["stopped"] and second["steps"] == 20 and second["steps_this_run"] == 15
    assert NTM.from_pretrained(run).denoiser is not None

