"""``ntm bench mnist|fashion``: NTM (T = 4) against the flow-matching baseline on the same backbone.

Both models are trained with the same preset (backbone, optimiser, batch, step budget) on the same
data stream; then every row draws ``n_samples`` class-conditional samples (labels 0..K-1 in turn, with
guidance ``guidance``: the product rule for NTM, linear CFG on the velocity for FM) and is scored in
the feature space of the project's own classifier (see :mod:`ntm.tools.metrics`) against the same number
of test images. Rows: NTM at 4, 8 and 16 steps (decode "inverse": one transporter inverse), FM Euler at
4, 8 and 50 steps and Heun at 4. Bits/dim: the tightest of NTM's bounds of -log p(x | y) on test
images (its ``bpd_kind`` says which: uniform or discretised, ELBO or IW, T, K); FM's ODE estimate
(Hutchinson, one probe) on a smaller subset.

Output: ``results/<data>[-quick].json`` ({"rows", "config"}), a markdown table beside it, and a
folder ``results/<data>[-quick]/`` with sample grids and training curves (runs in its ``runs/``).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..config import DISTILL_TRAIN, FMConfig, NTMConfig, TrainConfig, default_preset, get_preset
from ..denoising import denoiser_dir
from ..errors import ConfigError
from ..flow_matching import FlowMatching, network_evaluations
from ..hub import build_model, load_model
from ..images import open_image_source
from ..io import latest_checkpoint, read_meta
from ..likelihood import bits_per_dim, bound_by_step, discrete_bits_per_dim, discrete_nll_bounds, nll_bounds
from ..sampling import sample_u_trajectory
from ..tools.metrics import (classifier_accuracy, classifier_record, extractor_name, image_quality,
                             load_or_train_classifier)
from ..tools.plots import image_grid, line_plot, loss_curves, read_log, smoothed_curves
from ..train import distill, make_optimizer
from ..train.runs import make_objective
from .common import (AFFINE_RUNS_PRESET, QUICK_PRESET, BenchStopped, bench_device, image_bench_folder,
                     interleaved_step_seconds, results_dir,
                     run_differences, train_or_reuse, write_results)

NTM_STEPS = (4, 8, 16)
# sample seed s seeds the chunk at offset lo with 1000 + lo + s * this: distinct below 99,000 samples
SAMPLE_SEED_STRIDE = 100_000
DISCRETE_T0 = 1e-3  # t_0 of the discretised last step in the bits/dim bounds
# the image objective ablation: (label, preset, training options over the preset's), same budget each
ABLATION = (
    ("paper-nll", "mnist-paper", {}),
    ("nll-rb-stratified", "mnist-paper", {"objective": "nll-rb", "stratified": True}),
    ("default", AFFINE_RUNS_PRESET, {}),  # the default recipe when the ablation ran
)
# the levers on the default recipe (`--levers`): the lambda schedule, the transporter's size and
# element-wise map, and the last level's training range. Multi-T training is measured at the full
# budget instead (`ntm bench mnist --preset mnist-multi-t`); a multi-T variant added here gets a row
# at each of its step counts.
LEVERS = (
    ("default", AFFINE_RUNS_PRESET, {}),  # the default recipe when the levers ran
    ("cosine-lambda", AFFINE_RUNS_PRESET, {"hybrid_schedule": "cosine"}),
    ("wide-transporter", "mnist-wide", {}),
    ("spline", "mnist-spline", {}),
    ("spline-one-block", "mnist-spline-one", {}),  # cheaper steps: one spline block, or 4 bins
    ("spline-4-bins", "mnist-spline-4bins", {}),
    ("t0-zero", "mnist-t0", {}),
)


def ablation_runs(spec, steps: int, variants: tuple = ABLATION) -> list[tuple[str, NTMConfig, TrainConfig, FMConfig]]:
    """(label, model config, training config, the FM on the same backbone) of each ablation variant at
    ``steps`` training steps."""
    out = []
    for label, preset, options in variants:
        p = get_preset(preset)
        out.append((label, p.ntm(spec), replace(p.train, steps=steps, **options), p.fm(spec)))
    return out
FM_ROWS = (("euler", 4), ("euler", 8), ("euler", 50), ("heun", 4))


def bench_settings(quick: bool, overrides: dict | None = None, n_samples: int | None = None) -> dict:
    """Sample counts and budgets of the full or the quick bench, with ``overrides`` applied."""
    settings = {**_base_settings(quick), **(overrides or {})}
    if n_samples is not None:
        settings["n_samples"] = n_samples
    return settings


def labelled_source(data: str):
    """The image source of a bench and its spec; the benches need class labels."""
    src = open_image_source(data, patch=4)
    spec = src.spec()
    if spec.num_classes == 0:
        raise ConfigError(f"the image bench needs class labels; '{data}' has none")
    return src, spec


def _base_settings(quick: bool) -> dict:
    if quick:
        return {"preset": QUICK_PRESET, "n_samples": 1000, "n_bpd": 200, "n_bpd_fm": 32, "bpd_trajectories": 2,
                "fm_ode_steps": 16}
    return {"preset": "mnist", "n_samples": 2000, "n_bpd": 1000, "n_bpd_fm": 200, "bpd_trajectories": 4,
            "fm_ode_steps": 32}


def timed_samples(sample_fn, n: int, num_classes: int, chunk: int = 500,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Draw n samples with labels 0..K-1 in turn, in chunks; returns (images, labels, seconds).
    ``seed`` 0 is the benches' draw; another value draws other noise for the same labels."""
    labels = torch.arange(n) % num_classes
    out, seconds = [], 0.0
    for lo in range(0, n, chunk):
        g = torch.Generator().manual_seed(1000 + lo + SAMPLE_SEED_STRIDE * seed)
        t0 = time.perf_counter()
        out.append(sample_fn(labels[lo:lo + chunk], g).cpu())
        seconds += time.perf_counter() - t0
    return torch.cat(out).clamp(-1, 1), labels, seconds


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
    out = Path(out) if out else results_dir() / f"{tag}.json"
    folder = out.with_suffix("")
    src, spec = labelled_source(data)
    p = get_preset(settings["preset"])
    train_cfg = p.train if steps is None else replace(p.train, steps=steps)
    configs = {"ntm": p.ntm(spec), "fm": p.fm(spec)}
    classifier, clf_info = load_or_train_classifier(src, steps=classifier_steps, progress=progress)
    n = settings["n_samples"]
    real, _ = src.held_out(n, seed=4242)
    bpd_x, bpd_y = src.held_out(settings["n_bpd"], seed=4343)
    results = {"config": {"data": data, "quick": quick, "preset": settings["preset"], "train_steps": train_cfg.steps,
                          "batch_size": train_cfg.batch_size, "lr": train_cfg.lr, "ntm_mode": train_cfg.mode,
                          "T": p.trajectory.T, "guidance": guidance, "n_samples": n,
                          "n_bpd": settings["n_bpd"], "bpd_trajectories": settings["bpd_trajectories"],
                          "n_bpd_fm": settings["n_bpd_fm"], "fm_ode_steps": settings["fm_ode_steps"],
                          "classifier": classifier_record(clf_info),
                          "torch_threads": torch.get_num_threads()},
               "rows": []}
    summaries, models, runs = {}, {}, {}
    for kind in ("ntm", "fm"):
        runs[kind] = folder / "runs" / kind
        summaries[kind] = train_or_reuse(runs[kind], configs[kind], train_cfg, src, progress)
    if distill_steps > 0:
        results["config"]["distill_steps"] = distill_steps
        results["config"]["distill"] = distilled(runs["ntm"], src, distill_steps, progress)
    for kind in ("ntm", "fm"):
        models[kind] = load_model(runs[kind], map_location=bench_device())
    previous, sources = previous_rows(out, results["config"], summaries)
    step_cost = {k: summaries[k]["seconds"] / max(1, summaries[k]["steps"]) for k in summaries}
    results["config"]["seconds_per_step"] = step_cost
    results["config"]["ntm_fm_step_cost_ratio"] = step_cost["ntm"] / step_cost["fm"]
    results["config"]["step_cost_probe"] = step_cost_probe(configs, train_cfg, src)
    folder.mkdir(parents=True, exist_ok=True)
    loss_curves(runs, folder / "training-curves.png")
    extractor = extractor_name(clf_info)

    bounds: dict = {}  # computed when a row needs them: a re-run that reuses every row costs no bound

    def row_bounds(kind: str, T: int) -> dict:
        if (kind, T) not in bounds:
            if kind == "ntm":
                bounds[kind, T] = ntm_bounds(models["ntm"], src, settings["n_bpd"], settings["bpd_trajectories"], steps=T)
            else:
                m = settings["n_bpd_fm"]
                bounds[kind, T] = {"bpd": fm_bits_per_dim(models["fm"], bpd_x[:m], bpd_y[:m], settings["fm_ode_steps"]),
                                   "bpd_kind": f"uniform ODE estimate ({settings['fm_ode_steps']} Heun steps, "
                                               f"Hutchinson, n={m})"}
        return bounds[kind, T]

    results["config"]["by_step"] = by_step_table(models["ntm"], bpd_x[:200], bpd_y[:200])
    # a multi-T model's bound split by step on its other grids too (where the nats of a finer grid go)
    results["config"]["by_step_other_T"] = {
        str(T): by_step_table(models["ntm"], bpd_x[:200], bpd_y[:200], steps=T)
        for T in models["ntm"].train_Ts if T != models["ntm"].config.trajectory.T}
    # "default": the model that the default image preset trains at its own budget
    is_default = settings["preset"] == default_preset(spec) and train_cfg.steps == p.train.steps
    recipe = {**ntm_recipe(configs["ntm"], train_cfg, default=is_default), **lever_keys(configs["ntm"])}

    decoders = ("inverse", "inverse+score", "denoiser") if distill_steps > 0 else ("inverse",)
    jobs = [("ntm", d, None, p.trajectory.T) for d in decoders] + \
        [("ntm", "inverse", None, T) for T in NTM_STEPS if T != p.trajectory.T] + \
        [("fm", None, solver, k) for solver, k in FM_ROWS]
    if distill_steps > 0:
        results["config"]["inverse_timing"] = inverse_timing(models["ntm"], min(n, 500), spec.num_classes, guidance)
    refined = None
    for kind, decode, solver, k in jobs:
        key = (kind, k, decode, solver)
        if reusable(previous, key, distill_steps):  # made by this very run: only its recipe keys are renewed
            results["rows"].append({**previous[key], **(recipe if kind == "ntm" else {})})
            grid = sources[key] / grid_file(kind, k, solver, decode)
            if grid.parent != folder and grid.is_file():  # the row's picture comes with it
                shutil.copyfile(grid, folder / grid.name)
            continue
        row, images = evaluate_image_row(models[kind], k, guidance, real, classifier, extractor, solver=solver,
                                         decode=decode)
        if kind == "ntm":
            row.update(recipe, **row_bounds(kind, k))
        else:
            row.update(objective="fm", transform=None, **row_bounds(kind, 0))
        row.update(train_seconds=summaries[kind]["seconds"], train_steps=summaries[kind]["steps"])
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
        save_grid(images, folder, kind, k, solver, decode, guidance)
        write_results(out, results)
    write_results(out, results)  # also when every row was reused
    return results


