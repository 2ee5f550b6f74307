"""Pictures (matplotlib, no display needed): 2-D samples beside the data they imitate, image grids,
and training curves. Every figure is written atomically."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import torch

from ..data import TOY_NAMES, sample_toy
from ..io import atomic_path

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)


def save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    """Write the figure atomically (temporary file, then rename) and close it; the folder is made if
    missing (a bench's pictures folder may not exist yet, e.g. the OOD bench without its Glow runs)."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


def scatter_with_data(samples: np.ndarray, data_name: str, path: str | Path, title: str = "samples",
                      n_data: int = 5000) -> None:
    """Write a PNG: the data (if ``data_name`` is a toy) on the left, the samples on the right."""
    panels = []
    if data_name in TOY_NAMES:
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
    save_figure(fig, path, dpi=110)


def image_grid(images: np.ndarray, path: str | Path, title: str = "samples", ncol: int = 10, max_rows: int = 10) -> None:
    """Write a PNG grid of images (n, C, H, W) with values in [-1, 1]: ``ncol`` a row, at most ``max_rows`` rows."""
    n = min(len(images), ncol * max_rows)
    rows = max(1, math.ceil(n / ncol))
    imgs = np.clip((images[:n] + 1) / 2, 0, 1)
    fig, axes = plt.subplots(rows, ncol, figsize=(ncol * 0.9, rows * 0.9 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = imgs[i].transpose(1, 2, 0)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img[..., :3], cmap="gray", vmin=0, vmax=1)
    fig.suptitle(title)
    save_figure(fig, path, dpi=100)


def read_log(run_dir: str | Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def loss_curves(runs: dict[str, Path], path: str | Path) -> None:
    """One panel per run: its logged training loss against the step."""
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.4), squeeze=False)
    for ax, (label, run) in zip(axes[0], runs.items()):
        recs = read_log(run)
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("NLL, nats/dim" if label.startswith("ntm") else "velocity MSE / dim")
        ax.set_title(f"{label} training loss")
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def smoothed_curves(runs: dict[str, Path], path: str | Path, key: str = "nll", xlabel: str = "step",
                    ylabel: str = "NLL part of the loss, nats/dim", window: int = 8) -> None:
    """The logged ``key`` of several runs on one axis, raw and as a running mean over ``window`` logs."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (label, run) in enumerate(runs.items()):
        color = f"C{i}"
        recs = read_log(run)
        steps = np.array([r["step"] for r in recs])
        values = np.array([r.get(key, r["loss"]) for r in recs])
        ax.plot(steps, values, lw=0.6, alpha=0.35, color=color)
        k = min(window, len(values))
        smooth = np.convolve(values, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.5, color=color, label=f"{label}, mean of {k} logs")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def line_plot(series: dict[str, tuple[list, list]], path: str | Path, xlabel: str, ylabel: str, title: str = "",
              log_x: bool = False, errors: dict[str, list] | None = None) -> None:
    """One line per series {label: (x, y)} with optional error bars {label: half-widths}."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, (xs, ys) in series.items():
        err = (errors or {}).get(label)
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, lw=1.5, capsize=3, label=label)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)
