"""A standard multi-scale image flow (Glow, Kingma & Dhariwal 2018) built from ``normflows``, the
peer that ``ntm bench ood`` scores beside NTM and FM.

The flow maps an image in [-1, 1) (uniformly dequantised, as NTM and FM see it) to Gaussian latents
at ``levels`` scales, with ``blocks`` Glow steps (actnorm, invertible 1x1 convolution, affine
coupling) per scale; ``log_prob`` is exact, in nats per image, in the same units as NTM's bounds
(so ``ntm.likelihood.bits_per_dim`` applies). It needs the optional dependency ``normflows``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import normflows as nf
import torch
from torch import Tensor
from tqdm import tqdm

from ..errors import CheckpointError
from ..io import load_into, read_meta, write_artifact

GLOW_FORMAT = "ntm-glow"


@dataclass(frozen=True)
class GlowConfig:
    """Image shape (C, H, W) with H and W divisible by 2**levels; the flow's size; its training."""

    shape: tuple[int, int, int] = (1, 28, 28)
    levels: int = 2
    blocks: int = 8
    hidden: int = 64
    steps: int = 8000
    batch_size: int = 64
    lr: float = 5e-4
    grad_clip: float = 1.0
    seed: int = 0


def build_glow(cfg: GlowConfig) -> nf.MultiscaleFlow:
    """An unconditional Glow on images of ``cfg.shape``: level 0 is the coarsest scale."""
    C, H, W = cfg.shape
    L = cfg.levels
    if H % 2**L or W % 2**L:
        raise ValueError(f"image sides {H}x{W} must be divisible by 2**levels = {2**L}")
    q0, flows, merges = [], [], []
    for i in range(L):
        width = C * 2 ** (L + 1 - i)  # channels the Glow steps of this level see
        flows.append([nf.flows.GlowBlock(width, cfg.hidden, split_mode="channel", scale=True)
                      for _ in range(cfg.blocks)] + [nf.flows.Squeeze()])
        if i == 0:
            latent = (C * 2 ** (L + 1), H // 2**L, W // 2**L)
        else:
            merges.append(nf.flows.Merge())
            latent = (C * 2 ** (L - i), H // 2 ** (L - i), W // 2 ** (L - i))
        q0.append(nf.distributions.GlowBase(latent))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def train_glow(cfg: GlowConfig, source, progress: bool = True) -> nf.MultiscaleFlow:
    """Maximum likelihood on ``source.sample`` batches (dequantised images in [-1, 1)): Adam with a
    cosine schedule and gradient clipping; non-finite losses skip the step."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    flow = build_glow(cfg)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    flow.train()
    bar = tqdm(range(cfg.steps), desc="glow", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        x, _ = source.sample(cfg.batch_size, g)
        loss = flow.forward_kld(x)
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), cfg.grad_clip)
            opt.step()
        sched.step()
        bar.set_postfix(nll=f"{float(loss.detach()):.1f}", refresh=False)
    return flow.eval()


def save_glow(flow: nf.MultiscaleFlow, cfg: GlowConfig, folder: str | Path, meta: dict | None = None) -> Path:
    """Write the Glow and its config to ``folder`` (safetensors + JSON, readable by ``load_glow``)."""
    return write_artifact(folder, GLOW_FORMAT, asdict(cfg), {"model": flow.state_dict()}, meta=meta)


def load_glow(folder: str | Path) -> tuple[nf.MultiscaleFlow, GlowConfig, dict]:
    """A saved Glow, its config and the artifact's meta (``CheckpointError`` when unreadable)."""
    meta = read_meta(folder, (GLOW_FORMAT,))
    try:
        raw = meta["config"]
        cfg = GlowConfig(**{**raw, "shape": tuple(raw["shape"])})
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder}: not a Glow config ({exc})") from None
    flow = build_glow(cfg)
    with torch.no_grad():  # actnorm layers are initialised on their first batch; mark them done
        flow.log_prob(torch.zeros(2, *cfg.shape), None)
    load_into(flow, Path(folder) / "model.safetensors")
    return flow.eval(), cfg, meta


@torch.no_grad()
def glow_nll(flow: nf.MultiscaleFlow, x: Tensor, batch_size: int = 500) -> Tensor:
    """-log p(x) in nats per image (B,) of images x (B, C, H, W) in [-1, 1)."""
    flow.eval()
    return torch.cat([-flow.log_prob(x[lo:lo + batch_size].float(), None) for lo in range(0, x.shape[0], batch_size)])


def glow_or_train(folder: str | Path, cfg: GlowConfig, source, progress: bool = True) -> tuple[nf.MultiscaleFlow, dict]:
    """The Glow saved in ``folder`` when its config equals ``cfg``, else one trained now and saved
    there (with its training seconds in the meta). -> (flow, meta)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        try:
            flow, saved, meta = load_glow(folder)
            if saved == cfg:
                return flow, meta
        except CheckpointError:
            pass  # unreadable or another config: train afresh and replace it
    start = time.perf_counter()
    flow = train_glow(cfg, source, progress=progress)
    meta = {"train_seconds": time.perf_counter() - start, "data": getattr(source, "name", "")}
    save_glow(flow, cfg, folder, meta=meta)
    return flow, read_meta(folder, (GLOW_FORMAT,))
