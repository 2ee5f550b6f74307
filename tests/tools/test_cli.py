"""The CLI end to end on a tiny budget, and every bad input ending in one error line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ntm.cli import main
from ntm.hub import load_model
from ntm.nn import sincos_positions


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, err, fragment):
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ntm: error:") and fragment in lines[0], err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "cb"
    assert main(["train", "--data", "checkerboard", "--preset", "tiny", "--out", str(run_dir), "--no-progress"]) == 0
    return run_dir


def test_train_sample_eval_end_to_end(tiny_run, tmp_path, capsys):
    code, out, _ = run(capsys, "sample", str(tiny_run), "--n", "300", "--out", str(tmp_path / "s.npy"),
                       "--png", str(tmp_path / "s.png"), "--seed", "3")
    assert code == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (300, 2) and np.isfinite(x).all()
    assert (tmp_path / "s.png").stat().st_size > 1000
    code, out, _ = run(capsys, "eval", str(tiny_run), "--data", "checkerboard", "--n", "200", "--trajectories", "2", "--json")
    assert code == 0
    res = json.loads(out)
    for key in ("nll_bound_nats", "nll_bound_se", "trajectory_nll_nats", "iw_bound_nats"):
        assert np.isfinite(res[key])
    assert res["nll_bound_nats"] > res["entropy_floor_nats"]
    code, out, _ = run(capsys, "eval", str(tiny_run), "--data", "checkerboard", "--n", "200", "--trajectories", "2")
    assert code == 0 and "NLL bound" in out
    code, out, _ = run(capsys, "eval", str(tiny_run), "--data", "checkerboard", "--n", "200", "--trajectories", "2",
                       "--by-step", "--json")
    by = json.loads(out)["by_step"]
    assert code == 0 and len(by["neg_log_p"]) == 4 and by["times"][0] == 0.0
    code, out, _ = run(capsys, "eval", str(tiny_run), "--data", "checkerboard", "--n", "200", "--by-step")
    assert code == 0 and "step 4 (t=1.000" in out and "prior" in out
    code, out, err = run(capsys, "eval", str(tiny_run), "--data", "checkerboard", "--n", "1", "--trajectories", "2")
    assert code == 0 and "NLL bound" in out and "±" not in out, err  # one point: no standard error to print


def test_sample_at_other_step_counts(tiny_run, tmp_path, capsys):
    code, _, _ = run(capsys, "sample", str(tiny_run), "--n", "50", "--steps", "8", "--out", str(tmp_path / "s8.npy"))
    assert code == 0 and np.load(tmp_path / "s8.npy").shape == (50, 2)
    code, _, err = run(capsys, "sample", str(tiny_run), "--n", "5", "--solver", "heun", "--out", str(tmp_path / "h.npy"))
    assert_one_error_line(code, err, "--solver: a flow-matching option")


def test_user_files_npy_and_csv(tmp_path, capsys):
    pts = np.random.default_rng(0).normal(size=(500, 2)).astype(np.float32)
    np.save(tmp_path / "pts.npy", pts)
    np.savetxt(tmp_path / "pts.csv", pts, delimiter=",", header="x,y", comments="")
    for f in ("pts.npy", "pts.csv"):
        out = tmp_path / f"run-{f}"
        code, _, err = run(capsys, "train", "--data", str(tmp_path / f), "--preset", "tiny", "--steps", "5",
                           "--out", str(out), "--no-progress")
        assert code == 0, err
        code, o, _ = run(capsys, "eval", str(out), "--data", str(tmp_path / f), "--trajectories", "2", "--json")
        assert code == 0 and json.loads(o)["n"] == 500
        code, o, _ = run(capsys, "eval", str(out), "--data", str(tmp_path / f), "--n", "120", "--trajectories", "2",
                         "--json")
        assert code == 0 and json.loads(o)["n"] == 120  # the file's first 120 points


@pytest.mark.slow
def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ntm", "presets"], capture_output=True, text=True)
    assert proc.returncode == 0 and "toy" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "ntm", "train", "--data", "nope", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert_one_error_line(proc.returncode, proc.stderr, "unknown data set")


def test_bad_inputs_give_one_error_line(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "r")
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "missing.npy"), "--out", out)
    assert_one_error_line(code, err, "not found")
    np.save(tmp_path / "wide.npy", np.zeros((10, 3)))
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "wide.npy"), "--out", out)
    assert_one_error_line(code, err, "shape (n, 2)")
    bad = np.zeros((10, 2))
    bad[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "nan.npy"), "--out", out)
    assert_one_error_line(code, err, "NaN")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "junk.npy"), "--out", out)
    assert_one_error_line(code, err, "could not read")
    code, _, err = run(capsys, "train", "--data", "checkerboard", "--preset", "huge", "--out", out)
    assert_one_error_line(code, err, "unknown preset")
    code, _, err = run(capsys, "train", "--data", "spirals3", "--out", out)
    assert_one_error_line(code, err, "unknown data set")
    code, _, err = run(capsys, "train", "--data", "checkerboard", "--out", out, "--steps", "0")
    assert_one_error_line(code, err, "steps")
    code, _, err = run(capsys, "train", "--data", "checkerboard", "--out", str(tiny_run))
    assert_one_error_line(code, err, "not empty")
    code, _, err = run(capsys, "sample", str(tmp_path / "nowhere"), "--n", "5", "--out", str(tmp_path / "a.npy"))
    assert_one_error_line(code, err, "no such run")
    code, _, err = run(capsys, "eval", str(tiny_run), "--data", str(tmp_path / "wide.npy"))
    assert_one_error_line(code, err, "shape")
    code, _, err = run(capsys, "sample", str(tiny_run), "--n", "5", "--out", str(tmp_path / "a.npy"), "--class", "1")
    assert_one_error_line(code, err, "unconditional")


def test_outputs_are_never_overwritten(tiny_run, tmp_path, capsys):
    target = tmp_path / "mine.npy"
    target.write_bytes(b"precious")
    code, _, err = run(capsys, "sample", str(tiny_run), "--n", "5", "--out", str(target))
    assert_one_error_line(code, err, "exists")
    assert target.read_bytes() == b"precious"
    code, _, _ = run(capsys, "sample", str(tiny_run), "--n", "5", "--out", str(target), "--overwrite")
    assert code == 0 and np.load(target).shape == (5, 2)


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    ckpt = dst / "checkpoints" / (dst / "checkpoints" / "latest").read_text().strip()
    return ckpt


def test_corrupt_and_foreign_checkpoints(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "s.npy")
    ckpt = _copy_run(tiny_run, tmp_path / "trunc")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "sample", str(tmp_path / "trunc"), "--n", "5", "--out", out)
    assert_one_error_line(code, err, "corrupt")

    ckpt = _copy_run(tiny_run, tmp_path / "foreign")
    (ckpt / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, _, err = run(capsys, "sample", str(tmp_path / "foreign"), "--n", "5", "--out", out)
    assert_one_error_line(code, err, "not an ntm artifact")

    ckpt = _copy_run(tiny_run, tmp_path / "garbled")
    (ckpt / "config.json").write_text("{ not json")
    code, _, err = run(capsys, "eval", str(tmp_path / "garbled"), "--data", "checkerboard")
    assert_one_error_line(code, err, "unreadable")

    ckpt = _copy_run(tiny_run, tmp_path / "mismatch")
    meta = json.loads((ckpt / "config.json").read_text())
    meta["config"]["predictor"]["width"] = 64
    (ckpt / "config.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, "sample", str(tmp_path / "mismatch"), "--n", "5", "--out", out)
    assert_one_error_line(code, err, "do not match")

    plain = tmp_path / "plain"
    plain.mkdir()
    code, _, err = run(capsys, "sample", str(plain), "--n", "5", "--out", out)
    assert_one_error_line(code, err, "not an ntm run")


def test_conditional_toy_with_guidance(tmp_path, capsys):
    run_dir = tmp_path / "cond"
    code, _, err = run(capsys, "train", "--data", "8gaussians", "--conditional", "--preset", "tiny", "--out",
                       str(run_dir), "--no-progress")
    assert code == 0, err
    code, _, err = run(capsys, "sample", str(run_dir), "--n", "40", "--class", "3", "--guidance", "2.0",
                       "--out", str(tmp_path / "c.npy"))
    assert code == 0, err
    assert np.load(tmp_path / "c.npy").shape == (40, 2)
    code, _, err = run(capsys, "sample", str(run_dir), "--n", "30", "--each-class", "--guidance", "2.0",
                       "--out", str(tmp_path / "e.npy"), "--seed", "1")
    each = np.load(tmp_path / "e.npy")
    assert code == 0 and each.shape == (8 * 30, 2), err
    # block k holds class k: the same draw as the API's with labels 0, ..., 0, 1, ..., 7
    labels = torch.arange(8).repeat_interleave(30)
    api = load_model(run_dir).sample(240, y=labels, guidance=2.0, generator=torch.Generator().manual_seed(1))
    assert np.allclose(each, api.numpy(), atol=1e-6)
    for bad, says in ((("--class", "2"), "--each-class draws every class"), (("--prompt", "a 3"), "--each-class")):
        code, _, err = run(capsys, "sample", str(run_dir), "--n", "2", "--each-class", *bad,
                           "--out", str(tmp_path / "f.npy"))
        assert_one_error_line(code, err, says)
    code, _, err = run(capsys, "sample", str(tmp_path / "cond"), "--n", "2", "--guidance", "1", "--out",
                       str(tmp_path / "g.npy"))
    assert_one_error_line(code, err, "--guidance needs --class, --each-class or a prompt")
    code, out, _ = run(capsys, "eval", str(run_dir), "--data", "8gaussians", "--n", "100", "--trajectories", "2", "--json")
    assert code == 0 and json.loads(out)["conditional"] is True
    code, _, err = run(capsys, "sample", str(run_dir), "--n", "4", "--class", "8", "--out", str(tmp_path / "d.npy"))
    assert_one_error_line(code, err, "class labels")
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "c.npy"), "--conditional", "--out", str(tmp_path / "u"))
    assert_one_error_line(code, err, "conditional")


@pytest.mark.parametrize("lr, code_wanted, says", [("nan", 2, "--lr"), ("1e-7", 1, "learning rate must be")])
def test_a_bad_learning_rate_is_one_error_and_writes_nothing(tmp_path, capsys, lr, code_wanted, says):
    code, _, err = run(capsys, "train", "--data", "moons", "--preset", "tiny", "--lr", lr, "--out", str(tmp_path / "r"),
                       "--no-progress")
    assert code == code_wanted
    assert_one_error_line(code, err, says)
    assert not (tmp_path / "r").exists()


def test_bad_sampling_times_and_guidance(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "s.npy")
    code, _, err = run(capsys, "sample", str(tiny_run), "--n", "2", "--each-class", "--out", out)
    assert_one_error_line(code, err, "needs a class-conditional model")
    for t_min, fragment in (("1.0", "t_min"), ("0.5", "t_min"), ("-0.5", "t_min")):
        code, _, err = run(capsys, "sample", str(tiny_run), "--n", "5", "--t-min", t_min, "--out", out)
        assert_one_error_line(code, err, fragment)
    code, _, err = run(capsys, "sample", str(tiny_run), "--n", "5", "--guidance", "-1", "--out", out)
    assert_one_error_line(code, err, "guidance")
    assert not (tmp_path / "s.npy").exists()


def test_corrupt_resume_state_and_bad_config_values(tiny_run, tmp_path, capsys):
    args = ("--data", "checkerboard", "--preset", "tiny", "--no-progress", "--resume")
    ckpt = _copy_run(tiny_run, tmp_path / "trunc")
    data = (ckpt / "train.safetensors").read_bytes()
    (ckpt / "train.safetensors").write_bytes(data[: len(data) // 3])
    code, _, err = run(capsys, "train", "--out", str(tmp_path / "trunc"), *args)
    assert_one_error_line(code, err, "cannot resume")
    ckpt = _copy_run(tiny_run, tmp_path / "state")
    torch.save({"something": "else"}, ckpt / "state.pt")
    code, _, err = run(capsys, "train", "--out", str(tmp_path / "state"), *args)
    assert_one_error_line(code, err, "cannot resume")
    for field, value, message in (("width", "16", "invalid value '16'"), ("heads", 0, "invalid predictor size"),
                                  ("layers", -1, "invalid predictor size")):
        ckpt = _copy_run(tiny_run, tmp_path / f"cfg-{field}")
        meta = json.loads((ckpt / "config.json").read_text())
        meta["config"]["predictor"][field] = value
        (ckpt / "config.json").write_text(json.dumps(meta))
        code, _, err = run(capsys, "sample", str(tmp_path / f"cfg-{field}"), "--n", "3", "--out", str(tmp_path / "x.npy"))
        assert_one_error_line(code, err, message)
    ckpt = _copy_run(tiny_run, tmp_path / "shape")
    meta = json.loads((ckpt / "config.json").read_text())
    meta["config"]["data"]["shape"] = []
    (ckpt / "config.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, "eval", str(tmp_path / "shape"), "--data", "checkerboard")
    assert_one_error_line(code, err, "invalid data layout")


def test_bench_refuses_files_and_foreign_outputs(tmp_path, capsys):
    np.save(tmp_path / "pts.npy", np.random.default_rng(0).normal(size=(50, 2)))
    code, _, err = run(capsys, "bench", "toy", "--data", str(tmp_path / "pts.npy"), "--out", str(tmp_path / "b.json"))
    assert_one_error_line(code, err, "unknown toy")
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "notes"}')
    code, _, err = run(capsys, "bench", "toy", "--preset", "tiny", "--out", str(mine))
    assert_one_error_line(code, err, "not a previous bench result")
    assert mine.read_text() == '{"my": "notes"}'
    code, _, err = run(capsys, "bench", "toy", "--preset", "tiny", "--out", str(tmp_path / "b.txt"))
    assert_one_error_line(code, err, ".json")


def test_constant_column_is_rejected(tmp_path, capsys):
    pts = np.random.default_rng(0).normal(size=(50, 2))
    pts[:, 1] = 3.0
    np.save(tmp_path / "flat.npy", pts)
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "flat.npy"), "--out", str(tmp_path / "r"))
    assert_one_error_line(code, err, "constant")


def test_stopping_a_bench_stops_it_and_a_rerun_resumes(tmp_path, capsys, monkeypatch):
    import ntm.bench.common as bench
    real_train = bench.train
    calls = []

    def stopping_train(*args, **kwargs):
        summary = real_train(*args, **kwargs)
        calls.append(kwargs.get("resume", False))
        if len(calls) == 1:
            summary = {**summary, "stopped": True}  # as if Ctrl-C arrived during the first training
        return summary

    monkeypatch.setattr(bench, "train", stopping_train)
    argv = ["bench", "toy", "--preset", "tiny", "--steps", "4", "--data", "moons", "--models", "ntm",
            "--out", str(tmp_path / "b.json"), "--n-eval", "50", "--n-samples", "50", "--seeds", "1", "--no-progress"]
    code, _, err = run(capsys, *argv)
    assert_one_error_line(code, err, "run the same command again")
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert calls == [False, True]  # the second run resumed (here: reused) the checkpointed training
    assert json.loads((tmp_path / "b.json").read_text())["rows"][0]["model"] == "ntm"



def test_train_with_adaln_conditioning_stores_it_and_refuses_it_on_resume(tmp_path, capsys):
    for kind in ("ntm", "fm"):
        out = tmp_path / kind
        code, _, err = run(capsys, "train", "--data", "checkerboard", "--conditional", "--preset", "tiny", "--model", kind,
                           "--steps", "4", "--conditioning", "adaln", "--out", str(out), "--no-progress")
        assert code == 0, err
        model = load_model(out)
        net = model.predictor if kind == "ntm" else model.velocity
        cfg = model.config.predictor if kind == "ntm" else model.config.velocity
        assert cfg.conditioning == "adaln" and net.adaln
        code, _, err = run(capsys, "train", "--data", "checkerboard", "--conditional", "--out", str(out), "--resume",
                           "--conditioning", "add")
        assert_one_error_line(code, err, "not what the run was started with")
    code, _, err = run(capsys, "train", "--data", "checkerboard", "--out", str(tmp_path / "x"), "--conditioning", "film")
    assert code != 0 and "film" in err and not (tmp_path / "x").exists()


def test_train_with_sincos_positions_stores_them_and_refuses_them_on_resume(tmp_path, capsys):
    for kind in ("ntm", "fm"):
        out = tmp_path / kind
        code, _, err = run(capsys, "train", "--data", "checkerboard", "--preset", "tiny", "--model", kind,
                           "--steps", "4", "--position", "sincos", "--out", str(out), "--no-progress")
        assert code == 0, err
        model = load_model(out)
        net = model.predictor if kind == "ntm" else model.velocity
        cfg = model.config.predictor if kind == "ntm" else model.config.velocity
        assert cfg.position == "sincos"
        assert torch.equal(net.pos, sincos_positions((1, 2), cfg.width))  # fixed: training left it alone
        code, _, err = run(capsys, "train", "--data", "checkerboard", "--out", str(out), "--resume",
                           "--position", "learned")
        assert_one_error_line(code, err, "not what the run was started with")
    code, _, err = run(capsys, "train", "--data", "checkerboard", "--out", str(tmp_path / "x"), "--position", "rope")
    assert code != 0 and "rope" in err and not (tmp_path / "x").exists()


def test_resume_takes_the_first_commands_options_and_refuses_other_values(tmp_path, capsys):
    out = tmp_path / "r"
    first = ("train", "--data", "moons", "--preset", "tiny", "--seed", "3", "--mode", "pairwise", "--batch-size", "32",
             "--lr", "2e-3", "--checkpoint-every", "5", "--hybrid-weight", "0.5", "--out", str(out), "--no-progress")
    code, _, err = run(capsys, *first, "--steps", "10")
    assert code == 0, err
    # the same command with --resume is accepted (the run is finished: nothing more to do)
    code, out_text, err = run(capsys, *first, "--steps", "10", "--resume")
    assert code == 0 and "10 steps" in out_text, err
    log = (out / "metrics.jsonl").read_text()
    saved = sorted((out / "checkpoints").glob("step-*/config.json"))[-1]
    assert json.loads(saved.read_text())["train"]["lr"] == 2e-3
    for bad, name in ((("--seed", "4"), "--seed"), (("--batch-size", "64"), "--batch-size"), (("--lr", "1e-3"), "--lr"),
                      (("--mode", "e2e"), "--mode"), (("--checkpoint-every", "2"), "--checkpoint-every"),
                      (("--hybrid-weight", "1"), "--hybrid-weight"),
                      (("--model", "fm"), "--model"), (("--transform", "spline"), "--transform"),
                      (("--preset", "toy"), "--preset"), (("--conditional",), "--conditional"),
                      (("--preset", "tiny"), "--preset")):  # the run's lr 2e-3 is not the preset's
        code, _, err = run(capsys, "train", "--data", "moons", "--out", str(out), "--resume", *bad,
                           "--no-progress")
        assert_one_error_line(code, err, f"not what the run was started with: {name} (the run has")
    assert (out / "metrics.jsonl").read_text() == log  # nothing written
    # options the run's kind ignores are not compared: --patch on 2-D data, NTM options on an FM run
    code, _, err = run(capsys, *first, "--steps", "10", "--resume", "--patch", "2")
    assert code == 0, err
    fm = tmp_path / "fm"
    code, _, err = run(capsys, "train", "--data", "moons", "--preset", "tiny", "--model", "fm", "--steps", "3",
                       "--transform", "spline", "--out", str(fm), "--no-progress")
    assert code == 0, err
    code, _, err = run(capsys, "train", "--data", "moons", "--preset", "tiny", "--model", "fm", "--steps", "3",
                       "--transform", "spline", "--out", str(fm), "--no-progress", "--resume")
    assert code == 0, err
