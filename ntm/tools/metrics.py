"""Sample-quality metrics: for 2-D data (below) and for images (classifier-feature FID, KID,
precision/recall and class accuracy; see the second half).

* ``energy_distance``: D^2 = 2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic form), on (n, d) sets.
* ``off_support_fraction``: share of samples where the true density is zero (checkerboard).
* ``detection_scores``: AUROC and AUPR of an anomaly statistic (out-of-distribution = positive).
* ``calibration_error``: the expected calibration error of class probabilities (15 equal bins).
* ``low_density_fraction``: share of samples whose true log-density falls below the ``q`` quantile
  of the data's own log-densities (a perfect sampler scores q).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import (binary_auroc, binary_average_precision,
                                                     multiclass_calibration_error)
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm import tqdm

from ..data import toy_log_density
from ..errors import CheckpointError, DataError
from ..io import load_into, read_meta, write_artifact


def _mean_dist(a: Tensor, b: Tensor, chunk: int = 2048) -> float:
    total = 0.0
    for lo in range(0, a.shape[0], chunk):
        total += float(torch.cdist(a[lo:lo + chunk].double(), b.double()).sum())
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Squared energy distance between samples x (n, d) and y (m, d)."""
    return 2 * _mean_dist(x, y) - _mean_dist(x, x) - _mean_dist(y, y)


def off_support_fraction(name: str, samples: Tensor) -> float:
    """Fraction of samples with zero true density (only meaningful for checkerboard)."""
    return float(torch.isinf(toy_log_density(name, samples)).double().mean())


def low_density_fraction(name: str, samples: Tensor, reference: Tensor, q: float = 0.01) -> float:
    """Fraction of samples with true log-density below the q-quantile of the reference data's."""
    threshold = torch.quantile(toy_log_density(name, reference), q)
    return float((toy_log_density(name, samples) < threshold).double().mean())


# ------------------------------------------------------------------------------------------ images
# Image quality is measured in the feature space of a small CNN trained by the project on the data
# set itself ("domain" FID/KID, as is usual for MNIST-scale generative work; not comparable to
# Inception-FID numbers). The same classifier scores the class accuracy of conditional samples.

CLASSIFIER_FORMAT = "ntm-classifier"


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the project's metric classifiers are trained (besides their step count): Adam at ``lr``
    with cosine decay, ``batch`` images a step, torch seed ``seed``; the feature scale is set on
    ``feature_images`` training images. Recorded with every cached classifier and checked on reuse."""

    lr: float = 1e-3
    batch: int = 128
    seed: int = 0
    feature_images: int = 5000


CLASSIFIER_RECIPE = ClassifierRecipe()
# the recipe of the classifiers cached before records named theirs (the values then written in the code)
UNRECORDED_RECIPE = ClassifierRecipe(lr=1e-3, batch=128, seed=0, feature_images=5000)


def same_recipe(info: dict, recipe: ClassifierRecipe, unrecorded: ClassifierRecipe = UNRECORDED_RECIPE) -> bool:
    """Was the cached classifier with record ``info`` trained with ``recipe``? A record without a
    recipe was trained with ``unrecorded``."""
    return info.get("recipe", asdict(unrecorded)) == asdict(recipe)


def extractor_name(info: dict) -> str:
    """How a results row names the metric classifier of record ``info`` (its features' source)."""
    return f"project classifier ({info['name']}, 128-d features, test acc {info['test_accuracy']:.4f})"


def classifier_record(info: dict) -> dict:
    """What a results file keeps of a metric classifier's record: name, steps, recipe, test accuracy."""
    return {k: info[k] for k in ("name", "steps", "recipe", "test_accuracy")}


class ImageClassifier(nn.Module):
    """Two conv blocks and a 128-d penultimate layer. Images (B, C, H, W) in [-1, 1] -> logits (B, K)."""

    num_features = 128

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, self.num_features), nn.ReLU())
        self.head = nn.Linear(self.num_features, num_classes)
        # set after training so that real images' features have unit mean square (scale-free metrics)
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 128) penultimate activations, times ``feature_scale``."""
        return self.conv(x.float()) * self.feature_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x.float()))


class ClassifierFeatures(nn.Module):
    """The classifier's feature map as a torchmetrics feature extractor (``num_features`` = 128)."""

    def __init__(self, classifier: ImageClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x)


