"""``ntm bench mnist|fashion``: NTM (T = 4) against the flow-matching baseline on the same backbone.

Both models are trained with the same preset (backbone, optimiser, batch, step budget) on the same
data stream; then every row draws ``n_samples`` class-conditional samples (labels 0..K-1 in turn, with
guidance ``guidance``: the product rule for NTM, linear CFG on the velocity for FM) and is scored in
the feature space of the project's own classifier (see :mod:`ntm.metrics`) against the same number
of test images. Rows: NTM at 4 and 8 steps (decode "inverse": one transporter inverse), FM Euler at
4, 8 and 50 steps and Heun at 4. Bits/dim: NTM's ELBO bound of -log p(x | y) on test images; FM's
ODE estimate (Hutchinson, one probe) on a smaller subset.

Output: ``results/<data>[-quick].json`` ({"rows", "config"}), a markdown table beside it, and a
folder ``results/<data>[-quick]/`` with sample grids and training curves (runs in its ``runs/``).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .benchmarks import BenchStopped, _same_run, _train_or_reuse, _write_json
from .checkpoint import build_model, load_model, read_meta, resolve
from .config import PRESETS, ModelConfig, model_config_from_dict
from .errors import CheckpointError, ConfigError
from .flow_matching import network_evaluations
from .images import bits_per_dim, open_image_source
from .likelihood import nll_bounds
from .metrics import classifier_accuracy, image_quality, load_or_train_classifier

NTM_STEPS = (4, 8)
FM_ROWS = (("euler", 4), ("euler", 8), ("euler", 50), ("heun", 4))


def bench_settings(quick: bool, overrides: dict | None = None, n_samples: int | None = None) -> dict:
    """Sample counts and budgets of the full or the quick bench, with ``overrides`` applied."""
    settings = {**_base_settings(quick), **(overrides or {})}
    if n_samples is not None:
        settings["n_samples"] = n_samples
    return settings


def _labelled_source(data: str):
    """The image source of a bench and its spec; the benches need class labels."""
    src = open_image_source(data, patch=4)
    spec = src.spec()
    if spec.num_classes == 0:
        raise ConfigError(f"the image bench needs class labels; '{data}' has none")
    return src, spec


def _base_settings(quick: bool) -> dict:
    if quick:
        return {"preset": "mnist-quick", "n_samples": 1000, "n_bpd": 200, "n_bpd_fm": 32, "bpd_trajectories": 2,
                "fm_ode_steps": 16}
    return {"preset": "mnist", "n_samples": 2000, "n_bpd": 1000, "n_bpd_fm": 200, "bpd_trajectories": 4,
            "fm_ode_steps": 32}


def _timed_samples(sample_fn, n: int, num_classes: int, chunk: int = 500) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Draw n samples with labels 0..K-1 in turn, in chunks; returns (images, labels, seconds)."""
    labels = torch.arange(n) % num_classes
    out, seconds = [], 0.0
    for lo in range(0, n, chunk):
        g = torch.Generator().manual_seed(1000 + lo)
        t0 = time.perf_counter()
        out.append(sample_fn(labels[lo:lo + chunk], g).cpu())
        seconds += time.perf_counter() - t0
    return torch.cat(out).clamp(-1, 1), labels, seconds


def _curves(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import _save

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.4), squeeze=False)
    for ax, (label, run) in zip(axes[0], runs.items()):
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("NLL, nats/dim" if label == "ntm" else "velocity MSE / dim")
        ax.set_title(f"{label} training loss")
        ax.grid(alpha=0.3)
    _save(fig, path, dpi=100)