def distilled(run: Path, src, steps: int, progress: bool) -> dict:
    """Distil the denoiser of the bench's NTM run for ``steps`` (reusing a finished distillation of
    that length; the bench owns its runs, so one of another length is redone). -> its summary."""
    folder = denoiser_dir(run)
    ckpt = latest_checkpoint(folder) if folder.is_dir() else None
    if ckpt is not None and read_meta(ckpt)["train"]["steps"] != steps:
        shutil.rmtree(folder)
        ckpt = None
    if ckpt is None or read_meta(ckpt)["step"] < steps:
        res = distill(run, src, train_config=replace(DISTILL_TRAIN, steps=steps), progress=progress,
                      device=bench_device())
        if res["stopped"]:
            raise BenchStopped("stopped during the distillation; run the same command again to resume")
    meta = read_meta(latest_checkpoint(folder))
    return {"steps": meta["step"], "config": meta["config"], "batch_size": meta["train"]["batch_size"],
            "lr": meta["train"]["lr"], "ntm_step": meta.get("ntm_step")}


def run_image_ablation(data: str = "mnist", out: str | Path | None = None, steps: int = 2000, n_samples: int = 1000,
                       n_bpd: int = 200, guidance: float = 1.0, variants: tuple = ABLATION, progress: bool = True,
                       classifier_steps: int = 3000, kind: str = "objective", probe_steps: int = 12) -> dict:
    """Each objective recipe of ``variants`` trained for ``steps`` on ``data`` (same data stream and
    budget), then scored by FID / class accuracy of ``n_samples`` guided 4-step samples and by the
    tightest bits/dim bound on ``n_bpd`` test images (2 trajectories). Runs are reused like the other
    benches; a re-run keeps the rows of finished, unchanged runs. ``kind`` ("objective" or "levers")
    titles the table; each variant's training step is timed against an FM step over ``probe_steps``
    steps. Writes ``results/<data>-ablation.json`` unless ``out`` says otherwise."""
    out = Path(out) if out else results_dir() / f"{data}-ablation.json"
    folder = out.with_suffix("")
    src, spec = labelled_source(data)
    classifier, clf_info = load_or_train_classifier(src, steps=classifier_steps, progress=progress)
    real, _ = src.held_out(n_samples, seed=4242)
    results = {"config": {"data": data, "ablation": kind,
                          "steps": steps, "n_samples": n_samples, "n_bpd": n_bpd, "guidance": guidance,
                          "classifier": classifier_record(clf_info)}, "rows": []}
    previous = previous_ablation_rows(out, results["config"])
    runs = {}
    for label, model_cfg, train_cfg, fm_cfg in ablation_runs(spec, steps, variants):
        runs[label] = folder / "runs" / label
        summary = train_or_reuse(runs[label], model_cfg, train_cfg, src, progress)
        model = load_model(runs[label], map_location=bench_device())
        log = read_log(runs[label])
        tail = [r["nll"] for r in log[-8:] if "nll" in r]
        recipe = ntm_recipe(model_cfg, train_cfg, default=False)
        # the variant's step against an FM step, timed back to back now (volatile: not part of a row's identity)
        cost = {"step_cost_vs_fm": step_cost_probe({"ntm": model_cfg, "fm": fm_cfg}, train_cfg, src, probe_steps,
                                                      min(3, probe_steps))["ratio"]}
        for T in model.train_Ts:
            old = previous.get((label, T))
            # the same finished run (its training time is its fingerprint) and recipe: keep the row,
            # with the lever keys read again from that run's config
            if old and old.get("train_seconds") == summary["seconds"] and all(old.get(k) == v for k, v in recipe.items()):
                results["rows"].append({**old, **lever_keys(model_cfg), **cost})
                continue
            row, images = evaluate_image_row(model, T, guidance, real, classifier, "project classifier")
            results["rows"].append({"variant": label, "steps": T, **recipe, **lever_keys(model_cfg), **cost,
                                    **{k: row[k] for k in ("fid", "kid", "precision", "recall", "class_acc", "img_per_s")},
                                    **ntm_bounds(model, src, n_bpd, 2, steps=T), "final_nll": sum(tail) / max(1, len(tail)),
                                    "train_seconds": summary["seconds"]})
            save_grid(images, folder, "ntm", T, None, "inverse", guidance,
                      label=label if T == model.config.trajectory.T else f"{label}-T{T}")
            write_results(out, results)
    smoothed_curves(runs, folder / "nll-curves.png", ylabel="NLL of the scored steps, nats/dim")
    return results


