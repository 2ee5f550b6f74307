"""The training loop: AdamW, warmup + cosine LR, gradient clipping, EMA, a non-finite guard,
atomic checkpoints and exact resume.

Randomness is drawn from two explicit generators (data stream and trajectory noise) whose states are
checkpointed with the model, optimiser, LR schedule and EMA, so a resumed run continues the same
sequence of batches.
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
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from safetensors.torch import load_file
from tqdm import tqdm

from .checkpoint import build_model, load_training, save_checkpoint
from .config import ModelConfig, TrainConfig
from .data import DataSource, to_tokens
from .errors import CheckpointError, ConfigError
from .nn import Layer


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW with weight decay on matrices only, and warmup + cosine decay to ``cfg.min_lr``.

    When finetuning (``cfg.teacher`` set) with ``cfg.pretrained_lr_scale != 1``, the weights copied
    from the teacher (``predictor.velocity.*``) get ``lr * pretrained_lr_scale`` and the parts that
    start fresh (transporter, scale head) get ``lr``; a scale of 0 freezes them.
    """
    split = cfg.teacher is not None and cfg.pretrained_lr_scale != 1.0
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = p.dim() >= 2 and "pos" not in name and "start" not in name
        pretrained = split and name.startswith("predictor.velocity.")
        if pretrained and cfg.pretrained_lr_scale == 0:  # frozen: never updated
            continue
        groups.setdefault((pretrained, decays), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": cfg.weight_decay if decays else 0.0,
                              "lr": cfg.lr * (cfg.pretrained_lr_scale if pretrained else 1.0)}
                             for (pretrained, decays), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))],
                            lr=cfg.lr, betas=cfg.betas)
    warmup = max(1, min(cfg.warmup, cfg.steps - 1)) if cfg.steps > 1 else 1
    sched = SequentialLR(opt, [LinearLR(opt, start_factor=1e-3, total_iters=warmup),
                               CosineAnnealingLR(opt, T_max=max(1, cfg.steps - warmup), eta_min=cfg.min_lr)],
                         milestones=[warmup])
    return opt, sched


