"""A compositional canvas for text-to-image at small scale, with GenEval-style tasks.

A canvas is an RGB image of two 28x28 cells side by side (3, 28, 56). Each cell is empty (black) or
holds an MNIST digit tinted with one of ``COLORS``. A prompt is drawn with its ground truth: a task,
the constraint the image must meet, and a caption from the task's templates.

Tasks (GenEval's, on digits): ``single`` ("a 3"), ``two`` ("a 3 and a 7"), ``counting`` ("two 5s",
"one 5"), ``colors`` ("a green 4"), ``position`` ("a 3 on the left of a 7") and ``color_attr``
("a red 2 and a blue 9"). Held out of training: the last template of every task (phrasings) and the
(digit, colour) pairs in ``HELD_OUT_PAIRS`` (no training canvas shows such a digit in such a colour).

A cell's ground truth is (digit or ``EMPTY``, colour index or -1); ``meets(spec, cells)`` says whether
a canvas whose cells were read as ``cells`` satisfies a prompt's constraint.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

COLORS = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.9, 0.15), "blue": (0.2, 0.35, 1.0), "yellow": (1.0, 0.85, 0.0),
          "white": (1.0, 1.0, 1.0)}
COLOR_NAMES = tuple(COLORS)
EMPTY = 10
TASKS = ("single", "two", "counting", "colors", "position", "color_attr")
HELD_OUT_PAIRS = frozenset({(0, "red"), (3, "green"), (5, "blue"), (7, "yellow"), (9, "white")})
NUMBER_WORDS = ("zero", "one", "two")
# per task, phrasings with slots {a}, {b} (digits), {c}, {c2} (colours), {n} (count word); the LAST
# one of each list is held out of training
TEMPLATES = {
    "single": ("a {a}", "the digit {a}", "a picture of a {a}", "an image with a {a}"),
    "two": ("a {a} and a {b}", "the digits {a} and {b}", "a {a} next to a {b}", "a {a} together with a {b}"),
    "counting": ("{n} {a}s", "exactly {n} {a}s", "a canvas with {n} {a}s", "{n} copies of {a}"),
    "colors": ("a {c} {a}", "a {a} in {c}", "the digit {a} coloured {c}", "a {a} painted {c}"),
    "position": ("a {a} on the left of a {b}", "a {b} on the right of a {a}", "{a} left, {b} right",
                 "a {a} to the left of a {b}"),
    "color_attr": ("a {c} {a} and a {c2} {b}", "a {a} in {c} and a {b} in {c2}", "a {c} {a} next to a {c2} {b}",
                   "a {c} {a} together with a {c2} {b}"),
}


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: ``task``; digits ``a`` and ``b`` (-1: none); colour names ``c``, ``c2``
    ("" : any); ``n`` (counting: 1 or 2); ``phrasing`` (template index); ``caption``."""

    task: str
    a: int
    b: int = -1
    c: str = ""
    c2: str = ""
    n: int = 0
    phrasing: int = 0
    caption: str = ""

    @property
    def heldout_phrasing(self) -> bool:
        return self.phrasing == len(TEMPLATES[self.task]) - 1

    @property
    def heldout_combination(self) -> bool:
        return (self.a, self.c) in HELD_OUT_PAIRS or (self.b, self.c2) in HELD_OUT_PAIRS


def caption_of(spec: PromptSpec) -> str:
    t = TEMPLATES[spec.task][spec.phrasing]
    if spec.task == "counting":
        return t.format(a=spec.a, n=NUMBER_WORDS[spec.n]).replace(f"one {spec.a}s", f"one {spec.a}")
    return t.format(a=spec.a, b=spec.b, c=spec.c, c2=spec.c2)


def meets(spec: PromptSpec, cells: list[tuple[int, int]]) -> bool:
    """Does a canvas read as ``cells`` [(digit or EMPTY, colour index or -1) for left, right] meet ``spec``?"""
    digits = [d for d, _ in cells if d != EMPTY]
    objects = [(d, COLOR_NAMES[c] if c >= 0 else "") for d, c in cells if d != EMPTY]
    if spec.task == "single":
        return digits == [spec.a]
    if spec.task == "colors":
        return objects == [(spec.a, spec.c)]
    if spec.task == "counting":
        return digits == [spec.a] * spec.n
    if spec.task == "two":
        return sorted(digits) == sorted([spec.a, spec.b])
    if spec.task == "position":
        return cells[0][0] == spec.a and cells[1][0] == spec.b
    if spec.task == "color_attr":
        return sorted(objects) == sorted([(spec.a, spec.c), (spec.b, spec.c2)])
    raise ValueError(f"unknown task '{spec.task}'")