def previous_ablation_rows(out: Path, config: dict) -> dict:
    """Rows of an earlier ablation run with the same settings, keyed by (variant, steps)."""
    try:
        old = json.loads(Path(out).read_text())
    except (OSError, ValueError):
        return {}
    keys = ("data", "steps", "n_samples", "n_bpd", "guidance")
    if any(old.get("config", {}).get(k) != config[k] for k in keys):
        return {}
    return {(r["variant"], r.get("steps", 4)): r for r in old.get("rows", [])}


def ntm_recipe(cfg: NTMConfig, train_cfg: TrainConfig, default: bool) -> dict:
    """The keys that name an NTM row's recipe (objective, element-wise transform, and the rest)."""
    objective = train_cfg.objective + ("+hybrid" if train_cfg.hybrid_weight > 0 else "")
    return {"objective": objective, "transform": cfg.transporter.transform if cfg.transporter.enabled else "none",
            "hybrid_weight": train_cfg.hybrid_weight, "stratified": train_cfg.stratified,
            "precondition": cfg.predictor.precondition, "default": default}


def lever_keys(cfg: NTMConfig) -> dict:
    """What the levers change in the model config, for the ablation rows: the transporter's size
    (blocks x layers, width), its splines (None when affine), the trained step counts and the upper end
    of the trained t_0 range."""
    tr, tj = cfg.transporter, cfg.trajectory
    splines = None if tr.transform != "spline" else \
        f"{tr.blocks if tr.spline_blocks is None else tr.spline_blocks} of {tr.blocks} blocks, {tr.spline_bins} bins"
    gate = (" gated" if tr.coupling_gate else "") + (f" coupling t<{tr.coupling_t_max:g}" if tr.coupling_t_max < 1 else "")
    return {"transporter": f"{tr.blocks}x{tr.layers} w{tr.width}{gate}", "splines": splines, "multi_T": list(tj.train_Ts),
            "t_min_high": tj.t_min_high}


