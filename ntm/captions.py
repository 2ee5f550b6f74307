"""Captioned image data: images with a caption each, read as (images, ``Prompts``) batches.

* ``captioned-mnist`` and ``captioned-fashion``: every training image gets a caption drawn afresh from
  its class's training phrasings (``CLASS_TEMPLATES``; the last phrasing of each list is held out and
  used only by ``held_out``);
* ``canvas``: the compositional two-cell canvas of :mod:`ntm.canvas`; each canvas keeps its prompt and
  is re-phrased with a random training phrasing of its task each time it is drawn;
* a user's own: images and one fixed caption per image (``ntm.tools.datasets`` reads a folder with a
  JSONL or CSV captions file).

The encoder (a ``CachedEncoder``) turns captions into prompts; the distinct captions are few, so each
is encoded once.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from .canvas import TEMPLATES, caption_of, make_canvases
from .config import DataSpec
from .errors import DataError
from .images import dequantize, image_spec, load_named
from .text import CachedEncoder, Prompts

MNIST_NAMES = tuple(str(d) for d in range(10))
FASHION_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
CLASS_TEMPLATES = {
    "mnist": ("a {c}", "the digit {c}", "a handwritten {c}", "a picture of the number {c}"),
    "fashion": ("a {c}", "a photo of a {c}", "a grayscale {c}", "a small picture of a {c}"),
}
CANVAS_TRAIN, CANVAS_TEST = 20000, 2000
TEXT_DATA = ("captioned-mnist", "captioned-fashion", "canvas")


class TextImageSource:
    """Images (uint8 (M, C, H, W)) whose captions come from ``caption_fn(indices (n,), generator, train)``
    -> list of n strings; ``sample`` and ``held_out`` return (images in [-1, 1), ``Prompts``)."""

    is_toy = False
    labels = None  # no class labels: prompts are the condition

    def __init__(self, name: str, images: Tensor, caption_fn, encoder: CachedEncoder, patch: int = 4,
                 test: Tensor | None = None):
        self.name = name
        self.images = images
        self.test = test
        self.caption_fn = caption_fn
        self.encoder = encoder
        self.patch = patch

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Prompts]:
        """A training batch: n dequantised images (n, C, H, W) and their encoded captions, one of the
        training phrasings drawn per image."""
        idx = torch.randint(0, self.images.shape[0], (n,), generator=generator)
        x = dequantize(self.images[idx], generator)
        return x, self.encoder.encode(self.caption_fn(idx, generator, True))

    def captions(self, idx: Tensor, seed: int = 0, train: bool = False) -> list[str]:
        """A caption for each image index in ``idx`` (n,), drawn with ``seed`` by the caption function:
        with ``train`` from the training images and phrasings, else from the test split's."""
        return self.caption_fn(idx, torch.Generator().manual_seed(seed), train)

    def held_out(self, n: int | None = None, seed: int = 12345) -> tuple[Tensor, Prompts]:
        """The test images (or the training ones when there is no test split), first n, with captions
        that may use the held-out phrasings."""
        images = self.test if self.test is not None else self.images
        images = images if n is None else images[:n]
        caps = self.caption_fn(torch.arange(len(images)), torch.Generator().manual_seed(seed), False)
        return dequantize(images, torch.Generator().manual_seed(seed)), self.encoder.encode(caps)

    def null_prompt(self) -> Prompts:
        return self.encoder.encode([""])

    def spec(self, n_stats: int = 0) -> DataSpec:
        base = image_spec(self.name, self.images, 0, self.patch)
        return replace(base, text_encoder=self.encoder.identity, text_dim=self.encoder.dim,
                       text_tokens=self.encoder.max_tokens)


