"""Data sources and their token representation.

Every source yields raw samples; :class:`DataSpec` (in the config) says how raw samples become
standardised tokens (B, N, D). 2-D points (B, 2) become N = 2 tokens of D = 1 channel.

Toy generators follow the FFJORD definitions (checkerboard, 8gaussians, moons, pinwheel, 2spirals),
written against a ``torch.Generator`` so that training data are reproducible and resumable. Moons
draws its arc angles uniformly at random (FFJORD/sklearn space them evenly), which is the same
distribution in the limit but makes two finite sets independent.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import DataSpec
from .errors import DataError
from .images import ImageSource, images_from_array, open_image_source, patchify, unpatchify

TOY_NAMES = ("checkerboard", "8gaussians", "moons", "pinwheel", "2spirals")

# Differential entropy of each toy in nats per point: the lowest achievable expected NLL.
ENTROPY_FLOOR = {"checkerboard": math.log(32.0), "8gaussians": 2.831, "moons": 2.394, "pinwheel": 2.318, "2spirals": 2.642}


# Each generator returns (points (n, 2), labels (n,)): the square, component, moon, arm or spiral of
# every point, which class-conditional toy models use; the labels cost no extra random draws.


def _checkerboard(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g).float() * 2
    x2 = x2 + torch.remainder(torch.floor(x1), 2)
    x = torch.stack([x1, x2], 1) * 2
    cell = (torch.floor(x / 2) + 2).long().clamp(0, 3)
    return x, cell[:, 0] * 2 + cell[:, 1] // 2


EIGHT_CENTERS = torch.tensor(
    [(1, 0), (-1, 0), (0, 1), (0, -1), (1 / math.sqrt(2), 1 / math.sqrt(2)), (1 / math.sqrt(2), -1 / math.sqrt(2)),
     (-1 / math.sqrt(2), 1 / math.sqrt(2)), (-1 / math.sqrt(2), -1 / math.sqrt(2))], dtype=torch.float32
) * 4 / 1.414
EIGHT_STD = 0.5 / 1.414


def _eight_gaussians(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    idx = torch.randint(0, 8, (n,), generator=g)
    return EIGHT_CENTERS[idx] + torch.randn(n, 2, generator=g) * EIGHT_STD, idx


def _moons(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    n_out = n // 2
    theta = torch.rand(n, generator=g) * math.pi
    outer = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    inner = torch.stack([1 - torch.cos(theta), 1 - torch.sin(theta) - 0.5], 1)
    pts = torch.cat([outer[:n_out], inner[n_out:]])
    labels = torch.cat([torch.zeros(n_out, dtype=torch.long), torch.ones(n - n_out, dtype=torch.long)])
    pts = pts + torch.randn(n, 2, generator=g) * 0.1
    perm = torch.randperm(n, generator=g)
    return pts[perm] * 2 + torch.tensor([-1.0, -0.2]), labels[perm]


def _pinwheel(n: int, g: torch.Generator) -> Tensor:
    radial_std, tangential_std, arms, rate = 0.3, 0.1, 5, 0.25
    rads = torch.arange(arms) * (2 * math.pi / arms)
    feats = torch.randn(n, 2, generator=g) * torch.tensor([radial_std, tangential_std])
    feats[:, 0] += 1.0
    labels = torch.randint(0, arms, (n,), generator=g)
    angles = rads[labels] + rate * torch.exp(feats[:, 0])
    c, s = torch.cos(angles), torch.sin(angles)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (n, 2, 2)
    return 2 * torch.einsum("ni,nij->nj", feats, rot), labels


def _two_spirals(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    half = n // 2
    r = torch.sqrt(torch.rand(half, 1, generator=g)) * 540 * (2 * math.pi) / 360
    d1x = -torch.cos(r) * r + torch.rand(half, 1, generator=g) * 0.5
    d1y = torch.sin(r) * r + torch.rand(half, 1, generator=g) * 0.5
    arm = torch.cat([d1x, d1y], 1)
    x = torch.cat([arm, -arm]) / 3
    labels = torch.cat([torch.zeros(half, dtype=torch.long), torch.ones(half, dtype=torch.long)])
    if x.shape[0] < n:
        x, labels = torch.cat([x, x[: n - x.shape[0]]]), torch.cat([labels, labels[: n - labels.shape[0]]])
    x = x + torch.randn(n, 2, generator=g) * 0.1
    perm = torch.randperm(n, generator=g)
    return x[perm], labels[perm]


_TOYS = {"checkerboard": _checkerboard, "8gaussians": _eight_gaussians, "moons": _moons,
         "pinwheel": _pinwheel, "2spirals": _two_spirals}
TOY_CLASSES = {"checkerboard": 8, "8gaussians": 8, "moons": 2, "pinwheel": 5, "2spirals": 2}


def sample_toy_labeled(name: str, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """n points (n, 2) of a named 2-D toy and their class labels (n,) (see ``TOY_CLASSES``)."""
    if name not in _TOYS:
        raise DataError(f"unknown data set '{name}' (known: {', '.join(TOY_NAMES)}, or a .npy/.csv file)")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    return _TOYS[name](n, g)


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n points (n, 2) of a named 2-D toy distribution."""
    return sample_toy_labeled(name, n, generator)[0]


