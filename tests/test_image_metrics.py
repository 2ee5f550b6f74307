"""Image metrics (classifier features, FID/KID, precision/recall) and the image bench end to end."""
import json

import pytest
import torch

from ntm.cli import main
from ntm.images import open_image_source
from ntm.metrics import (ImageClassifier, classifier_accuracy, image_quality, knn_precision_recall,
                         load_or_train_classifier)


@pytest.fixture(scope="module")
def mnist():
    return open_image_source("mnist")


@pytest.fixture(scope="module")
def classifier(mnist, tmp_path_factory):
    clf, info = load_or_train_classifier(mnist, cache_dir=tmp_path_factory.mktemp("clf") / "mnist", steps=150)
    return clf, info


def test_classifier_learns_and_is_cached(mnist, classifier, tmp_path_factory):
    clf, info = classifier
    assert info["test_accuracy"] > 0.8  # 150 steps is enough to be far above chance (0.1)
    again, info2 = load_or_train_classifier(mnist, cache_dir=info["path"], steps=150)
    for a, b in zip(clf.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)  # loaded, not retrained
    x, y = mnist.held_out(500, seed=1)
    assert classifier_accuracy(again, x, y) == pytest.approx(classifier_accuracy(clf, x, y))


def test_corrupt_classifier_cache_is_retrained(mnist, tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    (folder / "model.safetensors").write_bytes(b"garbage")
    clf, info = load_or_train_classifier(mnist, cache_dir=folder, steps=5)
    assert isinstance(clf, ImageClassifier) and json.loads((folder / "config.json").read_text())["steps"] == 5


def test_identical_sets_score_as_identical(mnist, classifier):
    clf, _ = classifier
    x, _ = mnist.held_out(600, seed=2)
    q = image_quality(x, x.clone(), clf, kid_subset=300)
    assert abs(q["fid"]) < 1e-2
    assert abs(q["kid"]) < 3 * q["kid_std"] + 1e-3  # unbiased estimate over random subsets: centred on 0
    assert q["precision"] == 1.0 and q["recall"] == 1.0


def test_different_sets_score_as_different(mnist, classifier):
    clf, _ = classifier
    x, _ = mnist.held_out(600, seed=2)
    same = image_quality(x, mnist.sample(600, torch.Generator().manual_seed(3))[0], clf, kid_subset=300)
    noise = torch.rand_like(x) * 2 - 1
    diff = image_quality(x, noise, clf, kid_subset=300)
    assert diff["fid"] > 20 * max(same["fid"], 1e-3) and diff["kid"] > 10 * max(same["kid"], 1e-4)
    assert diff["precision"] < 0.1 < same["precision"]
    ones = x[mnist.held_out(600, seed=2)[1] == 1]
    only_ones = image_quality(x, ones, clf, kid_subset=50)
    assert only_ones["recall"] < 0.5 * same["recall"]  # one class out of ten: low recall


def test_knn_precision_recall_by_hand():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    fake = torch.tensor([[0.5], [10.0]], dtype=torch.float64)
    # k = 1: every real radius is 1, so 0.5 is inside and 10 is not; fake radii are 9.5 (covers all)
    p, r = knn_precision_recall(real, fake, k=1)
    assert p == 0.5 and r == 1.0


def test_quick_image_bench_end_to_end(tmp_path, monkeypatch, capsys):
    import ntm.image_bench as ib

    monkeypatch.setenv("NTM_CACHE_DIR", str(tmp_path / "cache"))
    real = ib.run_image_bench

    def tiny(*args, **kwargs):
        return real(*args, **{**kwargs, "classifier_steps": 20,
                              "settings": {"n_bpd": 8, "n_bpd_fm": 2, "fm_ode_steps": 2, "bpd_trajectories": 1}})

    monkeypatch.setattr(ib, "run_image_bench", tiny)
    out = tmp_path / "mnist-quick.json"
    argv = ["bench", "mnist", "--quick", "--steps", "3", "--n-samples", "20", "--distill-steps", "2",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    keys = {"model", "steps", "decode", "solver", "nfe", "fid", "kid", "precision", "recall", "class_acc", "bpd",
            "img_per_s", "train_seconds", "extractor", "n_samples"}
    assert [(r["model"], r["steps"], r["decode"], r["solver"]) for r in res["rows"]] == [
        ("ntm", 4, "inverse", None), ("ntm", 4, "inverse+score", None), ("ntm", 4, "denoiser", None),
        ("ntm", 8, "inverse", None), ("fm", 4, None, "euler"), ("fm", 8, None, "euler"),
        ("fm", 50, None, "euler"), ("fm", 4, None, "heun")]
    for r in res["rows"]:
        assert keys <= set(r) and r["n_samples"] == 20
    assert res["rows"][2]["rmse_to_score"] >= 0 and "feature_dist_to_score" in res["rows"][2]
    timing = res["config"]["inverse_timing"]
    assert timing["max_abs_diff"] < 1e-3 and timing["jacobi_seconds"] > 0
    assert res["config"]["train_steps"] == 3 and res["config"]["ntm_fm_step_cost_ratio"] > 0
    folder = tmp_path / "mnist-quick"
    assert (folder / "training-curves.png").is_file() and (folder / "samples-ntm-4.png").is_file()
    assert (folder / "samples-fm-heun-4.png").is_file()
    assert out.with_suffix(".md").read_text().startswith("| model | steps |")
    # a re-run of the same command reuses the trained runs and every finished row
    assert main(argv) == 0
    again = json.loads(out.read_text())
    assert [r["img_per_s"] for r in again["rows"]] == [r["img_per_s"] for r in res["rows"]]