def _colour(g: torch.Generator, digit: int, train: bool, exclude: str = "") -> str:
    """A random colour for ``digit``; in training, never a held-out pair."""
    while True:
        c = COLOR_NAMES[int(torch.randint(len(COLOR_NAMES), (1,), generator=g))]
        if c != exclude and not (train and (digit, c) in HELD_OUT_PAIRS):
            return c


def draw_prompt(g: torch.Generator, train: bool = True, task: str | None = None) -> PromptSpec:
    """A random prompt: training prompts use the training phrasings and no held-out pair."""
    randint = lambda n: int(torch.randint(n, (1,), generator=g))  # noqa: E731
    task = task or TASKS[randint(len(TASKS))]
    phrasing = randint(len(TEMPLATES[task]) - 1) if train else randint(len(TEMPLATES[task]))
    a = randint(10)
    b = (a + 1 + randint(9)) % 10  # a different digit
    if task in ("single", "two", "position"):
        spec = PromptSpec(task, a, b if task != "single" else -1, phrasing=phrasing)
    elif task == "counting":
        spec = PromptSpec(task, a, n=1 + randint(2), phrasing=phrasing)
    elif task == "colors":
        spec = PromptSpec(task, a, c=_colour(g, a, train), phrasing=phrasing)
    else:
        c = _colour(g, a, train)
        spec = PromptSpec(task, a, b, c=c, c2=_colour(g, b, train, exclude=c), phrasing=phrasing)
    return PromptSpec(**{**spec.__dict__, "caption": caption_of(spec)})


def layout_for(spec: PromptSpec, g: torch.Generator, train: bool = True) -> list[tuple[int, int]]:
    """A random cell layout [(digit or EMPTY, colour index or -1)] * 2 that meets ``spec``."""
    randint = lambda n: int(torch.randint(n, (1,), generator=g))  # noqa: E731
    cid = COLOR_NAMES.index

    def obj(d: int, c: str = "") -> tuple[int, int]:
        return d, cid(c or _colour(g, d, train))

    if spec.task in ("single", "colors") or (spec.task == "counting" and spec.n == 1):
        cells = [obj(spec.a, spec.c), (EMPTY, -1)]
        return cells if randint(2) else cells[::-1]
    if spec.task == "counting":
        return [obj(spec.a), obj(spec.a)]
    if spec.task == "position":
        return [obj(spec.a), obj(spec.b)]
    cells = [obj(spec.a, spec.c), obj(spec.b, spec.c2)]
    return cells if randint(2) else cells[::-1]


def digit_pools(labels: Tensor) -> list[Tensor]:
    """Indices of each digit 0..9 in ``labels``."""
    return [(labels == d).nonzero().squeeze(1) for d in range(10)]


def render(cells: list[tuple[int, int]], digits: Tensor, pools: list[Tensor], g: torch.Generator) -> Tensor:
    """A uint8 canvas (3, 28, 56): each non-empty cell a random image of its digit from ``digits``
    (M, 1, 28, 28) uint8 (``pools[d]``: the indices of digit d), tinted with its colour."""
    out = torch.zeros(3, 28, 56)
    for i, (d, c) in enumerate(cells):
        if d == EMPTY:
            continue
        pool = pools[d]
        img = digits[pool[int(torch.randint(len(pool), (1,), generator=g))]].float()[0] / 255.0
        out[:, :, 28 * i:28 * (i + 1)] = img[None] * torch.tensor(COLORS[COLOR_NAMES[c]])[:, None, None]
    return (out * 255).round().to(torch.uint8)


def make_canvases(n: int, digits: Tensor, labels: Tensor, seed: int = 0, train: bool = True,
                  task: str | None = None) -> tuple[Tensor, list[PromptSpec], Tensor]:
    """n canvases with prompts: (uint8 images (n, 3, 28, 56), specs, cells (n, 2, 2) int)."""
    g = torch.Generator().manual_seed(seed)
    pools = digit_pools(labels)
    images, specs, cells = [], [], []
    for _ in range(n):
        spec = draw_prompt(g, train=train, task=task)
        layout = layout_for(spec, g, train=train)
        images.append(render(layout, digits, pools, g))
        specs.append(spec)
        cells.append(layout)
    return torch.stack(images), specs, torch.tensor(cells, dtype=torch.long)


__all__ = ["COLORS", "COLOR_NAMES", "EMPTY", "TASKS", "TEMPLATES", "HELD_OUT_PAIRS", "PromptSpec", "caption_of",
           "meets", "draw_prompt", "layout_for", "digit_pools", "render", "make_canvases"]
