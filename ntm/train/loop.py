"""The one fit loop, serving ``train``, ``finetune`` and ``distill``: AdamW with optimiser groups,
warmup + cosine LR, gradient clipping, EMA, a non-finite guard, atomic checkpoints, exact resume,
SIGTERM/SIGINT stop, and DDP/FSDP2 under ``torchrun``.

Randomness is drawn from two explicit generators (data stream and objective noise) whose states are
checkpointed with the weights, optimiser, LR schedule and EMA, so a resumed run continues the same
sequence of batches. Under ``torchrun`` each of the W processes trains on its 1/W share of every
global batch (same data and noise on all ranks, sliced by rank) and rank 0 alone logs and
checkpoints, so the result matches one process with the whole batch.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from tqdm import tqdm

from ..config import TrainConfig
from ..data import to_tokens
from ..errors import CheckpointError, ConfigError
from ..io import latest_checkpoint, load_state, write_text
from ..nn import Layer
from .checkpoint import save_checkpoint

PRETRAINED_PREFIX = "predictor.velocity."  # the weights a finetune copies from its teacher


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW with weight decay on matrices only, and warmup + cosine decay to ``cfg.min_lr``.

    In a finetune (``cfg.finetune``) with ``pretrained_lr_scale != 1``, the weights copied from the
    teacher (``predictor.velocity.*``) get ``lr * pretrained_lr_scale`` and the parts that start
    fresh (transporter, scale head) get ``lr``; a scale of 0 leaves them out of the optimiser.
    """
    scale = cfg.finetune.pretrained_lr_scale if cfg.finetune is not None else 1.0
    split = scale != 1.0
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = p.dim() >= 2 and "pos" not in name and "start" not in name
        pretrained = split and name.startswith(PRETRAINED_PREFIX)
        if pretrained and scale == 0:  # frozen: never updated
            continue
        groups.setdefault((pretrained, decays), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": cfg.weight_decay if decays else 0.0,
                              "lr": cfg.lr * (scale if pretrained else 1.0)}
                             for (pretrained, decays), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))],
                            lr=cfg.lr, betas=cfg.betas)
    if cfg.warmup == 0:
        return opt, CosineAnnealingLR(opt, T_max=max(1, cfg.steps), eta_min=cfg.min_lr)
    warmup = max(1, min(cfg.warmup, cfg.steps - 1)) if cfg.steps > 1 else 1
    sched = SequentialLR(opt, [LinearLR(opt, start_factor=cfg.warmup_start_factor, total_iters=warmup),
                               CosineAnnealingLR(opt, T_max=max(1, cfg.steps - warmup), eta_min=cfg.min_lr)],
                         milestones=[warmup])
    return opt, sched


class EMA:
    """Exponential moving average of a model's parameters, with warm-up:

        ema <- d_n ema + (1 - d_n) p,    d_n = min(decay, (1 + n) / (warmup + n)),  n = updates so far,

    so short runs are not dominated by the initial weights (decay 0: the weights themselves). Kept as
    plain tensors shadowing ``model.parameters()`` so it works unchanged on FSDP2-sharded (DTensor)
    parameters, where ``torch.optim.swa_utils.AveragedModel``'s deep copy does not.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: int = 10):
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().clone() for p in model.parameters()]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (self.warmup + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        torch._foreach_lerp_(self.shadow, [p.detach() for p in model.parameters()], 1.0 - d)
        self.updates += 1

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU copies (a collective under FSDP: call on every rank)."""
        out = {}
        for name, t in zip(self.names, self.shadow):
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[name] = full.detach().cpu()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, (name, t) in enumerate(zip(self.names, self.shadow)):
            full = state[name].to(device=t.device, dtype=t.dtype)
            if hasattr(t, "device_mesh"):
                full = distribute_tensor(full, t.device_mesh, t.placements)
            self.shadow[i] = full.clone()


class StopFlag:
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