def run_image_bench(data: str = "mnist", out: str | Path | None = None, quick: bool = False,
                    steps: int | None = None, n_samples: int | None = None, guidance: float = 1.0,
                    progress: bool = True, classifier_steps: int = 3000, settings: dict | None = None,
                    distill_steps: int = 0) -> dict:
    """Train NTM and FM with the same budget on ``data`` and write the comparison (see module doc).

    With ``distill_steps`` > 0 the NTM run also gets a distilled denoiser (``ntm.denoising``) and the
    table gains NTM rows decoded by "inverse+score" and "denoiser", the denoiser's distance to the
    score-refined output, and a sequential-vs-Jacobi inverse timing. Rows already present in ``out``
    for the same configuration are reused, so a re-run after a stop loses no finished row.
    """
    settings = bench_settings(quick, settings, n_samples)
    tag = f"{data}-quick" if quick else data
    out = Path(out) if out else Path("results") / f"{tag}.json"
    folder = out.with_suffix("")
    src, spec = _labelled_source(data)
    p = PRESETS[settings["preset"]]
    train_cfg = p.train if steps is None else replace(p.train, steps=steps)
    base = ModelConfig(data=spec, trajectory=p.trajectory, transporter=p.transporter, predictor=p.predictor)
    classifier, clf_info = load_or_train_classifier(src, steps=classifier_steps, progress=progress)
    n = settings["n_samples"]
    real, _ = src.held_out(n, seed=4242)
    bpd_x, bpd_y = src.held_out(settings["n_bpd"], seed=4343)
    results = {"config": {"data": data, "quick": quick, "preset": settings["preset"], "train_steps": train_cfg.steps,
                          "batch_size": train_cfg.batch_size, "lr": train_cfg.lr, "ntm_mode": train_cfg.mode,
                          "T": p.trajectory.T, "guidance": guidance, "n_samples": n,
                          "n_bpd": settings["n_bpd"], "bpd_trajectories": settings["bpd_trajectories"],
                          "n_bpd_fm": settings["n_bpd_fm"], "fm_ode_steps": settings["fm_ode_steps"],
                          "classifier": {k: clf_info[k] for k in ("name", "steps", "test_accuracy")},
                          "torch_threads": torch.get_num_threads()},
               "rows": []}
    summaries, models, runs = {}, {}, {}
    for kind in ("ntm", "fm"):
        runs[kind] = folder / "runs" / kind
        summaries[kind] = _train_or_reuse(runs[kind], replace(base, kind=kind), train_cfg, src, progress)
    if distill_steps > 0:
        results["config"]["distill_steps"] = distill_steps
        den_meta = runs["ntm"] / "denoiser" / "config.json"
        if den_meta.is_file():  # the bench owns its runs: a denoiser of another length is redone
            old = json.loads(den_meta.read_text())
            if old.get("finished") and old.get("steps") != distill_steps:
                import shutil
                shutil.rmtree(runs["ntm"] / "denoiser")
        if not (den_meta.is_file() and json.loads(den_meta.read_text()).get("finished")):
            from .denoising import distill
            res = distill(runs["ntm"], src, steps=distill_steps, progress=progress)
            if res["stopped"]:
                raise BenchStopped("stopped during the distillation; run the same command again to resume")
        results["config"]["distill"] = json.loads(den_meta.read_text())
    for kind in ("ntm", "fm"):
        models[kind] = load_model(runs[kind])
    previous = _previous_rows(out, results["config"])
    step_cost = {k: summaries[k]["seconds"] / max(1, summaries[k]["steps"]) for k in summaries}
    results["config"]["seconds_per_step"] = step_cost
    results["config"]["ntm_fm_step_cost_ratio"] = step_cost["ntm"] / step_cost["fm"]
    results["config"]["step_cost_probe"] = step_cost_probe(base, train_cfg, src)
    folder.mkdir(parents=True, exist_ok=True)
    _curves(runs, folder / "training-curves.png")
    extractor = f"project classifier ({clf_info['name']}, 128-d features, test acc {clf_info['test_accuracy']:.4f})"

    ntm_bpd = ntm_bits_per_dim(models["ntm"], bpd_x, bpd_y, settings["bpd_trajectories"])
    m = settings["n_bpd_fm"]
    fm_bpd = fm_bits_per_dim(models["fm"], bpd_x[:m], bpd_y[:m], settings["fm_ode_steps"])
    fm_bpd_kind = f"ODE estimate ({settings['fm_ode_steps']} Heun steps, Hutchinson, n={m})"

    decoders = ("inverse", "inverse+score", "denoiser") if distill_steps > 0 else ("inverse",)
    jobs = [("ntm", d, None, p.trajectory.T) for d in decoders] + \
        [("ntm", "inverse", None, T) for T in NTM_STEPS if T != p.trajectory.T] + \
        [("fm", None, solver, k) for solver, k in FM_ROWS]
    if distill_steps > 0:
        results["config"]["inverse_timing"] = inverse_timing(models["ntm"], min(n, 500), spec.num_classes, guidance)
    refined = None
    for kind, decode, solver, k in jobs:
        key = (kind, k, decode, solver)
        if _reusable(previous, key, distill_steps):
            results["rows"].append(previous[key])
            continue
        row, images = evaluate_image_row(models[kind], k, guidance, real, classifier, extractor, solver=solver,
                                         decode=decode)
        row.update(bpd=ntm_bpd if kind == "ntm" else fm_bpd, bpd_kind="elbo bound" if kind == "ntm" else fm_bpd_kind,
                   train_seconds=summaries[kind]["seconds"], train_steps=summaries[kind]["steps"])
        if decode == "inverse+score":
            refined = images
        if decode == "denoiser" and refined is not None:  # same seeds: the same predictor trajectories
            row["rmse_to_score"] = float((images - refined).pow(2).mean().sqrt())
            with torch.no_grad():
                f_a, f_b = classifier.features(images), classifier.features(refined)
            row["feature_dist_to_score"] = float((f_a - f_b).norm(dim=1).mean() / f_b.norm(dim=1).mean())
        results["rows"].append(row)
        if decode == "denoiser":
            row["distill_steps"] = distill_steps
        _grid(images, folder, kind, k, solver, decode, guidance)
        _write_json(out, results, markdown_image_table(results))
    _write_json(out, results, markdown_image_table(results))  # also when every row was reused
    return results


