"""Finetuning from the command line: with and without the alignment loss, a frozen backbone, errors."""
import json

import torch

from ntm import NTM, FlowMatching
from ntm.cli import main


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
    # --resume takes the first command again; a differing option is refused by name (the run is finished,
    # so an accepted command has nothing left to train)
    first = ["finetune", "--from", str(fm_run), "--out", str(frozen), "--data", "moons", "--resume"]
    assert main([*first, "--preset", "tiny", "--steps", "6", "--freeze-backbone", "--no-progress"]) == 0
    for extra, name in ((["--steps", "9"], "--steps (the run has 6)"), (["--aux-weight", "1"], "--aux-weight"),
                        (["--fresh-lr-factor", "2"], "--fresh-lr-factor (the run has frozen backbone)"),
                        (["--velocity-scale", "floor"], "--velocity-scale"), (["--preset", "toy"], "--preset")):
        capsys.readouterr()
        assert main([*first, *extra]) == 2
        assert name in capsys.readouterr().err
    assert main(["finetune", "--from", str(fm_run), "--out", str(tmp_path / "ft-0"), "--data", "moons", "--resume",
                 "--freeze-backbone"]) == 2  # that run trained its backbone
    assert main(["finetune", "--from", str(tmp_path / "ft-0"), "--out", str(tmp_path / "x"), "--data", "moons"]) == 1
    assert main(["finetune", "--from", str(fm_run), "--out", str(tmp_path / "y"), "--data", "8gaussians"]) == 1
    assert main(["finetune", "--from", str(fm_run), "--out", str(tmp_path / "z"), "--data", "moons",
                 "--velocity-scale", "wide"]) == 2
    assert not (tmp_path / "z").exists() or not any((tmp_path / "z").iterdir())