def class_captions(labels: Tensor, names: tuple[str, ...], templates: tuple[str, ...], test_labels: Tensor | None = None):
    """A caption function for labelled images: training draws use all but the last phrasing; held-out
    draws (``train`` False, on the test labels) may use every phrasing."""

    def fn(idx: Tensor, g: torch.Generator, train: bool) -> list[str]:
        lab = labels if train or test_labels is None else test_labels
        k = len(templates) - 1 if train else len(templates)
        pick = torch.randint(0, k, (len(idx),), generator=g)
        return [templates[int(p)].format(c=names[int(lab[int(i)])]) for i, p in zip(idx, pick)]

    return fn


def canvas_data() -> dict:
    """The canvas's training and test sets {"train", "test"}: (uint8 images, prompt specs, cells),
    built from MNIST's train and test digits with fixed seeds."""
    x, y = load_named("mnist", "train")
    xt, yt = load_named("mnist", "test")
    train = make_canvases(CANVAS_TRAIN, x, y, seed=0, train=True)
    test = make_canvases(CANVAS_TEST, xt, yt, seed=1, train=False)
    return {"train": train, "test": test}


def canvas_captions(train_specs: list, test_specs: list):
    """Captions of canvases: a training draw re-phrases the canvas's prompt with a random training
    phrasing of its task; a held-out draw keeps the test prompt as made."""

    def fn(idx: Tensor, g: torch.Generator, train: bool) -> list[str]:
        if not train:
            return [test_specs[int(i)].caption for i in idx]
        out = []
        for i in idx:
            spec = train_specs[int(i)]
            p = int(torch.randint(0, len(TEMPLATES[spec.task]) - 1, (1,), generator=g))
            out.append(caption_of(replace(spec, phrasing=p)))
        return out

    return fn


def open_text_source(name: str, encoder: CachedEncoder, patch: int = 4) -> TextImageSource:
    """``captioned-mnist``, ``captioned-fashion`` or ``canvas`` with prompts from ``encoder``."""
    if name in ("captioned-mnist", "captioned-fashion"):
        base = name.split("-")[1]
        x, y = load_named(base, "train")
        xt, yt = load_named(base, "test")
        names = MNIST_NAMES if base == "mnist" else FASHION_NAMES
        return TextImageSource(name, x, class_captions(y, names, CLASS_TEMPLATES[base], yt), encoder, patch, test=xt)
    if name == "canvas":
        data = canvas_data()
        (x, specs, cells), (xt, tspecs, tcells) = data["train"], data["test"]
        src = TextImageSource(name, x, canvas_captions(specs, tspecs), encoder, patch, test=xt)
        src.train_specs, src.test_specs, src.train_cells, src.test_cells = specs, tspecs, cells, tcells
        return src
    raise DataError(f"unknown captioned data '{name}' (use {', '.join(TEXT_DATA)} or an image folder with --captions)")


def fixed_captions(captions: list[str]):
    """A caption function for images with one caption each."""

    def fn(idx: Tensor, g: torch.Generator, train: bool) -> list[str]:
        return [captions[int(i)] for i in idx]

    return fn


def read_captions(path: str | Path) -> dict[str, str]:
    """A captions file -> {file name: caption}: JSONL lines {"file": ..., "caption": ...} or CSV rows
    ``file,caption`` (an optional header ``file,caption``; the caption may contain commas)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read captions file {path} ({exc.__class__.__name__})") from None
    out = {}
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                rec = json.loads(line)
                out[str(rec["file"])] = str(rec["caption"])
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path}:{no}: expected a JSON object with \"file\" and \"caption\"") from None
        else:
            file, sep, caption = line.partition(",")
            if not sep:
                raise DataError(f"{path}:{no}: expected 'file,caption'")
            if no == 1 and file.strip() == "file" and caption.strip() == "caption":
                continue
            out[file.strip()] = caption.strip().strip('"')
    if not out:
        raise DataError(f"{path}: no captions")
    return out


__all__ = ["TextImageSource", "open_text_source", "class_captions", "canvas_captions", "fixed_captions",
           "read_captions", "TEXT_DATA", "MNIST_NAMES", "FASHION_NAMES", "CLASS_TEMPLATES"]