def by_step_table(model, x: torch.Tensor, y: torch.Tensor | None, trajectories: int = 2,
                  steps: int | None = None) -> dict:
    """The uniformly dequantised ELBO split by step (``bound_by_step``) at T = ``steps`` (default: the
    model's T), in nats per dimension."""
    b = bound_by_step(model, x, y=y if model.spec.num_classes else None, num_trajectories=trajectories,
                      generator=torch.Generator().manual_seed(96), steps=steps)
    d = model.spec.dim
    return {"T": len(b["times"]) - 1, "times": b["times"], "neg_log_p_per_dim": [v / d for v in b["neg_log_p"]],
            "log_q_per_dim": [v / d for v in b["log_q"]], "neg_log_prior_per_dim": b["neg_log_prior"] / d,
            "n": int(x.shape[0]), "trajectories": trajectories}


def step_cost_probe(configs: dict[str, NTMConfig], train_cfg: TrainConfig, src, steps: int = 12,
                    warmup: int = 3, rounds: int = 4) -> dict:
    """Seconds per training step (forward, backward, AdamW) of fresh NTM and FM models on the same
    batches. The steps are interleaved, ``rounds`` turns of steps / rounds steps each, NTM then FM,
    so that both see the same machine load even when it drifts (another job on the other core); the
    wall times of the bench's own trainings are also reported, but they include whatever else ran
    meanwhile."""
    device = bench_device()
    jobs = {}
    for kind in ("ntm", "fm"):
        torch.manual_seed(0)
        model = build_model(configs[kind]).to(device)
        objective = make_objective(model, train_cfg, device)
        opt, _ = make_optimizer(model, train_cfg)
        jobs[kind] = (model, objective, opt, src, torch.Generator().manual_seed(0))
    seconds, timed = interleaved_step_seconds(jobs, train_cfg.batch_size, steps, warmup, rounds)
    out = {f"{kind}_seconds_per_step": seconds[kind] for kind in jobs}
    out["ratio"] = out["ntm_seconds_per_step"] / out["fm_seconds_per_step"]
    out["steps_timed"] = timed
    out["threads"] = torch.get_num_threads()
    return out