def step_cost_probe(base: ModelConfig, train_cfg, src, steps: int = 12, warmup: int = 3) -> dict:
    """Seconds per training step (forward, backward, AdamW) of fresh NTM and FM models on the same
    batches, timed back to back so both see the same machine load. The wall times of the bench's
    own trainings are also reported, but they include whatever else ran meanwhile."""
    from .checkpoint import build_model
    from .data import to_tokens
    from .training import make_optimizer

    out = {}
    for kind in ("ntm", "fm"):
        torch.manual_seed(0)
        model = build_model(replace(base, kind=kind))
        opt, _ = make_optimizer(model, train_cfg)
        g = torch.Generator().manual_seed(0)
        seconds = 0.0
        for i in range(warmup + steps):
            x, y = src.sample(train_cfg.batch_size, g)
            t0 = time.perf_counter()
            loss = model(to_tokens(x, base.data), y, model.draw_training_noise(train_cfg.batch_size, g), train_cfg.mode)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= warmup:
                seconds += time.perf_counter() - t0
        out[f"{kind}_seconds_per_step"] = seconds / steps
    out["ratio"] = out["ntm_seconds_per_step"] / out["fm_seconds_per_step"]
    out["steps_timed"] = steps
    return out


def ntm_bits_per_dim(model, x: torch.Tensor, y: torch.Tensor | None, trajectories: int) -> float:
    """Bits/dim of NTM's ELBO bound on -log p(x | y) (test images x (n, C, H, W))."""
    elbo, _ = nll_bounds(model, x, y=y, num_trajectories=trajectories, generator=torch.Generator().manual_seed(99))
    return float(bits_per_dim(float(elbo.mean()), model.spec.dim))


def fm_bits_per_dim(model, x: torch.Tensor, y: torch.Tensor | None, ode_steps: int) -> float:
    """Bits/dim of the FM ODE estimate of -log p(x | y) (Hutchinson, one probe)."""
    nll = model.nll(x, y, steps=ode_steps, generator=torch.Generator().manual_seed(98))
    return float(bits_per_dim(float(nll.mean()), model.spec.dim))


def evaluate_image_row(model, steps: int, guidance: float, real: torch.Tensor, classifier, extractor: str,
                       solver: str | None = None, decode: str | None = "inverse") -> tuple[dict, torch.Tensor]:
    """Sample len(real) class-conditional images with one sampler and score them. -> (row, images)."""
    from .flow_matching import FlowMatching

    n = real.shape[0]
    if isinstance(model, FlowMatching):
        fn = lambda y, gen: model.sample(len(y), y=y, guidance=guidance, steps=steps, solver=solver, generator=gen)  # noqa: E731
        kind, nfe, decode = "fm", network_evaluations(steps, solver, guidance > 0), None
    else:
        fn = lambda y, gen: model.sample(len(y), y=y, guidance=guidance, steps=steps, generator=gen, decode=decode)  # noqa: E731
        kind, nfe, solver = "ntm", steps * (2 if guidance > 0 else 1), None
    images, labels, seconds = _timed_samples(fn, n, model.spec.num_classes)
    row = {"model": kind, "steps": steps, "decode": decode, "solver": solver, "nfe": nfe,
           **image_quality(real, images, classifier),
           "class_acc": classifier_accuracy(classifier, images, labels),
           "img_per_s": n / seconds, "extractor": extractor, "n_samples": n}
    return row, images