def toy_log_density(name: str, x: Tensor) -> Tensor:
    """Exact log-density of a toy where it has a closed form (checkerboard, 8gaussians). x: (B, 2)."""
    x = x.double()
    if name == "checkerboard":
        inside = (x.abs() <= 4).all(1) & (torch.remainder(torch.floor(x[:, 0] / 2) + torch.floor(x[:, 1] / 2), 2) == 0)
        return torch.where(inside, torch.full_like(x[:, 0], -math.log(32.0)), torch.full_like(x[:, 0], -math.inf))
    if name == "8gaussians":
        d2 = ((x[:, None] - EIGHT_CENTERS.double()[None]) ** 2).sum(-1)
        comp = -0.5 * d2 / EIGHT_STD**2 - math.log(2 * math.pi * EIGHT_STD**2)
        return torch.logsumexp(comp, 1) - math.log(8)
    raise DataError(f"no closed-form density for '{name}'")


class DataSource:
    """A stream of raw training samples: a toy generator or rows of a user array.

    ``sample(n, generator)`` returns (raw (n, *shape), labels (n,) or None).
    """

    def __init__(self, name: str, array: Tensor | None = None, labels: Tensor | None = None,
                 conditional: bool = False):
        self.name = name
        self.array = array
        self.labels = labels
        self.conditional = conditional and array is None  # toys: also yield class labels

    @property
    def is_toy(self) -> bool:
        return self.array is None

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        if self.array is None:
            x, y = sample_toy_labeled(self.name, n, generator)
            return x, (y if self.conditional else None)
        idx = torch.randint(0, self.array.shape[0], (n,), generator=generator)
        return self.array[idx], None if self.labels is None else self.labels[idx]

    def held_out(self, n: int | None, seed: int = 12345) -> tuple[Tensor, Tensor | None]:
        """An evaluation set: ``n`` fresh toy samples from a fixed seed far from training, or the file's
        first ``n`` points (all of them for ``n`` None)."""
        if self.array is None:
            x, y = sample_toy_labeled(self.name, n, torch.Generator().manual_seed(seed))
            return x, (y if self.conditional else None)
        if n is None:
            return self.array, self.labels
        return self.array[:n], None if self.labels is None else self.labels[:n]

    def spec(self, n_stats: int = 100_000) -> DataSpec:
        """Token layout and standardisation statistics of this source."""
        x = self.array if self.array is not None else sample_toy(self.name, n_stats, torch.Generator().manual_seed(777))
        mean = x.double().mean(0)
        std = x.double().std(0)
        if (std <= 1e-12 * (1 + mean.abs())).any():
            raise DataError(f"{self.name}: a column is constant; a density over it is not defined")
        if self.array is None:
            num_classes = TOY_CLASSES[self.name] if self.conditional else 0
        else:
            num_classes = 0 if self.labels is None else int(self.labels.max()) + 1
        return DataSpec(name=self.name, kind="vector", shape=tuple(x.shape[1:]),
                        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std), num_classes=num_classes)


