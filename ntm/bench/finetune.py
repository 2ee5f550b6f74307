"""``ntm bench finetune``: NTM finetuned from the flow-matching teacher of ``ntm bench <data>``
against the teacher and a from-scratch NTM; ``--ablation``: short finetunes over the predictor scale
and the learning rates."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..config import AUX_WEIGHT, FMConfig, TrainConfig, from_dict, get_preset
from ..errors import CheckpointError, ConfigError
from ..hub import build_model, load_model
from ..io import read_meta, resolve
from ..tools.metrics import classifier_record, extractor_name, load_or_train_classifier
from ..tools.plots import smoothed_curves
from ..train.finetune import finetune_config, finetune_train_config
from ..train.runs import initial_weights, load_teacher
from .common import AFFINE_RUNS_PRESET, QUICK_PRESET, results_dir, same_run, train_or_reuse, write_results, bench_device
from .images import bench_settings, evaluate_image_row, fm_bits_per_dim, labelled_source, ntm_bits_per_dim, save_grid


def paper_objective(cfg: TrainConfig) -> TrainConfig:
    """The finetunes train by the paper's plain NLL (plus the alignment loss), as when they were measured."""
    return replace(cfg, objective="nll", stratified=False, step_weights=(), hybrid_weight=0.0)


def teacher_folder(out: Path, tag: str) -> Path:
    """The FM run of ``ntm bench <data>`` that writes beside ``out``: the finetunes' teacher."""
    return Path(out).parent / tag / "runs" / "fm"