def _grid(images: torch.Tensor, folder: Path, kind: str, k: int, solver: str | None, decode: str | None,
          guidance: float, label: str | None = None) -> None:
    from .plotting import image_grid

    name = label or f"{kind}-{solver + '-' if solver else ''}{'' if decode in (None, 'inverse') else decode + '-'}{k}"
    image_grid(images[:100].numpy(), folder / f"samples-{name}.png",
               title=f"{(label or kind).upper()} {k} steps ({solver or decode}), guidance {guidance}")


def _reusable(previous: dict, key: tuple, distill_steps: int) -> bool:
    """May an earlier row be reused? Denoiser rows only for the same distillation; the score-refined
    row only when the denoiser row is reusable too (the denoiser row needs its images)."""
    kind, k, decode, _ = key
    if key not in previous:
        return False
    denoiser_key = ("ntm", k, "denoiser", None)
    den_ok = denoiser_key in previous and previous[denoiser_key].get("distill_steps") == distill_steps
    if decode == "denoiser":
        return den_ok
    if decode == "inverse+score":
        return den_ok
    return True


def _previous_rows(out: Path, config: dict) -> dict:
    """Rows of an earlier run of the same bench configuration, keyed by (model, steps, decode, solver)."""
    try:
        old = json.loads(Path(out).read_text())
    except (OSError, ValueError):
        return {}
    volatile = ("torch_threads", "seconds_per_step", "ntm_fm_step_cost_ratio", "inverse_timing", "distill",
                "distill_steps", "step_cost_probe")
    same = {k: v for k, v in old.get("config", {}).items() if k not in volatile} == \
        {k: v for k, v in config.items() if k not in volatile}
    if not same:
        return {}
    return {(r["model"], r["steps"], r["decode"], r["solver"]): r for r in old.get("rows", [])}


@torch.no_grad()
def inverse_timing(model, n: int, num_classes: int, guidance: float, repeats: int = 2) -> dict:
    """Sequential (KV-cached) against block-Jacobi transporter inverse on the same n sampled u_{t_0}."""
    from .sampling import sample_u_trajectory

    y = torch.arange(n) % num_classes
    U, t = sample_u_trajectory(model, n, y, guidance, None, None, torch.Generator().manual_seed(5))
    T = model.steps_tensor(n, t.shape[1] - 1)
    out = {"n": n, "tokens": model.spec.num_tokens, "blocks": len(model.transporter.blocks)}
    results = {}
    for method in ("sequential", "jacobi"):
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            x, sweeps = model.transporter.inverse_with_stats(U[:, 0], t[:, 0], T, method=method)
            best = min(best, time.perf_counter() - t0)
        results[method] = x
        out[f"{method}_seconds"] = best
        out[f"{method}_sweeps"] = sweeps
    out["jacobi_speedup"] = out["sequential_seconds"] / out["jacobi_seconds"]
    out["max_abs_diff"] = float((results["sequential"] - results["jacobi"]).abs().max())
    return out


