"""Data the core cannot read by itself: folders of PNG/JPEG files (Pillow). ``open_data`` is what the
command line uses: an image folder here, everything else through ``ntm.data.open_source``;
``open_text_data`` opens captioned data with a text encoder from ``ntm.tools.text_encoders``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

import os

from ..captions import TEXT_DATA, TextImageSource, fixed_captions, open_text_source, read_captions
from ..data import open_source
from ..errors import DataError
from ..images import ImageSource
from ..text import CachedEncoder
from .text_encoders import load_encoder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_image(f: Path) -> np.ndarray:
    """One PNG/JPEG file -> uint8 (C, H, W), grey (C = 1) or RGB (C = 3)."""
    if f.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{f}: not a PNG or JPEG file")
    try:
        with Image.open(f) as im:
            im = im.convert("L") if im.mode in ("L", "1", "P", "I;16", "LA") else im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{f}: unreadable image ({exc.__class__.__name__})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


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
            arr = read_image(f)
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


def text_cache_dir() -> Path:
    """Where encoded captions are cached: $NTM_CACHE_DIR/text (default ~/.cache/ntm/text)."""
    return Path(os.environ.get("NTM_CACHE_DIR", Path.home() / ".cache" / "ntm")) / "text"


def open_text_data(name_or_path: str, captions: str | Path | None = None, encoder="minilm",
                   patch: int = 4) -> TextImageSource:
    """Captioned images: ``captioned-mnist``, ``captioned-fashion``, ``canvas``, or an image folder with
    a captions file (JSONL or CSV: file, caption; every image needs one). ``encoder`` is a registry
    name or identity (see ``ntm.tools.text_encoders``) or an encoder object; its captions are cached."""
    enc = load_encoder(encoder) if isinstance(encoder, str) else encoder
    cached = CachedEncoder(enc, cache_dir=text_cache_dir())
    if captions is None:
        if name_or_path not in TEXT_DATA:
            raise DataError(f"'{name_or_path}' needs a captions file (--captions) or is not one of {', '.join(TEXT_DATA)}")
        return open_text_source(name_or_path, cached, patch)
    folder = Path(name_or_path)
    if not folder.is_dir():
        raise DataError(f"--captions goes with an image folder; {folder} is not one")
    table = read_captions(captions)
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    missing = [f.name for f in files if f.name not in table]
    if missing:
        raise DataError(f"{len(missing)} image(s) have no caption in {captions} (first: {missing[0]})")
    arrays = [read_image(f) for f in files]
    if not arrays:
        raise DataError(f"no PNG or JPEG images in {folder}")
    if len({a.shape for a in arrays}) > 1:
        raise DataError(f"images in {folder} differ in size or channels")
    images = torch.from_numpy(np.stack(arrays))
    return TextImageSource(folder.name, images, fixed_captions([table[f.name] for f in files]), cached, patch)