def run_step_cost_bench(out: str | Path | None = None, data: str = "mnist", presets: tuple[str, ...] = ("mnist",),
                        threads: tuple[int, ...] = (1, 2), steps: int = 24) -> dict:
    """The NTM training step against an FM step on the same backbone (``results/step-cost.json``): for
    each preset and thread count, ``step_cost_probe`` on fresh models (interleaved rounds, the same
    batches). Meant for a quiet machine: the ratio moves with whatever else runs."""
    out = Path(out) if out else results_dir() / "step-cost.json"
    src, spec = labelled_source(data)
    before = torch.get_num_threads()
    rows = []
    try:
        for name in presets:
            p = get_preset(name)
            for n in threads:
                torch.set_num_threads(n)
                probe = step_cost_probe({"ntm": p.ntm(spec), "fm": p.fm(spec)}, p.train, src, steps=steps)
                rows.append({"data": data, "preset": name, "transform": p.transporter.transform, **probe})
    finally:
        torch.set_num_threads(before)
    results = {"config": {"data": data, "batch_size": {name: get_preset(name).train.batch_size for name in presets},
                          "device": str(bench_device()), "steps_timed": steps,
                          "note": "forward, backward and AdamW of fresh models; NTM and FM interleaved in rounds"},
               "rows": rows}
    write_results(out, results)
    return results