def read_array(path: str | Path) -> np.ndarray:
    """The raw array of a user ``.npy`` or ``.csv`` file (one clear DataError when unreadable)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"expected a .npy or .csv file, got a folder: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix == ".csv":
            arr = _load_csv(path)
        else:
            raise DataError(f"unsupported data file type '{suffix}' (use .npy or .csv): {path}")
    except DataError:
        raise
    except Exception as exc:  # numpy raises many kinds for a bad file
        raise DataError(f"could not read {path}: {exc}".splitlines()[0]) from None
    return arr


def load_array(path: str | Path) -> Tensor:
    """Load a user file of points (n, 2): ``.npy`` or ``.csv`` (comma separated, optional header)."""
    path = Path(path)
    arr = read_array(path)
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{path}: expected numbers, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise DataError(f"{path}: expected an array of shape (n, 2), got {tuple(arr.shape)}")
    if arr.shape[0] < 2:
        raise DataError(f"{path}: need at least 2 points, got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(1).sum())
        raise DataError(f"{path}: {bad} row(s) contain NaN or inf")
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(x).all():  # finite in float64 but beyond float32's range
        bad = int((~np.isfinite(x)).any(1).sum())
        raise DataError(f"{path}: {bad} row(s) overflow float32 (|value| > {np.finfo(np.float32).max:.3g})")
    return torch.from_numpy(x)


def _load_csv(path: Path) -> np.ndarray:
    text = path.read_text().strip().splitlines()
    if not text:
        raise DataError(f"{path}: the file is empty")
    first = text[0].split(",")
    try:
        [float(v) for v in first]
        skip = 0
    except ValueError:
        skip = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty table is reported by the shape check instead
        return np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.float64, ndmin=2)


def open_source(name_or_path: str, conditional: bool = False, patch: int = 4):
    """A toy by name (with class labels if ``conditional``), a user's .npy/.csv file of 2-D points,
    or images: ``mnist``, ``fashion`` or an image ``.npy`` (n, H, W[, C]). Image sources use their
    class labels whenever they have them. (Folders of image files: ``ntm.tools.datasets.open_data``.)
    """
    if name_or_path in _TOYS:
        return DataSource(name_or_path, conditional=conditional)
    if name_or_path in ("mnist", "fashion"):
        return open_image_source(name_or_path, patch=patch)
    if Path(name_or_path).is_dir():
        raise DataError(f"{name_or_path} is a folder; image folders are read by ntm.tools.datasets.open_data "
                        "(the `ntm` command does this)")
    if conditional:
        raise DataError("--conditional needs a toy data set (user point files carry no labels)")
    if name_or_path.lower().endswith(".npy") and Path(name_or_path).is_file():
        arr = read_array(name_or_path)
        if arr.ndim in (3, 4):
            return ImageSource(Path(name_or_path).stem, images_from_array(arr, Path(name_or_path)), None, patch=patch)
    if name_or_path.lower().endswith((".npy", ".csv")) or Path(name_or_path).exists():
        return DataSource(Path(name_or_path).stem, load_array(name_or_path))
    raise DataError(f"unknown data set '{name_or_path}' (known: {', '.join(TOY_NAMES)}, or a .npy/.csv file)")


def to_tokens(x: Tensor, spec: DataSpec) -> Tensor:
    """Raw samples (B, *shape) -> standardised tokens (B, N, D) (images: patches of [-1, 1] pixels)."""
    if tuple(x.shape[1:]) != tuple(spec.shape):
        raise DataError(f"expected samples of shape {tuple(spec.shape)}, got {tuple(x.shape[1:])}")
    if spec.kind == "image":
        return patchify(x.float(), spec.patch)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device)
    z = (x.float() - mean) / std
    return z.reshape(x.shape[0], spec.num_tokens, spec.token_dim)


def from_tokens(z: Tensor, spec: DataSpec) -> Tensor:
    """Standardised tokens (B, N, D) -> raw samples (B, *shape)."""
    if spec.kind == "image":
        return unpatchify(z.float(), tuple(spec.shape), spec.patch)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=z.device)
    std = torch.tensor(spec.std, dtype=torch.float32, device=z.device)
    return z.float().reshape((z.shape[0],) + tuple(spec.shape)) * std + mean