def finetune_preset(quick: bool) -> str:
    """The finetune benches' preset: the fresh transporter is the affine recipe's (the default when
    these benches ran; their runs keep it), and the teacher is the image bench's FM (the same in
    every mnist preset)."""
    return QUICK_PRESET if quick else AFFINE_RUNS_PRESET


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
    settings = bench_settings(quick, {"preset": finetune_preset(quick), **(settings or {})}, n_samples)
    tag = f"{data}-quick" if quick else data
    out = Path(out) if out else results_dir() / f"{data}-finetune{'-quick' if quick else ''}.json"
    folder = out.with_suffix("")
    src, spec = labelled_source(data)
    p = get_preset(settings["preset"])
    if steps is not None:
        p = replace(p, train=replace(p.train, steps=steps))
    base, fm_cfg = p.ntm(spec), p.fm(spec)
    teacher_dir = teacher_folder(out, tag)
    if teacher_dir.exists() and not same_run(teacher_dir, fm_cfg, p.train):
        raise ConfigError(f"{teacher_dir} holds an FM run with other settings than this bench's teacher; "
                          "move it away or re-run `ntm bench " + data + (" --quick" if quick else "") + "` first")
    teacher_sum = train_or_reuse(teacher_dir, fm_cfg, p.train, src, progress)
    ft_steps = max(1, p.train.steps // 4)
    classifier, clf_info = load_or_train_classifier(src, steps=classifier_steps, progress=progress)
    extractor = extractor_name(clf_info)
    n = settings["n_samples"]
    real, _ = src.held_out(n, seed=4242)
    bpd_x, bpd_y = src.held_out(settings["n_bpd"], seed=4343)
    ft_cfg = finetune_config(fm_cfg, settings["preset"])
    ft_train = finetune_train_config(paper_objective(p.train), ft_steps, AUX_WEIGHT, teacher_dir)
    runs, summaries = {}, {"fm": teacher_sum}
    # (label, lambda, learning-rate scale of the pretrained weights: 0 freezes the backbone)
    scale = ft_train.finetune.pretrained_lr_scale
    finetunes = (("ntm-ft", AUX_WEIGHT, scale), ("ntm-ft-aux0", 0.0, scale), ("ntm-ft-frozen", AUX_WEIGHT, 0.0))
    for label, weight, lr_scale in finetunes:
        runs[label] = folder / "runs" / label
        tcfg = replace(ft_train, finetune=replace(ft_train.finetune, aux_weight=weight, pretrained_lr_scale=lr_scale))
        summaries[label] = train_or_reuse(runs[label], ft_cfg, tcfg, src, progress)
    folder.mkdir(parents=True, exist_ok=True)
    smoothed_curves({f"λ = {AUX_WEIGHT:g} (cosine-decayed)": runs["ntm-ft"], "λ = 0": runs["ntm-ft-aux0"]},
                    folder / "finetune-loss-curves.png", xlabel="finetuning step")
    results = {"config": {"data": data, "quick": quick, "teacher_steps": p.train.steps, "finetune_steps": ft_steps,
                          "scratch_steps": p.train.steps + ft_steps, "batch_size": p.train.batch_size,
                          "guidance": guidance, "n_samples": n, "n_bpd": settings["n_bpd"],
                          "bpd_trajectories": settings["bpd_trajectories"], "teacher": str(teacher_dir),
                          "classifier": classifier_record(clf_info)},
               "rows": []}
    teacher = load_model(teacher_dir, map_location=bench_device())
    m = settings["n_bpd_fm"]
    fm_bpd = fm_bits_per_dim(teacher, bpd_x[:m], bpd_y[:m], settings["fm_ode_steps"])
    for k in (4, 50):
        row, images = evaluate_image_row(teacher, k, guidance, real, classifier, extractor, solver="euler")
        row.update(bpd=fm_bpd, bpd_kind="ODE estimate", train_seconds=teacher_sum["seconds"],
                   train_steps=teacher_sum["steps"])
        results["rows"].append(row)
        save_grid(images, folder, "fm", k, "euler", None, guidance)
        write_results(out, results)

    def ntm_row(label: str, aux_weight: float | None = None, backbone: str | None = None) -> None:
        model = load_model(runs[label], map_location=bench_device())
        row, images = evaluate_image_row(model, p.trajectory.T, guidance, real, classifier, extractor)
        extra = teacher_sum["seconds"] if label != "ntm" else 0.0
        row.update(model="ntm" if label == "ntm" else "ntm-ft", aux_weight=aux_weight, backbone=backbone,
                   bpd=ntm_bits_per_dim(model, bpd_x, bpd_y, settings["bpd_trajectories"]), bpd_kind="elbo bound",
                   train_seconds=summaries[label]["seconds"] + extra, train_steps=summaries[label]["steps"])
        results["rows"].append(row)
        save_grid(images, folder, row["model"], p.trajectory.T, None, "inverse", guidance, label=label)
        write_results(out, results)

    for label, weight, lr_scale in finetunes:
        ntm_row(label, weight, "frozen" if lr_scale == 0 else "trained")
    # the from-scratch NTM last: it is the longest training, and the rows above are written by then
    runs["ntm"] = folder / "runs" / "ntm-scratch"
    summaries["ntm"] = train_or_reuse(runs["ntm"], base, replace(p.train, steps=p.train.steps + ft_steps), src, progress)
    ntm_row("ntm")
    return results


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
    tag = f"{data}-quick" if quick else data
    out = Path(out) if out else results_dir() / f"{data}-finetune-ablation{'-quick' if quick else ''}.json"
    folder = out.with_suffix("")
    src, spec = labelled_source(data)
    preset = finetune_preset(quick)
    p = get_preset(preset)
    fm_cfg = p.fm(spec)
    teacher_dir = teacher_folder(out, tag)
    try:
        same = from_dict(FMConfig, read_meta(resolve(teacher_dir), ("ntm-fm",))["config"]) == fm_cfg
    except (CheckpointError, KeyError, TypeError, ValueError):
        same = False
    if not same:
        raise ConfigError(f"no FM teacher with this bench's model in {teacher_dir}; run "
                          f"`ntm bench {data}{' --quick' if quick else ''}` first")
    classifier, clf_info = load_or_train_classifier(src, steps=classifier_steps, progress=progress)
    real, _ = src.held_out(n_samples, seed=4242)
    bpd_x, bpd_y = src.held_out(n_bpd, seed=4343)
    results = {"config": {"data": data, "steps": steps, "aux_weight": AUX_WEIGHT, "n_samples": n_samples, "n_bpd": n_bpd,
                          "bpd_trajectories": 2, "guidance": guidance, "teacher": str(teacher_dir),
                          "classifier": classifier_record(clf_info)}, "rows": []}
    for name, scale, lr, fresh_lr, tau0 in (("step-0", "x0", 0.0, 0.0, 0.01),) + tuple(variants):
        cfg = finetune_config(fm_cfg, preset, scale, tau0)
        if name == "step-0":  # the untrained finetune: the FM Gaussian posterior sampler (widened by B tau_0)
            model = build_model(cfg)
            model.load_state_dict(initial_weights(model, load_teacher(teacher_dir)))
            model = model.eval().to(bench_device())
            summary = {"seconds": 0.0}
        else:
            tcfg = finetune_train_config(replace(paper_objective(p.train), lr=fresh_lr), steps, AUX_WEIGHT, teacher_dir, 1.0)
            tcfg = replace(tcfg, finetune=replace(tcfg.finetune, pretrained_lr_scale=lr / fresh_lr))
            summary = train_or_reuse(folder / "runs" / name, cfg, tcfg, src, progress)
            model = load_model(folder / "runs" / name, map_location=bench_device())
        row, _ = evaluate_image_row(model, p.trajectory.T, guidance, real, classifier, "project classifier")
        with torch.no_grad():
            _, logdet = model.transporter(model.to_tokens(bpd_x), torch.zeros(n_bpd, device=model.device),
                                          model.steps_tensor(n_bpd, model.config.trajectory.T))
        trained = name != "step-0"
        results["rows"].append({"variant": name, "velocity_scale": scale, "tau0": tau0,
                                "pretrained_lr": lr if trained else None, "fresh_lr": fresh_lr if trained else None,
                                "bpd": ntm_bits_per_dim(model, bpd_x, bpd_y, 2), "fid": row["fid"],
                                "class_acc": row["class_acc"], "precision": row["precision"], "recall": row["recall"],
                                "logdet_t0_per_dim": float(logdet.mean()) / spec.dim,
                                "train_seconds": summary["seconds"]})
        write_results(out, results)
    return results