def ntm_bounds(model, src, n: int, trajectories: int, steps: int | None = None, t0: float = DISCRETE_T0) -> dict:
    """Every bound on the test images' discrete NLL in bits/dim that NTM gives at T = ``steps``: the
    uniformly dequantised ELBO and IW bounds and (when ``t0`` lies in the trained t_0 range) the
    discretised-last-step ELBO and IW bounds (same K = ``trajectories``), and the tightest of them
    with its label (``bpd``, ``bpd_kind``)."""
    x, y = src.held_out(n, seed=4343)
    q = src.test[:n] if src.test is not None else src.images[:n]
    y = y if model.spec.num_classes else None
    T = steps or model.config.trajectory.T
    elbo, iw = nll_bounds(model, x, y=y, num_trajectories=trajectories, generator=torch.Generator().manual_seed(99),
                          steps=steps)
    dim = model.spec.dim
    bounds = {f"uniform ELBO, T={T}, K={trajectories}": float(bits_per_dim(float(elbo.mean()), dim)),
              f"uniform IW, T={T}, K={trajectories}": float(bits_per_dim(float(iw.mean()), dim))}
    if t0 <= model.t_min_high(T):  # the discretised last step needs a t_0 inside the trained range
        d_elbo, d_iw = discrete_nll_bounds(model, q, y, num_trajectories=trajectories, t0=t0, steps=steps,
                                           generator=torch.Generator().manual_seed(97))
        bounds[f"discretised t0={t0:g} ELBO, T={T}, K={trajectories}"] = float(discrete_bits_per_dim(float(d_elbo.mean()), dim))
        bounds[f"discretised t0={t0:g} IW, T={T}, K={trajectories}"] = float(discrete_bits_per_dim(float(d_iw.mean()), dim))
    kind = min(bounds, key=bounds.get)
    return {"bpd": bounds[kind], "bpd_kind": kind, "bpd_bounds": bounds}


def ntm_bits_per_dim(model, x: torch.Tensor, y: torch.Tensor | None, trajectories: int) -> float:
    """Bits/dim of NTM's ELBO bound on -log p(x | y) (test images x (n, C, H, W))."""
    elbo, _ = nll_bounds(model, x, y=y, num_trajectories=trajectories, generator=torch.Generator().manual_seed(99))
    return float(bits_per_dim(float(elbo.mean()), model.spec.dim))


def fm_bits_per_dim(model, x: torch.Tensor, y: torch.Tensor | None, ode_steps: int) -> float:
    """Bits/dim of the FM ODE estimate of -log p(x | y) (Hutchinson, one probe)."""
    nll = model.nll(x, y, steps=ode_steps, generator=torch.Generator().manual_seed(98))
    return float(bits_per_dim(float(nll.mean()), model.spec.dim))


