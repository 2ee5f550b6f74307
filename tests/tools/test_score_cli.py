"""`ntm score` end to end: what it writes equals the library's bounds, and its errors."""

import numpy as np
import pytest
import torch

from ntm.cli import main
from ntm.hub import load_model
from ntm.likelihood import bits_per_dim, nll_bounds
from ntm.scoring import bayes_posterior, ntm_class_log_likelihoods
from ntm.data import sample_toy, sample_toy_labeled

from conftest import one_error_line, run_cli

run = run_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    out = {"plain": root / "plain", "cond": root / "cond", "fm": root / "fm", "fm-cond": root / "fm-cond"}
    assert main(["train", "--data", "checkerboard", "--preset", "tiny", "--out", str(out["plain"]), "--no-progress"]) == 0
    assert main(["train", "--data", "8gaussians", "--conditional", "--preset", "tiny", "--out", str(out["cond"]),
                 "--no-progress"]) == 0
    assert main(["train", "--data", "checkerboard", "--model", "fm", "--preset", "tiny", "--steps", "10",
                 "--out", str(out["fm"]), "--no-progress"]) == 0
    assert main(["train", "--data", "8gaussians", "--conditional", "--model", "fm", "--preset", "tiny", "--steps", "10",
                 "--out", str(out["fm-cond"]), "--no-progress"]) == 0
    return out


def test_scores_file_equals_the_bound_on_the_same_seed(runs, tmp_path, capsys):
    pts = sample_toy("checkerboard", 50, torch.Generator().manual_seed(1)).numpy()
    np.save(tmp_path / "pts.npy", pts)
    code, out, err = run(capsys, "score", str(runs["plain"]), "--data", str(tmp_path / "pts.npy"), "--out",
                         str(tmp_path / "s.npy"), "--trajectories", "3", "--seed", "5", "--batch-size", "20")
    assert code == 0, err
    table = np.load(tmp_path / "s.npy")
    assert table.shape == (50,) and {"elbo_nats", "iw_nats", "step_1_nats", "step_4_nats", "prior_nats"} <= set(table.dtype.names)
    model = load_model(runs["plain"])
    elbo, iw = nll_bounds(model, torch.from_numpy(pts), num_trajectories=3, generator=torch.Generator().manual_seed(5),
                          batch_size=20)
    assert np.allclose(table["elbo_nats"], elbo.numpy(), atol=1e-4) and np.allclose(table["iw_nats"], iw.numpy(), atol=1e-4)
    # the step and prior terms add up to the ELBO bound in raw units
    terms = sum(table[f"step_{k}_nats"] for k in range(1, 5)) + table["prior_nats"]
    assert np.allclose(terms + float(np.log(model.spec.std).sum()), table["elbo_nats"], atol=1e-3)
    code, _, err = run(capsys, "score", str(runs["plain"]), "--data", str(tmp_path / "pts.npy"), "--out",
                       str(tmp_path / "s.npy"))
    assert one_error_line(code, err, "exists")
    code, _, err = run(capsys, "score", str(runs["plain"]), "--data", "checkerboard", "--out", str(tmp_path / "s.txt"))
    assert one_error_line(code, err, ".npy or .csv")


