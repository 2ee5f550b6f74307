"""Data the core cannot read by itself: folders of PNG/JPEG files (Pillow). ``open_data`` is what the
command line uses: an image folder here, everything else through ``ntm.data.open_source``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..data import open_source
from ..errors import DataError
from ..images import ImageSource

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_image_folder(path: Path) -> tuple[Tensor, Tensor | None]:
    """PNG/JPEG files of one size -> uint8 (n, C, H, W); with sub-folders, each sub-folder is a class
    (sorted by name) and the labels (n,) are returned too."""
    subdirs = sorted(p for p in path.iterdir() if p.is_dir())
    groups = [(i, sorted(p for p in d.iterdir() if p.is_file())) for i, d in enumerate(subdirs)] if subdirs \
        else [(None, sorted(p for p in path.iterdir() if p.is_file()))]
    images, labels, size, first = [], [], None, None
    for label, files in groups:
        for f in files:
            if f.name.startswith("."):
                continue
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{f}: not a PNG or JPEG file")
            try:
                with Image.open(f) as im:
                    im = im.convert("L") if im.mode in ("L", "1", "P", "I;16", "LA") else im.convert("RGB")
                    arr = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"{f}: unreadable image ({exc.__class__.__name__})") from None
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if size is None:
                size, first = arr.shape, f
            elif arr.shape != size:
                raise DataError(f"images differ in size or channels: {first.name} is {size}, {f.name} is {arr.shape}")
            images.append(arr)
            labels.append(label)
    if not images:
        raise DataError(f"no PNG or JPEG images in {path}")
    x = torch.from_numpy(np.stack(images))
    y = torch.tensor(labels, dtype=torch.long) if subdirs else None
    return x, y


def open_data(name_or_path: str, conditional: bool = False, patch: int = 4):
    """A data source by name or path: toys, point files, ``mnist``/``fashion``, image arrays (see
    ``ntm.data.open_source``) and folders of images (labelled by sub-folder when there are any)."""
    path = Path(name_or_path)
    if path.is_dir():
        x, y = load_image_folder(path)
        return ImageSource(path.name, x, y, patch=patch)
    return open_source(name_or_path, conditional=conditional, patch=patch)
