"""Image metrics (classifier features, FID/KID, precision/recall) and the image bench end to end."""

import json

import pytest
import torch

from ntm.images import open_image_source
from ntm.tools import metrics
from ntm.tools.metrics import (CLASSIFIER_RECIPE, ImageClassifier, classifier_accuracy, image_quality, knn_precision_recall,
                               load_or_train_classifier)


@pytest.fixture(scope="module")
def mnist():
    return open_image_source("mnist")


@pytest.fixture(scope="module")
def classifier(mnist, tmp_path_factory):
    clf, info = load_or_train_classifier(mnist, cache_dir=tmp_path_factory.mktemp("clf") / "mnist", steps=150)
    return clf, info


@pytest.mark.slow
def test_classifier_learns_and_is_cached(mnist, classifier, tmp_path_factory):
    clf, info = classifier
    assert info["test_accuracy"] > 0.8  # 150 steps is enough to be far above chance (0.1)
    again, info2 = load_or_train_classifier(mnist, cache_dir=info["path"], steps=150)
    for a, b in zip(clf.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)  # loaded, not retrained
    x, y = mnist.held_out(500, seed=1)
    assert classifier_accuracy(again, x, y) == pytest.approx(classifier_accuracy(clf, x, y))


@pytest.mark.slow
def test_corrupt_classifier_cache_is_retrained(mnist, tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    (folder / "model.safetensors").write_bytes(b"garbage")
    clf, info = load_or_train_classifier(mnist, cache_dir=folder, steps=5)
    assert isinstance(clf, ImageClassifier) and json.loads((folder / "config.json").read_text())["config"]["steps"] == 5


def test_a_cached_classifier_is_reused_only_with_its_recipe(mnist, tmp_path, monkeypatch):
    folder = tmp_path / "c"
    _, info = load_or_train_classifier(mnist, cache_dir=folder, steps=3)
    assert info["recipe"] == {"lr": 1e-3, "batch": 128, "seed": 0, "feature_images": 5000}
    trained = []
    real_train = metrics.train_classifier
    monkeypatch.setattr(metrics, "train_classifier", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    meta = json.loads((folder / "config.json").read_text())
    del meta["config"]["recipe"]  # a record from before recipes were recorded: trained with today's values
    (folder / "config.json").write_text(json.dumps(meta))
    assert load_or_train_classifier(mnist, cache_dir=folder, steps=3)[1]["recipe"] == info["recipe"] and not trained
    meta["config"]["recipe"] = {**info["recipe"], "lr": 3e-4}  # another recipe: trained again, and replaced
    (folder / "config.json").write_text(json.dumps(meta))
    load_or_train_classifier(mnist, cache_dir=folder, steps=3)
    assert trained == [1]
    assert json.loads((folder / "config.json").read_text())["config"]["recipe"]["lr"] == CLASSIFIER_RECIPE.lr


@pytest.mark.slow
def test_identical_sets_score_as_identical(mnist, classifier):
    clf, _ = classifier
    x, _ = mnist.held_out(600, seed=2)
    q = image_quality(x, x.clone(), clf, kid_subset=300)
    assert abs(q["fid"]) < 1e-2
    assert abs(q["kid"]) < 3 * q["kid_std"] + 1e-3  # unbiased estimate over random subsets: centred on 0
    assert q["precision"] == 1.0 and q["recall"] == 1.0


@pytest.mark.slow
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



def test_auroc_of_two_gaussians_matches_its_closed_form():
    import math

    from ntm.tools.metrics import detection_scores
    g = torch.Generator().manual_seed(0)
    n = 20000
    for delta in (0.5, 1.5):
        res = detection_scores(torch.randn(n, generator=g), torch.randn(n, generator=g) + delta)
        exact = 0.5 * (1 + math.erf(delta / 2))  # P(X_out > X_in) = Phi(delta / sqrt 2)
        assert abs(res["auroc"] - exact) < 0.01
        assert 0.5 < res["aupr"] < 1
    perfect = detection_scores(torch.zeros(10), torch.ones(10))
    assert perfect == {"auroc": 1.0, "aupr": 1.0}
    # scores far outside [0, 1] (likelihoods in nats) are ranked, not squashed into ties
    far = detection_scores(torch.randn(n, generator=g) * 50 + 5000, torch.randn(n, generator=g) * 50 + 5050)
    assert abs(far["auroc"] - 0.5 * (1 + math.erf(0.5))) < 0.01
    assert detection_scores(torch.full((5,), 3000.0), torch.full((5,), 3000.0))["auroc"] == 0.5


def test_calibration_error_matches_a_direct_binned_computation():
    from ntm.tools.metrics import calibration_error
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3000, 5, generator=g) * 2
    labels = torch.randint(0, 5, (3000,), generator=g)
    logp = torch.log_softmax(logits, 1)
    conf, pred = logp.exp().max(1)
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += float(inside.float().mean()) * abs(float((pred[inside] == labels[inside]).float().mean())
                                                      - float(conf[inside].mean()))
    assert calibration_error(logp, labels) == pytest.approx(ece, abs=1e-4)