def test_bayes_scores_as_csv_and_the_error_without_labels(runs, tmp_path, capsys):
    code, out, err = run(capsys, "score", str(runs["cond"]), "--data", "8gaussians", "--n", "64", "--labels", "--bayes",
                         "--trajectories", "2", "--out", str(tmp_path / "b.csv"))
    assert code == 0, err
    assert "Bayes accuracy" in out
    lines = (tmp_path / "b.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 65 and "label" in header and "bayes_class" in header and "log_post_7" in header
    rows = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    post = rows[:, header.index("log_post_0"):header.index("log_post_7") + 1]
    assert np.allclose(np.exp(post).sum(1), 1.0, atol=1e-4)
    assert (rows[:, header.index("bayes_class")] == post.argmax(1)).all()
    code, _, err = run(capsys, "score", str(runs["plain"]), "--data", "checkerboard", "--n", "8", "--bayes",
                       "--out", str(tmp_path / "x.npy"))
    assert one_error_line(code, err, "class-conditional")
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("level", ["1", "all"])
def test_bayes_at_noisy_levels_equals_the_library_rule(runs, tmp_path, capsys, level):
    """`--bayes-level j` / `all`: the posterior of log p(x_{t_j} | y) / of its mean over the noisy levels,
    as computed from `ntm_class_log_likelihoods` on the same seed and trajectories."""
    out = tmp_path / f"b{level}.npy"
    code, text, err = run(capsys, "score", str(runs["cond"]), "--data", "8gaussians", "--n", "32", "--labels", "--bayes",
                          "--bayes-level", level, "--trajectories", "2", "--out", str(out))
    assert code == 0, err
    assert f"Bayes accuracy (level {level})" in text
    table = np.load(out)
    model = load_model(runs["cond"])
    x, _ = sample_toy_labeled("8gaussians", 32, torch.Generator().manual_seed(12345))
    T = model.config.trajectory.T
    noisy = (1,) if level == "1" else tuple(range(1, T))
    ll = ntm_class_log_likelihoods(model, x, noisy, seed=0, num_trajectories=2)
    post = bayes_posterior(sum(ll[j] for j in noisy) / len(noisy)).numpy()
    logged = np.stack([table[f"log_post_{c}"] for c in range(post.shape[1])], 1)
    assert np.allclose(logged, post, atol=1e-4)
    assert (table["bayes_class"] == post.argmax(1)).all()


@pytest.mark.parametrize("model, level, says", [("cond", "half", "level number or 'all'"),
                                                ("cond", "4", "noisy levels 1..3"),
                                                ("fm-cond", "1", "no trajectory levels")])
def test_a_bad_bayes_level_is_one_error_and_writes_nothing(runs, tmp_path, capsys, model, level, says):
    out = tmp_path / "x.npy"
    code, _, err = run(capsys, "score", str(runs[model]), "--data", "8gaussians", "--n", "8", "--bayes",
                       "--bayes-level", level, "--out", str(out))
    assert one_error_line(code, err, says)
    assert not out.exists()


def test_flow_matching_scores_through_its_ode_estimate(runs, tmp_path, capsys):
    code, _, err = run(capsys, "score", str(runs["fm"]), "--data", "checkerboard", "--n", "16", "--ode-steps", "4",
                       "--out", str(tmp_path / "f.npy"))
    assert code == 0, err
    table = np.load(tmp_path / "f.npy")
    model = load_model(runs["fm"])
    x, _ = sample_toy_labeled("checkerboard", 16, torch.Generator().manual_seed(12345))  # the toy's held-out points
    assert table.dtype.names == ("ode_nll_nats",)
    assert np.allclose(table["ode_nll_nats"], model.nll(x, steps=4).numpy(), atol=1e-4)


def test_image_scores_carry_bits_per_dim(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "imgs.npy", rng.integers(0, 256, (12, 8, 8), dtype=np.uint8))
    run_dir = tmp_path / "img"
    assert main(["train", "--data", str(tmp_path / "imgs.npy"), "--preset", "tiny", "--patch", "2", "--steps", "4",
                 "--out", str(run_dir), "--no-progress"]) == 0
    capsys.readouterr()
    code, _, err = run(capsys, "score", str(run_dir), "--data", str(tmp_path / "imgs.npy"), "--trajectories", "2",
                       "--out", str(tmp_path / "s.npy"))
    assert code == 0, err
    t = np.load(tmp_path / "s.npy")
    assert np.allclose(t["elbo_bpd"], bits_per_dim(t["elbo_nats"], 64), atol=1e-4)
    assert (t["iw_bpd"] <= t["elbo_bpd"] + 1e-5).all()