class Distributed:
    """Process-group facts for ``torchrun`` (DDP over gloo on CPU, NCCL on CUDA); trivial otherwise.
    A context manager: the process group it starts is closed on exit."""

    def __init__(self, device: torch.device | str | None = None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = self.world > 1
        self.owns_group = False
        if device is not None:
            self.device = torch.device(device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank if self.active else 0)
        else:
            self.device = torch.device("cpu")

    def __enter__(self) -> "Distributed":
        if self.active and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True
        return self

    def __exit__(self, *exc) -> None:
        if self.owns_group:
            dist.destroy_process_group()
            self.owns_group = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_true(self, flag: bool) -> bool:
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0.5)

    def any_true(self, flag: bool) -> bool:
        return not self.all_true(not flag)

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], device=self.device, dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def trim_log(path: Path, step: int) -> None:
    """Keep the records of ``path`` (JSON lines with a "step") up to ``step``; a half-written last
    line goes too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    write_text(path, "".join(f"{line}\n" for line in kept))


def wrap(objective: torch.nn.Module, cfg: TrainConfig, ctx: Distributed) -> torch.nn.Module:
    """The module the loss is called through: the objective under DDP or FSDP2 (every transformer
    layer of the trained model its own shard group, the rest in the objective's), optionally compiled."""
    net: torch.nn.Module = objective
    if ctx.active and cfg.fsdp:
        for module in objective.model.modules():
            if isinstance(module, Layer):
                fully_shard(module)
        fully_shard(objective)
    elif ctx.active:
        net = DistributedDataParallel(objective, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    return net


def fit(objective: torch.nn.Module, cfg: TrainConfig, source, out_dir: str | Path, *, fmt: str, config: dict,
        meta: dict | None = None, resume: bool = False, ctx: Distributed | None = None, progress: bool = True,
        batch_hook=None, desc: str = "train") -> dict:
    """Train ``objective.model`` by ``objective`` on batches of ``source`` into the run folder ``out_dir``.

    Checkpoints are artifacts of format ``fmt`` with model config ``config`` and extra ``meta``; with
    ``resume`` the run continues exactly from its latest checkpoint. ``batch_hook(step, x)`` may
    alter a raw batch (used by tests). Returns {"steps", "skipped", "seconds", "stopped",
    "steps_this_run", "final_loss"}.
    """
    if ctx is None:
        with Distributed(next(objective.model.parameters()).device) as own:
            return fit(objective, cfg, source, out_dir, fmt=fmt, config=config, meta=meta, resume=resume, ctx=own,
                       progress=progress, batch_hook=batch_hook, desc=desc)
    if cfg.batch_size % ctx.world:
        raise ConfigError(f"batch size {cfg.batch_size} is not divisible by the {ctx.world} processes")
    out_dir = Path(out_dir)
    model = objective.model
    local = cfg.batch_size // ctx.world
    lo, hi = ctx.rank * local, (ctx.rank + 1) * local
    device = ctx.device
    net = wrap(objective, cfg, ctx)
    opt, sched = make_optimizer(model, cfg)
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
    ema_names = set(ema.names)
    g_data = torch.Generator().manual_seed(cfg.seed + 1)
    g_noise = torch.Generator().manual_seed(cfg.seed + 2)  # CPU: the same stream on any device (trajectory.randn)
    step, skipped, elapsed = 0, 0, 0.0
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            raise CheckpointError(f"--resume: no checkpoint in {out_dir}")
        state = load_state(ckpt)
        try:
            set_model_state_dict(model, load_file(str(ckpt / "train.safetensors")), options=full)
            ema.load_full_state_dict(load_file(str(ckpt / "model.safetensors")))
            ema.updates = int(state.get("ema_updates", 0))
            set_optimizer_state_dict(model, opt, state["optimizer"], options=full)
            sched.load_state_dict(state["scheduler"])
            g_data.set_state(state["data_rng"])
            g_noise.set_state(state["noise_rng"])
            step, skipped, elapsed = int(state["step"]), int(state["skipped"]), float(state.get("elapsed", 0.0))
        except Exception as exc:  # a truncated or foreign file can fail in many ways; all mean "cannot resume"
            msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise CheckpointError(f"{ckpt}: cannot resume ({msg})") from None
    log_file = None
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume:  # the records a killed run wrote after its last checkpoint are logged again from there
            trim_log(out_dir / "metrics.jsonl", step)
        log_file = open(out_dir / "metrics.jsonl", "a")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)

    def checkpoint(at: int) -> None:
        # collectives first (every rank), then rank 0 writes
        weights = get_model_state_dict(model, options=full)
        # the averaged parameters, plus the model's persistent buffers (e.g. a text model's null prompt)
        averaged = {**{k: v for k, v in weights.items() if k not in ema_names}, **ema.full_state_dict()}
        optim_state = get_optimizer_state_dict(model, opt, options=full)
        if ctx.is_main:
            save_checkpoint(out_dir, at, fmt, config, cfg, weights, averaged, meta=meta, state={
                "optimizer": optim_state, "scheduler": sched.state_dict(), "data_rng": g_data.get_state(),
                "noise_rng": g_noise.get_state(), "step": at, "skipped": skipped, "elapsed": elapsed,
                "ema_updates": ema.updates, "world_size": ctx.world})
        ctx.barrier()

    if not resume:
        checkpoint(0)  # a run folder always holds a resumable checkpoint, even if killed at once
    net.train()
    start_step = step
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and ctx.is_main), desc=desc, dynamic_ncols=True)
    last_loss = math.nan
    t_start = time.perf_counter() - elapsed
    with StopFlag() as stop:
        while step < cfg.steps:
            x, y = source.sample(cfg.batch_size, g_data)
            noise = objective.draw_noise(cfg.batch_size, g_noise, device)
            if batch_hook is not None:
                x = batch_hook(step, x)
            x0 = to_tokens(x[lo:hi], objective.spec).to(device)
            y = None if y is None else y[lo:hi].to(device)
            with autocast:
                loss, parts = net(x0, y, noise.shard(lo, hi), step / cfg.steps)
            opt.zero_grad(set_to_none=True)
            ok = ctx.all_true(bool(torch.isfinite(loss)))
            if ok:
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                ok = ctx.all_true(bool(torch.isfinite(grad_norm)))
            if ok:
                opt.step()
                ema.update(model)
                last_loss = ctx.mean(float(loss.detach()))
            else:
                skipped += 1
                opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            elapsed = time.perf_counter() - t_start
            if log_file is not None and (step % cfg.log_every == 0 or step == cfg.steps):
                rec = {"step": step, "loss": last_loss, "lr": sched.get_last_lr()[0], "skipped": skipped,
                       "seconds": round(elapsed, 2), **parts}
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                bar.set_postfix(loss=f"{last_loss:.4f}", skipped=skipped)
            bar.update(1)
            stopping = ctx.any_true(stop.requested)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
                checkpoint(step)
            if stopping:
                break
    bar.close()
    if log_file is not None:
        log_file.close()
    return {"steps": step, "skipped": skipped, "seconds": elapsed, "stopped": step < cfg.steps,
            "steps_this_run": step - start_step, "final_loss": last_loss}