class EMA:
    """Exponential moving average of a model's parameters, with warm-up:

        ema <- d_n ema + (1 - d_n) p,    d_n = min(decay, (1 + n) / (10 + n)),  n = updates so far,

    so short runs are not dominated by the initial weights. Kept as plain tensors shadowing
    ``model.parameters()`` so it works unchanged on FSDP2-sharded (DTensor) parameters, where
    ``torch.optim.swa_utils.AveragedModel``'s deep copy does not.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().clone() for p in model.parameters()]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

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
                from torch.distributed.tensor import distribute_tensor
                full = distribute_tensor(full, t.device_mesh, t.placements)
            self.shadow[i] = full.clone()


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


class _Dist:
    """Process-group facts for ``torchrun`` (DDP over gloo on CPU, NCCL on CUDA); trivial otherwise."""

    def __init__(self, device: torch.device | str | None):
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
        if self.active and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True

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

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def _check_same_data(saved, now) -> None:
    """Refuse to resume a run on different data (name, layout or standardisation)."""
    from .data import TOY_NAMES

    same = (saved.name == now.name and saved.kind == now.kind and tuple(saved.shape) == tuple(now.shape)
            and saved.num_classes == now.num_classes)
    if same and now.name not in TOY_NAMES:  # a user's file: its statistics identify it (toys: the name does)
        same = all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(saved.mean + saved.std, now.mean + now.std))
    if not same:
        raise ConfigError(f"the run was trained on '{saved.name}' {tuple(saved.shape)}; the data given are "
                          f"'{now.name}' {tuple(now.shape)} with other statistics or labels")


def _wrap(model: torch.nn.Module, cfg: TrainConfig, ctx: _Dist) -> torch.nn.Module:
    """The module the loss is called through: DDP or FSDP2 under torchrun, optionally compiled."""
    net: torch.nn.Module = model
    if ctx.active and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if isinstance(module, Layer):
                fully_shard(module)
        fully_shard(model)
    elif ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    return net


def train(model_config: ModelConfig | None, train_config: TrainConfig | None, source: DataSource,
          out_dir: str | Path, resume: bool = False, progress: bool = True,
          device: torch.device | str | None = None, batch_hook=None, init_from_teacher: bool = False) -> dict:
    """Train an NTM into ``out_dir``; returns a summary dict.

    Under ``torchrun`` each of the W processes trains on its 1/W share of every global batch (same
    data and noise stream on all ranks, sliced by rank) and rank 0 alone logs and checkpoints, so the
    result matches one process with the whole batch. With ``resume`` the configs stored in the run's
    last checkpoint are used (a ``train_config`` passed here may only repeat the same number of steps)
    and training continues exactly where the checkpoint left off. ``batch_hook(step, x)`` may alter a
    raw batch (used by tests). A config with a ``teacher`` (finetuning, ``ntm.finetune``) attaches the
    frozen FM teacher for the mean-alignment loss; ``init_from_teacher`` starts a new run's predictor
    from the teacher's velocity network.
    """
    out_dir = Path(out_dir)
    state = None
    if resume:
        ckpt, meta, model_config, cfg, state = load_training(out_dir)
        if train_config is not None and train_config.steps != cfg.steps:
            raise ConfigError(f"this run was configured for {cfg.steps} steps; resume continues to that "
                              f"(start a new run to train for {train_config.steps})")
        _check_same_data(model_config.data, source.spec())
    else:
        if model_config is None or train_config is None:
            raise ConfigError("a new run needs a model and a training config")
        cfg = train_config
    if cfg.mode not in ("e2e", "pairwise"):
        raise ConfigError(f"unknown training mode '{cfg.mode}' (use 'e2e' or 'pairwise')")
    if not (0.0 <= cfg.pretrained_lr_scale < math.inf):
        raise ConfigError(f"pretrained_lr_scale must be a finite number >= 0, got {cfg.pretrained_lr_scale}")
    if cfg.pretrained_lr_scale != 1.0 and not cfg.teacher:
        raise ConfigError("pretrained_lr_scale applies to finetuning only (a run with a teacher)")
    ctx = _Dist(device)
    try:
        return _train_loop(model_config, cfg, source, out_dir, state, ckpt if resume else None, ctx,
                           progress and ctx.is_main, batch_hook, init_from_teacher and not resume)
    finally:
        ctx.close()


def _train_loop(model_config: ModelConfig, cfg: TrainConfig, source: DataSource, out_dir: Path, state, ckpt,
                ctx: _Dist, progress: bool, batch_hook, init_from_teacher: bool = False) -> dict:
    if cfg.batch_size % ctx.world:
        raise ConfigError(f"batch size {cfg.batch_size} is not divisible by the {ctx.world} processes")
    local = cfg.batch_size // ctx.world
    lo, hi = ctx.rank * local, (ctx.rank + 1) * local
    device = ctx.device
    torch.manual_seed(cfg.seed)
    model = build_model(model_config).to(device)
    if cfg.teacher:
        from .finetune import initial_weights, load_teacher
        teacher = load_teacher(cfg.teacher, device)
        if init_from_teacher:
            model.load_state_dict(initial_weights(model, teacher))
        model.set_teacher(teacher)
        if cfg.pretrained_lr_scale == 0:  # frozen backbone: no gradients, so clipping sees only the trained parts
            model.predictor.velocity.requires_grad_(False)
    net = _wrap(model, cfg, ctx)
    opt, sched = make_optimizer(model, cfg)
    ema = EMA(model, cfg.ema_decay)
    g_data = torch.Generator().manual_seed(cfg.seed + 1)
    g_noise = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    step, skipped, elapsed = 0, 0, 0.0
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if state is not None:
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
        log_file = open(out_dir / "metrics.jsonl", "a")
    spec = model_config.data
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)

    def checkpoint(at: int) -> None:
        # collectives first (every rank), then rank 0 writes
        weights = get_model_state_dict(model, options=full)
        averaged = ema.full_state_dict()
        optim_state = get_optimizer_state_dict(model, opt, options=full)
        if ctx.is_main:
            save_checkpoint(out_dir, at, weights, averaged, model_config, cfg, {
                "optimizer": optim_state, "scheduler": sched.state_dict(), "data_rng": g_data.get_state(),
                "noise_rng": g_noise.get_state(), "step": at, "skipped": skipped, "elapsed": elapsed,
                "ema_updates": ema.updates, "world_size": ctx.world})
        ctx.barrier()

    if state is None:
        checkpoint(0)  # a run folder always holds a resumable checkpoint, even if killed at once
    net.train()
    start_step = step
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
    last_loss = math.nan
    t_start = time.perf_counter() - elapsed
    with _StopFlag() as stop:
        while step < cfg.steps:
            x, y = source.sample(cfg.batch_size, g_data)
            noise = model.draw_training_noise(cfg.batch_size, g_noise, device)
            if batch_hook is not None:
                x = batch_hook(step, x)
            x0 = to_tokens(x[lo:hi], spec).to(device)
            y = None if y is None else y[lo:hi].to(device)
            if cfg.teacher:
                from .finetune import aux_weight_at
                model.aux_weight_now = aux_weight_at(step / cfg.steps, cfg.aux_weight)
            with autocast:
                loss = net(x0, y, noise.shard(lo, hi), cfg.mode)
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
                       "seconds": round(elapsed, 2), **getattr(model, "last_parts", {})}
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
