"""Pictures: 2-D samples beside the data they imitate (matplotlib, no display needed)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _save(fig, path: str | Path, dpi: int) -> None:
    """Write the figure atomically (temporary file, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)


def scatter_with_data(samples: np.ndarray, data_name: str, path: str | Path, title: str = "samples",
                      n_data: int = 5000) -> None:
    """Write a PNG: the data (if ``data_name`` is a toy) on the left, the samples on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import TOY_NAMES, sample_toy

    panels = []
    if data_name in TOY_NAMES:
        import torch
        panels.append((sample_toy(data_name, n_data, torch.Generator().manual_seed(99)).numpy(), f"data: {data_name}"))
    panels.append((samples, title))
    lim = np.percentile(np.abs(np.concatenate([p[0] for p in panels])), 99.5) * 1.1
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (pts, label) in zip(axes[0], panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, color="k", linewidths=0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(label)
    _save(fig, path, dpi=110)


def image_grid(images: np.ndarray, path: str | Path, title: str = "samples", ncol: int = 10) -> None:
    """Write a PNG grid of images (n, C, H, W) with values in [-1, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(images), ncol * 10)
    rows = max(1, math.ceil(n / ncol))
    imgs = np.clip((images[:n] + 1) / 2, 0, 1)
    fig, axes = plt.subplots(rows, ncol, figsize=(ncol * 0.9, rows * 0.9 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = imgs[i].transpose(1, 2, 0)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img[..., :3], cmap="gray", vmin=0, vmax=1)
    fig.suptitle(title)
    _save(fig, path, dpi=100)