def evaluate_image_row(model, steps: int, guidance: float, real: torch.Tensor, classifier, extractor: str,
                       solver: str | None = None, decode: str | None = "inverse",
                       sample_seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Sample len(real) class-conditional images with one sampler and score them (``sample_seed``: see
    :func:`timed_samples`). -> (row, images)."""
    n = real.shape[0]
    if isinstance(model, FlowMatching):
        fn = lambda y, gen: model.sample(len(y), y=y, guidance=guidance, steps=steps, solver=solver, generator=gen)  # noqa: E731
        kind, nfe, decode = "fm", network_evaluations(steps, solver, guidance > 0), None
    else:
        fn = lambda y, gen: model.sample(len(y), y=y, guidance=guidance, steps=steps, generator=gen, decode=decode)  # noqa: E731
        kind, nfe, solver = "ntm", steps * (2 if guidance > 0 else 1), None
    images, labels, seconds = timed_samples(fn, n, model.spec.num_classes, seed=sample_seed)
    row = {"model": kind, "steps": steps, "decode": decode, "solver": solver, "nfe": nfe,
           **image_quality(real, images, classifier),
           "class_acc": classifier_accuracy(classifier, images, labels),
           "img_per_s": n / seconds, "extractor": extractor, "n_samples": n}
    return row, images


def grid_file(kind: str, k: int, solver: str | None, decode: str | None, label: str | None = None) -> str:
    """The file name of a row's sample grid in its bench folder."""
    name = label or f"{kind}-{solver + '-' if solver else ''}{'' if decode in (None, 'inverse') else decode + '-'}{k}"
    return f"samples-{name}.png"


def save_grid(images: torch.Tensor, folder: Path, kind: str, k: int, solver: str | None, decode: str | None,
          guidance: float, label: str | None = None) -> None:
    image_grid(images[:100].numpy(), folder / grid_file(kind, k, solver, decode, label),
               title=f"{(label or kind).upper()} {k} steps ({solver or decode}), guidance {guidance}")


def reusable(previous: dict, key: tuple, distill_steps: int) -> bool:
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


# config entries that do not change what a row measures
VOLATILE = ("torch_threads", "seconds_per_step", "ntm_fm_step_cost_ratio", "inverse_timing", "distill",
            "distill_steps", "step_cost_probe", "by_step", "by_step_other_T")


def previous_rows(out: Path, config: dict, summaries: dict) -> tuple[dict, dict]:
    """Rows measured earlier on these very runs with the same bench settings, keyed by (model, steps,
    decode, solver): from ``out`` first, then from the benches of other presets beside it (a run
    copied between bench folders, or an FM baseline that several presets share). A row belongs to a
    run when its ``train_seconds`` and ``train_steps`` are the run's (``summaries[model]``).
    -> (rows, the bench folder each row's pictures are in)."""
    out = Path(out)
    ignored = VOLATILE + ("preset",)
    wanted = {k: v for k, v in config.items() if k not in ignored}
    found: dict = {}
    sources: dict = {}
    for path in [out] + sorted(p for p in out.parent.glob("*.json") if p != out):
        try:
            old = json.loads(path.read_text())
            same = {k: v for k, v in old["config"].items() if k not in ignored} == wanted
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        for r in old.get("rows", []) if same else []:
            run = summaries.get(r.get("model"))
            if run and r.get("train_seconds") == run["seconds"] and r.get("train_steps") == run["steps"]:
                key = (r["model"], r["steps"], r["decode"], r["solver"])
                if key not in found:
                    found[key], sources[key] = r, path.with_suffix("")
    return found, sources


@torch.no_grad()
def inverse_timing(model, n: int, num_classes: int, guidance: float, repeats: int = 2) -> dict:
    """Sequential (KV-cached) against block-Jacobi transporter inverse on the same n sampled u_{t_0}."""
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


def sweep_runs_folder(data: str, preset: str) -> Path:
    """The image bench folder whose runs ``ntm bench guidance --data D --preset P`` scores: that of
    ``ntm bench D --preset P``, or of ``ntm bench D --quick`` for the quick preset."""
    return image_bench_folder(data, preset, preset == QUICK_PRESET)


def guidance_sweep_name(data: str, preset: str = "mnist", seeds: int = 1) -> str:
    """The results name of ``ntm bench guidance --data D [--preset P] [--seeds N]``:
    ``guidance-<bench folder>[-seeds<N>]``, named like the bench whose runs it scores."""
    return f"guidance-{sweep_runs_folder(data, preset).name}{f'-seeds{seeds}' if seeds > 1 else ''}"


def check_preset_runs(runs: Path, preset: str, spec) -> None:
    """Refuse runs in ``runs/{ntm,fm}`` that ``ntm bench --preset P`` would not have trained: their
    networks or training settings differ from the preset's (the step budget may differ, as the
    bench's ``--steps`` allows)."""
    p = get_preset(preset)
    for kind, cfg in (("ntm", p.ntm(spec)), ("fm", p.fm(spec))):
        differ = [k for k in run_differences(runs / kind, cfg, p.train) or [] if k != "steps"]
        if differ:
            raise ConfigError(f"{runs / kind} was not trained with preset {preset} ({', '.join(differ)} differ)")


def run_guidance_sweep(data: str = "fashion", ws: tuple[float, ...] = (0.0, 1.0, 1.5, 2.0, 3.0),
                       out: str | Path | None = None, n_samples: int | None = None, steps: int = 4,
                       progress: bool = True, classifier_steps: int = 3000, preset: str = "mnist",
                       seeds: int = 1) -> dict:
    """Guided class accuracy and FID against the guidance weight w, for the NTM and FM runs of
    ``ntm bench <data> [--preset P]`` (trained there, reused here), both at ``steps`` steps:
    the product rule for NTM, linear CFG for FM; the same real images, classifier and seeds as the
    bench. ``seeds`` > 1 draws every (model, w) again with sample seeds 1 .. seeds-1 (other noise, the
    same labels and real images; seed 0 is the bench's draw), to show how much FID moves between draws.
    -> ``results/<guidance_sweep_name>.json`` (rows: model, steps, guidance, sample_seed, fid,
    class_acc, ...) and a PNG of each metric (mean over seeds) against w."""
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    settings = bench_settings(False, None, n_samples)
    if seeds > 1 and settings["n_samples"] > SAMPLE_SEED_STRIDE - 1000:
        raise ConfigError(f"--seeds > 1 draws at most {SAMPLE_SEED_STRIDE - 1000} samples per row")
    out = Path(out) if out else results_dir() / f"{guidance_sweep_name(data, preset, seeds)}.json"
    runs = sweep_runs_folder(data, preset) / "runs"
    missing = [k for k in ("ntm", "fm") if latest_checkpoint(runs / k) is None]
    if missing:
        named = " --quick" if preset == QUICK_PRESET else f" --preset {preset}" if preset != "mnist" else ""
        raise ConfigError(f"no trained {' or '.join(missing)} run in {runs}; run `ntm bench {data}{named}` first")
    src, spec = labelled_source(data)
    check_preset_runs(runs, preset, spec)
    classifier, clf_info = load_or_train_classifier(src, steps=classifier_steps, progress=progress)
    n = settings["n_samples"]
    real, _ = src.held_out(n, seed=4242)
    extractor = extractor_name(clf_info)
    models = {k: load_model(runs / k, map_location=bench_device()).eval() for k in ("ntm", "fm")}
    results = {"config": {"data": data, "preset": preset, "runs": str(runs), "steps": steps, "n_samples": n,
                          "guidance": list(ws), "seeds": seeds,
                          "classifier": classifier_record(clf_info)}, "rows": []}
    for w in ws:
        for kind in ("ntm", "fm"):
            for seed in range(seeds):
                row, _ = evaluate_image_row(models[kind], steps, w, real, classifier, extractor,
                                            solver="euler" if kind == "fm" else None, sample_seed=seed)
                results["rows"].append({**row, "guidance": w, "sample_seed": seed})
                write_results(out, results)
    folder = out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    for key, label in (("class_acc", "guided class accuracy"), ("fid", "FID")):
        series = {k.upper(): (list(ws), [sum(r[key] for r in results["rows"] if r["model"] == k and r["guidance"] == w)
                                         / seeds for w in ws]) for k in ("ntm", "fm")}
        line_plot(series, folder / f"{key.replace('_', '-')}.png", xlabel="guidance w", ylabel=label,
                  title=f"{data}, {steps} steps")
    return results


# `make demo` trains this preset on MNIST; the demo's bar: guided class accuracy at w = 1
DEMO_PRESET = "mnist-demo"
DEMO_TARGET_ACC = 0.90


def run_demo_bench(out: str | Path | None = None, progress: bool = True, n_samples: int = 500,
                   ws: tuple[float, ...] = (0.0, 1.0, 2.0), steps: int | None = None, classifier_steps: int = 3000,
                   n_bpd: int = 1000) -> dict:
    """The model ``make demo`` trains (preset ``mnist-demo``, trained here or reused from
    ``results/demo/runs/ntm``), scored as the image bench scores NTM@4: class accuracy and FID of
    ``n_samples`` samples at each guidance weight in ``ws``, and its tightest bits/dim bound (T = 4,
    K = 4, ``n_bpd`` test images). The config keeps the training seconds and the demo's bar
    (``DEMO_TARGET_ACC`` at w = 1). -> ``results/demo.json`` (rows as ``ntm bench guidance``'s)."""
    out = Path(out) if out else results_dir() / "demo.json"
    p = get_preset(DEMO_PRESET)
    train_cfg = p.train if steps is None else replace(p.train, steps=steps)
    src, _ = labelled_source("mnist")
    run = out.with_suffix("") / "runs" / "ntm"
    summary = train_or_reuse(run, p.ntm(src.spec()), train_cfg, src, progress)
    classifier, clf_info = load_or_train_classifier(src, steps=classifier_steps, progress=progress)
    real, _ = src.held_out(n_samples, seed=4242)
    extractor = extractor_name(clf_info)
    model = load_model(run, map_location=bench_device()).eval()
    bounds = ntm_bounds(model, src, n_bpd, trajectories=4, steps=4)
    results = {"config": {"data": "mnist", "preset": DEMO_PRESET, "train_steps": train_cfg.steps, "lr": train_cfg.lr,
                          "train_seconds": summary["seconds"], "run": str(run), "n_samples": n_samples,
                          "guidance": list(ws), "target_class_acc": DEMO_TARGET_ACC, "n_bpd": n_bpd,
                          "bpd": bounds["bpd"], "bpd_kind": bounds["bpd_kind"], "classifier": classifier_record(clf_info)},
               "rows": []}
    for w in ws:
        row, _ = evaluate_image_row(model, 4, w, real, classifier, extractor)
        results["rows"].append({**row, "guidance": w, "train_seconds": summary["seconds"]})
        write_results(out, results)
    return results
