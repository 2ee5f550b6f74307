"""The training loop: AdamW, warmup + cosine LR, gradient clipping, EMA, a non-finite guard,
atomic checkpoints and exact resume.

Randomness is drawn from two explicit generators (data stream and trajectory noise) whose states are
checkpointed with the model, optimiser, LR schedule and EMA, so a resumed run continues the same
sequence of batches.
"""
from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from .checkpoint import load_into, load_training, save_checkpoint
from .config import ModelConfig, TrainConfig
from .data import DataSource, to_tokens
from .errors import ConfigError
from .model import NTM


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "pos" not in name and "start" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    warmup = max(1, min(cfg.warmup, cfg.steps - 1)) if cfg.steps > 1 else 1
    sched = SequentialLR(opt, [LinearLR(opt, start_factor=1e-3, total_iters=warmup),
                               CosineAnnealingLR(opt, T_max=max(1, cfg.steps - warmup), eta_min=cfg.min_lr)],
                         milestones=[warmup])
    return opt, sched


class _StopFlag:
    """Turns SIGTERM/SIGINT into a request to checkpoint and stop at the next step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(model_config: ModelConfig | None, train_config: TrainConfig | None, source: DataSource,
          out_dir: str | Path, resume: bool = False, progress: bool = True,
          device: torch.device | str | None = None, batch_hook=None) -> dict:
    """Train an NTM into ``out_dir``; returns a summary dict.

    With ``resume`` the configs stored in the run's last checkpoint are used (a ``train_config``
    passed here may only repeat the same number of steps) and training continues exactly where the
    checkpoint left off. ``batch_hook(step, x)`` may alter a raw batch (used by tests).
    """
    out_dir = Path(out_dir)
    device = torch.device(device) if device is not None else default_device()
    state = None
    if resume:
        ckpt, meta, model_config, cfg, state = load_training(out_dir)
        if train_config is not None and train_config.steps != cfg.steps:
            raise ConfigError(f"this run was configured for {cfg.steps} steps; resume continues to that "
                              f"(start a new run to train for {train_config.steps})")
        if tuple(source.spec().shape) != tuple(model_config.data.shape):
            raise ConfigError(f"the run was trained on samples of shape {model_config.data.shape}, "
                              f"the data have {source.spec().shape}")
    else:
        if model_config is None or train_config is None:
            raise ConfigError("a new run needs a model and a training config")
        cfg = train_config
    if cfg.mode not in ("e2e", "pairwise"):
        raise ConfigError(f"unknown training mode '{cfg.mode}' (use 'e2e' or 'pairwise')")
    torch.manual_seed(cfg.seed)
    model = NTM(model_config).to(device)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    opt, sched = make_optimizer(model, cfg)
    g_data = torch.Generator().manual_seed(cfg.seed + 1)
    g_noise = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    step, skipped, elapsed = 0, 0, 0.0
    if state is not None:
        load_into(model, ckpt / "train.safetensors")
        load_into(ema.module, ckpt / "model.safetensors")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        g_data.set_state(state["data_rng"])
        g_noise.set_state(state["noise_rng"])
        ema.n_averaged.fill_(state["ema_n_averaged"])
        step, skipped, elapsed = state["step"], state["skipped"], state.get("elapsed", 0.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / "metrics.jsonl", "a")
    spec = model_config.data
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def checkpoint(at: int) -> None:
        save_checkpoint(out_dir, at, model, ema.module, model_config, cfg, {
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "data_rng": g_data.get_state(),
            "noise_rng": g_noise.get_state(), "ema_n_averaged": int(ema.n_averaged), "step": at,
            "skipped": skipped, "elapsed": elapsed})

    model.train()
    start_step = step
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
    last_loss = math.nan
    t_start = time.perf_counter() - elapsed
    with _StopFlag() as stop:
        while step < cfg.steps:
            x, y = source.sample(cfg.batch_size, g_data)
            if batch_hook is not None:
                x = batch_hook(step, x)
            x0 = to_tokens(x, spec).to(device)
            y = None if y is None else y.to(device)
            with autocast:
                loss = model.loss(x0, y, mode=cfg.mode, generator=g_noise)
            opt.zero_grad(set_to_none=True)
            ok = bool(torch.isfinite(loss))
            if ok:
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                ok = bool(torch.isfinite(grad_norm))
            if ok:
                opt.step()
                ema.update_parameters(model)
                last_loss = float(loss.detach())
            else:
                skipped += 1
                opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            elapsed = time.perf_counter() - t_start
            if step % cfg.log_every == 0 or step == cfg.steps:
                rec = {"step": step, "loss": last_loss, "lr": sched.get_last_lr()[0], "skipped": skipped,
                       "seconds": round(elapsed, 2)}
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                bar.set_postfix(loss=f"{last_loss:.4f}", skipped=skipped)
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop.requested:
                checkpoint(step)
            if stop.requested:
                break
    bar.close()
    log_file.close()
    return {"steps": step, "skipped": skipped, "seconds": elapsed, "stopped": step < cfg.steps,
            "steps_this_run": step - start_step, "final_loss": last_loss}