def _cache_root() -> Path:
    return Path(os.environ.get("NTM_CACHE_DIR", Path.home() / ".cache" / "ntm")) / "classifiers"


def _data_key(source) -> str:
    """A short fingerprint of a data set's train images and labels, naming its cached classifier."""
    h = hashlib.sha1()
    h.update(str(tuple(source.images.shape)).encode())
    h.update(source.images[:: max(1, source.images.shape[0] // 512)].numpy().tobytes())
    if source.labels is not None:
        h.update(source.labels.numpy().tobytes())
    return f"{source.name}-{h.hexdigest()[:10]}"


@torch.no_grad()
def classifier_accuracy(classifier: ImageClassifier, images: Tensor, labels: Tensor, batch: int = 1000) -> float:
    """Share of images (n, C, H, W) in [-1, 1] that the classifier assigns to their label (n,)."""
    classifier.eval()
    hits = 0
    for lo in range(0, images.shape[0], batch):
        hits += int((classifier(images[lo:lo + batch]).argmax(1) == labels[lo:lo + batch].to(torch.long)).sum())
    return hits / images.shape[0]


def fit_classifier(clf: ImageClassifier, batch, loss_fn, steps: int, feature_images, progress: bool = False,
                   desc: str = "classifier", lr: float = CLASSIFIER_RECIPE.lr) -> ImageClassifier:
    """The project's classifier recipe: ``steps`` of Adam (``lr``, cosine decay) on ``loss_fn(logits,
    y)`` over ``batch()`` -> (x, y) draws, then the feature scale set so the FID features of
    ``feature_images()`` (N, C, H, W) have unit mean square. Returns ``clf`` in eval mode."""
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    clf.train()
    for _ in tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True):
        x, y = batch()
        loss = loss_fn(clf(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    clf.eval()
    with torch.no_grad():
        f = clf.conv(feature_images())
        clf.feature_scale.fill_(float(f.pow(2).mean().rsqrt()))
    return clf


def train_classifier(source, steps: int = 3000, recipe: ClassifierRecipe = CLASSIFIER_RECIPE,
                     progress: bool = False) -> tuple[ImageClassifier, float]:
    """Train the metrics classifier on a labelled image source; returns it and its test accuracy."""
    if source.labels is None:
        raise DataError("the metrics classifier needs a labelled image data set")
    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    num_classes = int(source.labels.max()) + 1
    clf = ImageClassifier(source.images.shape[1], num_classes)
    fit_classifier(clf, lambda: source.sample(recipe.batch, g),
                   lambda logits, y: nn.functional.cross_entropy(logits, y.long()),
                   steps, lambda: source.sample(recipe.feature_images, g)[0], progress, lr=recipe.lr)
    test_x, test_y = source.held_out(None, seed=777)
    return clf, classifier_accuracy(clf, test_x, test_y)


def load_or_train_classifier(source, cache_dir: str | Path | None = None, steps: int = 3000,
                             progress: bool = False) -> tuple[ImageClassifier, dict]:
    """The cached classifier for this data set (trained and saved on first use) and its record
    ``{"name", "test_accuracy", "steps", "recipe", "path"}``. The cache lives in $NTM_CACHE_DIR/classifiers
    (default ~/.cache/ntm/classifiers), one artifact folder (format ``ntm-classifier``) per data set
    fingerprint; an unreadable one is retrained and replaced."""
    folder = Path(cache_dir) if cache_dir else _cache_root() / _data_key(source)
    num_classes = int(source.labels.max()) + 1 if source.labels is not None else 0
    if (folder / "config.json").is_file():
        try:
            meta = read_meta(folder, (CLASSIFIER_FORMAT,))
            info = meta["config"]
            if info.get("steps") == steps and same_recipe(info, CLASSIFIER_RECIPE):
                clf = ImageClassifier(info["channels"], info["num_classes"])
                load_into(clf, folder / "model.safetensors")
                return clf.eval(), {**info, "recipe": asdict(CLASSIFIER_RECIPE), "path": str(folder)}
        except (CheckpointError, KeyError, TypeError):
            pass  # unreadable cache: retrain and replace it
    clf, acc = train_classifier(source, steps=steps, progress=progress)
    info = {"name": source.name, "channels": int(source.images.shape[1]), "num_classes": num_classes,
            "steps": steps, "recipe": asdict(CLASSIFIER_RECIPE), "test_accuracy": acc}
    write_artifact(folder, CLASSIFIER_FORMAT, info, {"model": clf.state_dict()})
    return clf, {**info, "path": str(folder)}


@torch.no_grad()
def extract_features(extractor: nn.Module, images: Tensor, batch: int = 1000) -> Tensor:
    """(n, C, H, W) -> (n, F) features, in batches."""
    return torch.cat([extractor(images[lo:lo + batch]).double() for lo in range(0, images.shape[0], batch)])


def knn_precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of feature sets (n, F), (m, F).

    Each set's manifold is the union of balls around its points with radius = distance to the k-th
    nearest neighbour in the same set. Precision: share of fake points inside the real manifold;
    recall: share of real points inside the fake manifold.
    """
    def radii(a: Tensor) -> Tensor:
        return torch.cat([torch.cdist(a[lo:lo + 1024], a).kthvalue(k + 1, dim=1).values for lo in range(0, len(a), 1024)])

    def covered(points: Tensor, centres: Tensor, r: Tensor) -> float:
        inside = [(torch.cdist(points[lo:lo + 1024], centres) <= r[None]).any(1) for lo in range(0, len(points), 1024)]
        return float(torch.cat(inside).double().mean())

    r_real, r_fake = radii(real), radii(fake)
    return covered(fake, real, r_real), covered(real, fake, r_fake)


def image_quality(real: Tensor, fake: Tensor, classifier: ImageClassifier, kid_subset: int = 1000) -> dict:
    """FID, KID (mean and std over subsets), precision and recall of ``fake`` against ``real`` images
    (n, C, H, W) in [-1, 1], all in the classifier's 128-d feature space (torchmetrics for FID/KID)."""
    extractor = ClassifierFeatures(classifier).eval()
    subset = min(kid_subset, real.shape[0], fake.shape[0])
    fid = FrechetInceptionDistance(feature=extractor, reset_real_features=True)
    with warnings.catch_warnings():  # "will save all extracted features": intended, sets are small
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=extractor, subset_size=subset)
    with torch.no_grad():
        for metric in (fid, kid):
            for lo in range(0, real.shape[0], 1000):
                metric.update(real[lo:lo + 1000].float(), real=True)
            for lo in range(0, fake.shape[0], 1000):
                metric.update(fake[lo:lo + 1000].float(), real=False)
        kid_mean, kid_std = kid.compute()
        fid_value = float(fid.compute())
    precision, recall = knn_precision_recall(extract_features(extractor, real), extract_features(extractor, fake))
    return {"fid": fid_value, "kid": float(kid_mean), "kid_std": float(kid_std),
            "precision": precision, "recall": recall}


def detection_scores(score_in: Tensor, score_out: Tensor) -> dict:
    """How well a statistic (larger = more anomalous) separates out-of-distribution samples (the
    positives) from in-distribution ones: ``{"auroc", "aupr"}`` (AUPR = average precision)."""
    preds = torch.cat([score_in, score_out]).double()
    target = torch.cat([torch.zeros(len(score_in)), torch.ones(len(score_out))]).long()
    if not torch.isfinite(preds).all():
        raise ValueError("detection scores contain NaN or inf")
    # torchmetrics reads scores outside [0, 1] as logits and squashes them with a sigmoid, which ties
    # every large score (likelihoods in nats are large); dense ranks in [0, 1] keep the order and ties
    values, rank = torch.unique(preds, return_inverse=True)
    preds = rank.double() / max(1, len(values) - 1)
    return {"auroc": float(binary_auroc(preds, target)), "aupr": float(binary_average_precision(preds, target))}


def calibration_error(log_probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """Expected calibration error (L1, ``bins`` equal-width confidence bins) of class log-probabilities
    (n, C) against labels (n,)."""
    probs = log_probs.double().exp()
    return float(multiclass_calibration_error(probs, labels.long(), num_classes=probs.shape[1], n_bins=bins, norm="l1"))