def markdown_image_table(results: dict) -> str:
    """The image bench rows as a markdown table."""
    lines = ["| model | steps | decode / solver | NFE | FID | KID ×1e3 | precision | recall | class acc. | bits/dim | img/s | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        bpd = "n/a" if r["bpd"] is None or not math.isfinite(r["bpd"]) else f"{r['bpd']:.3f}"
        model = r["model"] + (f" (λ={r['aux_weight']:g}{', frozen backbone' if r.get('backbone') == 'frozen' else ''})"
                              if r.get("aux_weight") is not None else "")
        lines.append(f"| {model} | {r['steps']} | {r['decode'] or r['solver']} | {r['nfe']} | {r['fid']:.3f} | "
                     f"{1e3 * r['kid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {100 * r['class_acc']:.1f}% | "
                     f"{bpd} | {r['img_per_s']:.1f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def run_finetune_bench(data: str = "mnist", out: str | Path | None = None, quick: bool = False,
                       guidance: float = 1.0, n_samples: int | None = None, progress: bool = True,
                       classifier_steps: int = 3000, settings: dict | None = None, steps: int | None = None) -> dict:
    """NTM finetuned from the FM teacher against the teacher and a from-scratch NTM (issue: FM start).

    The teacher is the FM run of ``ntm bench <data>`` (trained here if that bench has not run). The
    finetunes get a quarter of the teacher's steps (lambda = 2.5; lambda = 0 for the loss curves; and
    lambda = 2.5 with the pretrained backbone frozen, only the transporter and scale head trained);
    the from-scratch NTM gets the teacher's steps plus the finetune's. Rows: FM at 4 and 50 Euler
    steps, the finetuned NTMs and the from-scratch NTM at 4 steps. Writes ``results/<data>-finetune[-quick].json``.
    """
    from .finetune import finetune_config, finetune_train_config

    settings = bench_settings(quick, settings, n_samples)
    tag = f"{data}-quick" if quick else data
    out = Path(out) if out else Path("results") / f"{data}-finetune{'-quick' if quick else ''}.json"
    folder = out.with_suffix("")
    src, spec = _labelled_source(data)
    p = PRESETS[settings["preset"]]
    if steps is not None:
        p = replace(p, train=replace(p.train, steps=steps))
    base = ModelConfig(data=spec, trajectory=p.trajectory, transporter=p.transporter, predictor=p.predictor)
    teacher_dir = Path("results") / tag / "runs" / "fm"
    if teacher_dir.exists() and not _same_run(teacher_dir, replace(base, kind="fm"), p.train):
        raise ConfigError(f"{teacher_dir} holds an FM run with other settings than this bench's teacher; "
                          "move it away or re-run `ntm bench " + data + (" --quick" if quick else "") + "` first")
    teacher_sum = _train_or_reuse(teacher_dir, replace(base, kind="fm"), p.train, src, progress)
    ft_steps = max(1, p.train.steps // 4)
    classifier, clf_info = load_or_train_classifier(src, steps=classifier_steps, progress=progress)
    extractor = f"project classifier ({clf_info['name']}, 128-d features, test acc {clf_info['test_accuracy']:.4f})"
    n = settings["n_samples"]
    real, _ = src.held_out(n, seed=4242)
    bpd_x, bpd_y = src.held_out(settings["n_bpd"], seed=4343)
    ft_cfg = finetune_config(replace(base, kind="fm"), settings["preset"])
    ft_train = finetune_train_config(p.train, ft_steps, 2.5, teacher_dir)
    runs, summaries = {}, {"fm": teacher_sum}
    # (label, lambda, learning-rate scale of the pretrained weights: 0 freezes the backbone)
    finetunes = (("ntm-ft", 2.5, ft_train.pretrained_lr_scale), ("ntm-ft-aux0", 0.0, ft_train.pretrained_lr_scale),
                 ("ntm-ft-frozen", 2.5, 0.0))
    for label, weight, lr_scale in finetunes:
        runs[label] = folder / "runs" / label
        summaries[label] = _train_or_reuse(runs[label], ft_cfg, replace(ft_train, aux_weight=weight,
                                                                        pretrained_lr_scale=lr_scale),
                                           src, progress, init_from_teacher=True)
    folder.mkdir(parents=True, exist_ok=True)
    _aux_curves(runs["ntm-ft"], runs["ntm-ft-aux0"], folder / "finetune-loss-curves.png")
    results = {"config": {"data": data, "quick": quick, "teacher_steps": p.train.steps, "finetune_steps": ft_steps,
                          "scratch_steps": p.train.steps + ft_steps, "batch_size": p.train.batch_size,
                          "guidance": guidance, "n_samples": n, "n_bpd": settings["n_bpd"],
                          "bpd_trajectories": settings["bpd_trajectories"], "teacher": str(teacher_dir),
                          "classifier": {k: clf_info[k] for k in ("name", "steps", "test_accuracy")}},
               "rows": []}
    teacher = load_model(teacher_dir)
    m = settings["n_bpd_fm"]
    fm_bpd = fm_bits_per_dim(teacher, bpd_x[:m], bpd_y[:m], settings["fm_ode_steps"])
    for k in (4, 50):
        row, images = evaluate_image_row(teacher, k, guidance, real, classifier, extractor, solver="euler")
        row.update(bpd=fm_bpd, bpd_kind="ODE estimate", train_seconds=teacher_sum["seconds"],
                   train_steps=teacher_sum["steps"])
        results["rows"].append(row)
        _grid(images, folder, "fm", k, "euler", None, guidance)
        _write_json(out, results, markdown_image_table(results))

    def ntm_row(label: str, aux_weight: float | None = None, backbone: str | None = None) -> None:
        model = load_model(runs[label])
        row, images = evaluate_image_row(model, p.trajectory.T, guidance, real, classifier, extractor)
        extra = teacher_sum["seconds"] if label != "ntm" else 0.0
        row.update(model="ntm" if label == "ntm" else "ntm-ft", aux_weight=aux_weight, backbone=backbone,
                   bpd=ntm_bits_per_dim(model, bpd_x, bpd_y, settings["bpd_trajectories"]), bpd_kind="elbo bound",
                   train_seconds=summaries[label]["seconds"] + extra, train_steps=summaries[label]["steps"])
        results["rows"].append(row)
        _grid(images, folder, row["model"], p.trajectory.T, None, "inverse", guidance, label=label)
        _write_json(out, results, markdown_image_table(results))

    for label, weight, lr_scale in finetunes:
        ntm_row(label, weight, "frozen" if lr_scale == 0 else "trained")
    # the from-scratch NTM last: it is the longest training, and the rows above are written by then
    runs["ntm"] = folder / "runs" / "ntm-scratch"
    summaries["ntm"] = _train_or_reuse(runs["ntm"], base, replace(p.train, steps=p.train.steps + ft_steps), src, progress)
    ntm_row("ntm")
    return results


def _aux_curves(run_aux: Path, run_no_aux: Path, path: Path) -> None:
    """The NLL part of the finetuning loss with lambda = 2.5 and lambda = 0, against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import _save

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for (run, label), color in zip(((run_aux, "λ = 2.5 (cosine-decayed)"), (run_no_aux, "λ = 0")), ("C0", "C1")):
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = np.array([r["step"] for r in recs])
        nll = np.array([r.get("nll", r["loss"]) for r in recs])
        ax.plot(steps, nll, lw=0.6, alpha=0.35, color=color)
        k = min(8, len(nll))  # running mean over k logged batches
        smooth = np.convolve(nll, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.5, color=color, label=f"{label}, mean of {k} logs")
    ax.set_xlabel("finetuning step")
    ax.set_ylabel("NLL part of the loss, nats/dim")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path, dpi=100)


# (name, predictor scale, learning rate of the pretrained velocity weights, of the fresh parts, tau_0)
FINETUNE_VARIANTS = (
    ("floor-same-lr", "floor", 5e-4, 5e-4, 0.01),
    ("floor-fresh-4x", "floor", 5e-4, 2e-3, 0.01),
    ("x0-same-lr", "x0", 5e-4, 5e-4, 0.01),
    ("x0-fresh-4x", "x0", 5e-4, 2e-3, 0.01),
    ("x0-fresh-4x-tau0.0025", "x0", 5e-4, 2e-3, 0.0025),
    ("x0-slow-backbone", "x0", 1e-4, 2e-3, 0.01),
    ("x0-frozen-backbone", "x0", 0.0, 2e-3, 0.01),
)


def run_finetune_ablation(data: str = "mnist", out: str | Path | None = None, steps: int = 1000,
                          n_samples: int = 1000, n_bpd: int = 200, variants: tuple = FINETUNE_VARIANTS,
                          guidance: float = 1.0, progress: bool = True, classifier_steps: int = 3000,
                          quick: bool = False) -> dict:
    """Short finetunes from the FM teacher of ``ntm bench <data>`` that compare the predictor's scale
    ("floor" against "x0") and the learning rate of the fresh parts. Each variant is finetuned for
    ``steps`` with lambda = 2.5, then scored by the ELBO bits/dim on ``n_bpd`` test images (2
    trajectories each) and by FID / class accuracy on ``n_samples`` guided 4-step samples. Runs are
    reused like the other benches. Writes ``results/<data>-finetune-ablation[-quick].json``."""
    from .finetune import finetune_config, finetune_train_config

    tag = f"{data}-quick" if quick else data
    out = Path(out) if out else Path("results") / f"{data}-finetune-ablation{'-quick' if quick else ''}.json"
    folder = out.with_suffix("")
    src, spec = _labelled_source(data)
    preset = "mnist-quick" if quick else "mnist"
    p = PRESETS[preset]
    base = ModelConfig(data=spec, trajectory=p.trajectory, transporter=p.transporter, predictor=p.predictor)
    teacher_dir = Path("results") / tag / "runs" / "fm"
    try:
        same = model_config_from_dict(read_meta(resolve(teacher_dir))["model"]) == replace(base, kind="fm")
    except (CheckpointError, KeyError, TypeError, ValueError):
        same = False
    if not same:
        raise ConfigError(f"no FM teacher with this bench's model in {teacher_dir}; run "
                          f"`ntm bench {data}{' --quick' if quick else ''}` first")
    classifier, clf_info = load_or_train_classifier(src, steps=classifier_steps, progress=progress)
    real, _ = src.held_out(n_samples, seed=4242)
    bpd_x, bpd_y = src.held_out(n_bpd, seed=4343)
    results = {"config": {"data": data, "steps": steps, "aux_weight": 2.5, "n_samples": n_samples, "n_bpd": n_bpd,
                          "bpd_trajectories": 2, "guidance": guidance, "teacher": str(teacher_dir),
                          "classifier": {k: clf_info[k] for k in ("name", "steps", "test_accuracy")}}, "rows": []}
    for name, scale, lr, fresh_lr, tau0 in (("step-0", "x0", 0.0, 0.0, 0.01),) + tuple(variants):
        cfg = finetune_config(replace(base, kind="fm"), preset, scale, tau0)
        if name == "step-0":  # the untrained finetune: the FM Gaussian posterior sampler (widened by B tau_0)
            from .finetune import initial_weights, load_teacher
            model = build_model(cfg)
            model.load_state_dict(initial_weights(model, load_teacher(teacher_dir)))
            model.eval()
            summary = {"seconds": 0.0}
        else:
            tcfg = replace(finetune_train_config(replace(p.train, lr=fresh_lr), steps, 2.5, teacher_dir, 1.0),
                           pretrained_lr_scale=lr / fresh_lr)
            summary = _train_or_reuse(folder / "runs" / name, cfg, tcfg, src, progress, init_from_teacher=True)
            model = load_model(folder / "runs" / name)
        row, _ = evaluate_image_row(model, p.trajectory.T, guidance, real, classifier, "project classifier")
        with torch.no_grad():
            _, logdet = model.transporter(model.to_tokens(bpd_x), torch.zeros(n_bpd, device=model.device))
        trained = name != "step-0"
        results["rows"].append({"variant": name, "velocity_scale": scale, "tau0": tau0,
                                "pretrained_lr": lr if trained else None, "fresh_lr": fresh_lr if trained else None,
                                "bpd": ntm_bits_per_dim(model, bpd_x, bpd_y, 2), "fid": row["fid"],
                                "class_acc": row["class_acc"], "precision": row["precision"], "recall": row["recall"],
                                "logdet_t0_per_dim": float(logdet.mean()) / spec.dim,
                                "train_seconds": summary["seconds"]})
        _write_json(out, results, markdown_ablation_table(results))
    return results


def markdown_ablation_table(results: dict) -> str:
    c = results["config"]
    lines = [f"Finetune ablation on {c['data']}: {c['steps']} steps, λ = {c['aux_weight']}; bits/dim on {c['n_bpd']} "
             f"test images; FID on {c['n_samples']} samples (w = {c['guidance']}).", "",
             "| variant | scale | τ_0 | pretrained lr | fresh lr | bits/dim | FID | class acc. | precision | recall | log-det t=0 /dim |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lrs = "— | —" if r["fresh_lr"] is None else f"{r['pretrained_lr']:g} | {r['fresh_lr']:g}"
        lines.append(f"| {r['variant']} | {r['velocity_scale']} | {r['tau0']:g} | {lrs} | "
                     f"{r['bpd']:.3f} | {r['fid']:.3f} | {100 * r['class_acc']:.1f}% | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['logdet_t0_per_dim']:.3f} |")
    return "\n".join(lines) + "\n"
