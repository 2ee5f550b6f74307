"""``ntm bench text``: text-to-image on the compositional canvas, scored the way GenEval scores.

Models (the same preset: backbone, optimiser, batch and step budget; prompts from MiniLM): NTM from
scratch (``ntm``), NTM finetuned from the FM baseline (``ntm-ft``) and the FM baseline (``fm``). Each
draws one canvas per test prompt (``n_prompts`` per task, from all phrasings, held-out ones
included) at guidance ``guidance``: the product rule for NTM, linear CFG for FM.

Scoring: a cell classifier trained on the canvas's own ground truth (digit 0-9 or empty, and colour)
reads both cells of every sample; a sample is correct when the cells meet its prompt
(``ntm.canvas.meets``). ``acc_<task>`` are the per-task accuracies and ``acc_overall`` their mean
(GenEval's overall score); ``acc_heldout_phrasing`` / ``acc_seen_phrasing`` split the prompts by their
phrasing, ``acc_heldout_combination`` / ``acc_seen_combination`` by whether they ask for a (digit,
colour) pair that no training canvas shows. FID is computed in the cell classifier's features (both
cells' 128-d features side by side) against as many test canvases.

Also: a guidance sweep of the NTM (accuracy and FID against w, a PNG), a grid of prompts and samples,
and the training-step cost of text against class labels (captioned MNIST against MNIST, same preset).
Output: ``results/text[-quick].json`` and a folder of pictures.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..canvas import COLOR_NAMES, EMPTY, TASKS, PromptSpec, draw_prompt, meets
from ..config import AUX_WEIGHT, get_preset
from ..errors import CheckpointError, ConfigError
from ..flow_matching import FlowMatching, network_evaluations
from ..hub import build_model, load_model
from ..images import dequantize, open_image_source
from ..io import load_into, read_meta, write_artifact
from ..tools.datasets import open_text_data, text_cache_dir
from ..tools.metrics import CLASSIFIER_FORMAT, ClassifierRecipe, ImageClassifier, fit_classifier, image_quality, same_recipe
from ..tools.plots import image_grid, line_plot
from ..tools.text_encoders import load_encoder
from ..train import make_optimizer
from ..train.finetune import finetune_config, finetune_train_config
from ..train.runs import make_objective
from .common import QUICK_PRESET, bench_device, interleaved_step_seconds, results_dir, train_or_reuse, write_results

ACC_KEYS = tuple(f"acc_{t}" for t in TASKS)
GRID_PROMPTS = ("a red 3", "a 3 and a 7", "two 5s", "a green 4", "a 3 on the left of a 7", "a red 2 and a blue 9",
                "a 1 on the right of a 0", "a yellow 8 and a white 6")


TEXT_BENCH_MODELS = ("ntm", "ntm-ft", "fm")
# the full bench's recipe: the best one measured on the canvas (docs/text.md: fixed sin-cos positions
# took NTM@4 from 6.8% to 35.7% against mnist-affine's learned ones, twice the learning rate on top to 56.0%)
TEXT_PRESET = "mnist-affine-sincos-lr2x"
CONDITIONING = {"concat": "token states appended to the sequence + pooled vector",
                "cross": "token states read by cross-attention in every layer + pooled vector"}


def text_settings(quick: bool, overrides: dict | None = None) -> dict:
    base = ({"preset": QUICK_PRESET, "n_prompts": 20, "guidance": 2.0, "sweep": (0.0, 1.0, 2.0, 4.0),
             "cell_steps": 1500, "probe_steps": 6} if quick else
            {"preset": TEXT_PRESET, "n_prompts": 100, "guidance": 2.0, "sweep": (0.0, 1.0, 2.0, 3.0, 4.0),
             "cell_steps": 3000, "probe_steps": 12})
    base.update(text_attention="concat", models=TEXT_BENCH_MODELS, patch=4)
    return {**base, **{k: v for k, v in (overrides or {}).items() if v is not None}}


# ------------------------------------------------------------------------------ cell classifier
class CanvasFeatures(nn.Module):
    """FID features of a canvas (B, 3, 28, 56): the cell classifier's features of both cells side by side."""

    def __init__(self, cells: ImageClassifier):
        super().__init__()
        self.cells = cells
        self.num_features = 2 * cells.num_features

    def features(self, x: Tensor) -> Tensor:
        return torch.cat([self.cells.features(x[..., :28]), self.cells.features(x[..., 28:])], 1)


def split_cells(images: Tensor) -> Tensor:
    """(B, 3, 28, 56) -> (2B, 3, 28, 28): left cells, then right cells."""
    return torch.cat([images[..., :28], images[..., 28:]])


# the cell classifier's training besides its steps (the values it has always been trained with)
CELL_RECIPE = ClassifierRecipe(lr=1e-3, batch=128, seed=0, feature_images=4000)


def train_cell_classifier(images: Tensor, cells: Tensor, steps: int, recipe: ClassifierRecipe = CELL_RECIPE,
                          progress: bool = False):
    """Digit-or-empty (11 logits) and colour (5 logits) of a cell, from uint8 canvases (M, 3, 28, 56) and
    their cells (M, 2, 2). Returns the classifier and its accuracies on a held-out random 10%."""
    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    x, lab = split_cells(images), torch.cat([cells[:, 0], cells[:, 1]])
    perm = torch.randperm(len(x), generator=g)
    n_val = len(x) // 10
    val, tr = perm[:n_val], perm[n_val:]
    clf = ImageClassifier(3, 11 + len(COLOR_NAMES))

    def batch():
        idx = tr[torch.randint(len(tr), (recipe.batch,), generator=g)]
        return dequantize(x[idx], g), lab[idx]

    def loss_fn(logits: Tensor, cell: Tensor) -> Tensor:  # digit or empty, and the colour of a digit
        d, c = cell[:, 0], cell[:, 1]
        loss = nn.functional.cross_entropy(logits[:, :11], d)
        has = d != EMPTY
        return loss + nn.functional.cross_entropy(logits[has, 11:], c[has]) if has.any() else loss

    fit_classifier(clf, batch, loss_fn, steps, lambda: dequantize(x[tr[:recipe.feature_images]], g), progress,
                   desc="cell classifier", lr=recipe.lr)
    with torch.no_grad():
        pred = read_cells_of(clf, dequantize(x[val], g))
    d, c = lab[val, 0], lab[val, 1]
    has = d != EMPTY
    return clf, {"digit_acc": float((pred[:, 0] == d).float().mean()),
                 "color_acc": float((pred[has, 1] == c[has]).float().mean())}


@torch.no_grad()
def read_cells_of(clf: ImageClassifier, cells_images: Tensor) -> Tensor:
    """(M, 3, 28, 28) in [-1, 1] -> (M, 2): digit or EMPTY, colour index (-1 for empty)."""
    out = []
    for lo in range(0, len(cells_images), 1000):
        logits = clf(cells_images[lo:lo + 1000])
        d = logits[:, :11].argmax(1)
        c = torch.where(d == EMPTY, torch.full_like(d, -1), logits[:, 11:].argmax(1))
        out.append(torch.stack([d, c], 1))
    return torch.cat(out)


def read_canvases(clf: ImageClassifier, images: Tensor) -> list[list[tuple[int, int]]]:
    """What the cell classifier sees in canvases (B, 3, 28, 56) in [-1, 1]: [(digit, colour)] * 2 each."""
    both = read_cells_of(clf, split_cells(images.float()))
    B = images.shape[0]
    return [[tuple(both[i].tolist()), tuple(both[B + i].tolist())] for i in range(B)]


def load_or_train_cell_classifier(src, steps: int, progress: bool) -> tuple[ImageClassifier, dict]:
    """The cell classifier of ``steps`` steps (``CELL_RECIPE``), from the cache or trained and cached
    now, and its record (accuracies, steps, recipe)."""
    # one folder per training budget: the quick and the full bench do not evict each other's classifier
    folder = text_cache_dir().parent / "classifiers" / f"canvas-cells-{len(src.images)}-{steps}"
    if (folder / "config.json").is_file():
        try:
            info = read_meta(folder, (CLASSIFIER_FORMAT,))["config"]
            if info.get("steps") == steps and info.get("kind") == "canvas-cells" and same_recipe(info, CELL_RECIPE,
                                                                                                 CELL_RECIPE):
                clf = ImageClassifier(3, 11 + len(COLOR_NAMES))
                load_into(clf, folder / "model.safetensors")
                return clf.eval(), {**info, "recipe": asdict(CELL_RECIPE)}
        except (CheckpointError, KeyError, TypeError):
            pass
    clf, acc = train_cell_classifier(src.images, src.train_cells, steps, progress=progress)
    info = {"name": "canvas cells", "kind": "canvas-cells", "steps": steps, "recipe": asdict(CELL_RECIPE), "channels": 3,
            "num_classes": 11 + len(COLOR_NAMES), **acc}
    write_artifact(folder, CLASSIFIER_FORMAT, info, {"model": clf.state_dict()})
    return clf, info


# ----------------------------------------------------------------------------------- evaluation
def evaluation_prompts(n_per_task: int, seed: int = 2024) -> list[PromptSpec]:
    """``n_per_task`` test prompts of every task (all phrasings and colour pairs allowed)."""
    g = torch.Generator().manual_seed(seed)
    return [draw_prompt(g, train=False, task=task) for task in TASKS for _ in range(n_per_task)]


def generate(model, prompts: list[str], steps: int, guidance: float, solver: str = "euler", chunk: int = 200,
             seed: int = 0) -> tuple[Tensor, float]:
    """One sample per prompt -> (images (P, 3, 28, 56) in [-1, 1], seconds)."""
    out, seconds = [], 0.0
    for lo in range(0, len(prompts), chunk):
        part = prompts[lo:lo + chunk]
        g = torch.Generator().manual_seed(seed + lo)
        t0 = time.perf_counter()
        if isinstance(model, FlowMatching):
            x = model.sample(len(part), prompt=part, guidance=guidance, steps=steps, solver=solver, generator=g)
        else:
            x = model.sample(len(part), prompt=part, guidance=guidance, steps=steps, generator=g, decode="inverse")
        seconds += time.perf_counter() - t0
        out.append(x.cpu().clamp(-1, 1))
    return torch.cat(out), seconds


def accuracy_row(specs: list[PromptSpec], read: list) -> dict:
    ok = torch.tensor([meets(s, c) for s, c in zip(specs, read)], dtype=torch.float)
    row = {}
    for task in TASKS:
        mask = torch.tensor([s.task == task for s in specs])
        row[f"acc_{task}"] = float(ok[mask].mean()) if mask.any() else float("nan")
    row["acc_overall"] = sum(row[k] for k in ACC_KEYS) / len(ACC_KEYS)
    for name, flag in (("phrasing", lambda s: s.heldout_phrasing), ("combination", lambda s: s.heldout_combination)):
        held = torch.tensor([flag(s) for s in specs])
        row[f"acc_heldout_{name}"] = float(ok[held].mean()) if held.any() else float("nan")
        row[f"acc_seen_{name}"] = float(ok[~held].mean()) if (~held).any() else float("nan")
        row[f"n_heldout_{name}"] = int(held.sum())
    return row


def evaluate(model, kind: str, steps: int, guidance: float, specs: list[PromptSpec], real: Tensor, clf,
             solver: str = "euler") -> tuple[dict, Tensor]:
    images, seconds = generate(model, [s.caption for s in specs], steps, guidance, solver)
    nfe = network_evaluations(steps, solver, guidance > 0) if kind == "fm" else steps * (2 if guidance > 0 else 1)
    row = {"model": kind, "steps": steps, "solver": solver if kind == "fm" else None, "guidance": guidance, "nfe": nfe,
           **accuracy_row(specs, read_canvases(clf, images)),
           **image_quality(real, images, CanvasFeatures(clf).eval(), kid_subset=min(500, len(specs))),
           "img_per_s": len(specs) / seconds, "n_prompts": len(specs)}
    return row, images


JOBS = (("ntm", 4, "euler"), ("ntm-ft", 4, "euler"), ("fm", 4, "euler"), ("fm", 50, "euler"))
# what makes two runs of the bench one comparison: rows of one may stand beside rows of the other
SAME_COMPARISON = ("data", "quick", "preset", "train_steps", "batch_size", "text_encoder", "text_attention", "n_prompts",
                   "guidance", "patch")
# what a results file written before a key existed means by it
COMPARISON_DEFAULTS = {"patch": 4}


def in_job_order(rows: list[dict]) -> list[dict]:
    order = [(k, s) for k, s, _ in JOBS]
    return sorted(rows, key=lambda r: order.index((r["model"], r["steps"])))


def kept_rows(out: Path, config: dict, kinds: tuple[str, ...]) -> dict:
    """From an earlier run of this bench in ``out`` that made the same comparison (``SAME_COMPARISON``
    and a cell classifier of the same training), the rows of the models not run now, and the
    from-scratch NTM's sweep and step cost when it is not run now -> {"rows": [...], "config": {...}}
    (empty when there is no such run)."""
    try:
        old = json.loads(Path(out).read_text())
        same = all(old["config"].get(k, COMPARISON_DEFAULTS.get(k)) == config.get(k) for k in SAME_COMPARISON) and \
            old["config"]["cell_classifier"]["steps"] == config["cell_classifier"]["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not same:
        return {}
    rows = [r for r in old.get("rows", []) if r.get("model") not in kinds]
    extra = {}
    if "ntm" not in kinds:
        extra = {k: old["config"][k] for k in ("guidance_sweep", "step_cost") if k in old["config"]}
    if "ntm-ft" not in kinds and any(r["model"] == "ntm-ft" for r in rows):
        extra["finetune_steps"] = old["config"].get("finetune_steps")
    return {"rows": rows, "config": extra} if rows else {}


def text_step_cost(preset: str, encoder, steps: int, text_attention: str = "concat", patch: int = 4,
                   warmup: int = 3, rounds: int = 4) -> dict:
    """Seconds per NTM training step with prompts (captioned MNIST, read by ``text_attention``)
    against class labels (MNIST), same preset, patch size and batch size. The two are timed in
    ``rounds`` interleaved turns (labels, then text) of steps / rounds steps each, so that both see
    the same machine load even when another job comes or goes."""
    p = get_preset(preset)
    device = bench_device()
    jobs = {}
    for name, src in (("labels", open_image_source("mnist", patch=patch)),
                      ("text", open_text_data("captioned-mnist", encoder=encoder, patch=patch))):
        torch.manual_seed(0)
        spec = replace(src.spec(), text_attention=text_attention) if name == "text" else src.spec()
        model = build_model(p.ntm(spec)).to(device)
        if name == "text":
            model.set_null_prompt(src.null_prompt())
        objective = make_objective(model, p.train, device)
        opt, _ = make_optimizer(model, p.train)
        jobs[name] = (model, objective, opt, src, torch.Generator().manual_seed(0))
    seconds, timed = interleaved_step_seconds(jobs, p.train.batch_size, steps, warmup, rounds)
    out = {f"{name}_seconds_per_step": seconds[name] for name in jobs}
    out["steps_timed"] = timed
    out["text_over_labels"] = out["text_seconds_per_step"] / out["labels_seconds_per_step"]
    return out


def run_text_bench(out: str | Path | None = None, quick: bool = False, progress: bool = True,
                   settings: dict | None = None, encoder=None) -> dict:
    """Train (or reuse) the three models on the canvas and write the compositional table (module doc)."""
    settings = text_settings(quick, settings)
    out = Path(out) if out else results_dir() / ("text-quick.json" if quick else "text.json")
    folder = out.with_suffix("")
    encoder = encoder or load_encoder("minilm")
    src = open_text_data("canvas", encoder=encoder, patch=settings["patch"])
    spec = replace(src.spec(), text_attention=settings["text_attention"])
    p = get_preset(settings["preset"])
    train = p.train if settings.get("train_steps") is None else replace(p.train, steps=settings["train_steps"])
    kinds = tuple(settings["models"])
    if not kinds or set(kinds) - set(TEXT_BENCH_MODELS) or ("ntm-ft" in kinds and "fm" not in kinds):
        raise ConfigError(f"text bench models: some of {', '.join(TEXT_BENCH_MODELS)} (ntm-ft needs fm); got {', '.join(kinds)}")
    runs = {k: folder / "runs" / k for k in TEXT_BENCH_MODELS if k in kinds}
    seconds = {}
    for kind, cfg in (("ntm", p.ntm(spec)), ("fm", p.fm(spec))):
        if kind in kinds:
            seconds[kind] = train_or_reuse(runs[kind], cfg, train, src, progress)["seconds"]
    # the finetune: a quarter of the teacher's steps, as in `ntm bench finetune`
    ft_steps = max(1, train.steps // 4)
    if "ntm-ft" in kinds:
        ft_train = finetune_train_config(train, ft_steps, AUX_WEIGHT, runs["fm"])
        seconds["ntm-ft"] = train_or_reuse(runs["ntm-ft"], finetune_config(p.fm(spec), settings["preset"]), ft_train,
                                           src, progress)["seconds"]
    clf, clf_info = load_or_train_cell_classifier(src, settings["cell_steps"], progress)
    specs = evaluation_prompts(settings["n_prompts"])
    real = dequantize(src.test[:len(specs)], torch.Generator().manual_seed(5))
    results = {"config": {"quick": quick, "data": "canvas", "patch": spec.patch, "preset": settings["preset"],
                          "train_steps": train.steps,
                          "batch_size": train.batch_size, "finetune_steps": ft_steps if "ntm-ft" in kinds else None,
                          "text_encoder": spec.text_encoder, "text_attention": spec.text_attention,
                          "conditioning": CONDITIONING[spec.text_attention],
                          "n_prompts": len(specs), "cell_classifier": clf_info, "guidance": settings["guidance"]},
               "rows": []}
    kept = kept_rows(out, results["config"], kinds)
    if kept:  # the models not run now keep their rows (and the NTM's sweep and step cost) from the last run
        results["config"]["rows_kept_from_earlier_run"] = sorted({r["model"] for r in kept["rows"]})
        results["config"].update(kept["config"])
    models = {k: load_model(r, map_location=bench_device()).eval() for k, r in runs.items()}
    for m in models.values():
        m.attach_text_encoder(src.encoder.encoder)
    for kind, steps, solver in [j for j in JOBS if j[0] in kinds]:
        row, images = evaluate(models[kind], "fm" if kind == "fm" else kind, steps, settings["guidance"], specs, real, clf,
                               solver)
        row["model"], row["train_seconds"] = kind, seconds[kind]
        results["rows"].append(row)
        results["rows"] = in_job_order(results["rows"] + [r for r in kept.get("rows", []) if r not in results["rows"]])
        image_grid(images[::max(1, len(specs) // 60)][:60].numpy(), folder / f"samples-{kind}-{steps}.png",
                   title=f"{kind} {steps} steps, guidance {settings['guidance']:g}", ncol=6)
        write_results(out, results)
    sweep = []
    if "ntm" not in kinds:  # the sweep, the grid and the step cost are the from-scratch NTM's
        results["rows"] = in_job_order(results["rows"] + [r for r in kept.get("rows", []) if r not in results["rows"]])
        write_results(out, results)
        return results
    for w in settings["sweep"]:
        row, _ = evaluate(models["ntm"], "ntm", 4, w, specs, real, clf)
        sweep.append({"guidance": w, "acc_overall": row["acc_overall"], "fid": row["fid"]})
    results["config"]["guidance_sweep"] = sweep
    ws = [r["guidance"] for r in sweep]
    line_plot({"overall accuracy": (ws, [r["acc_overall"] for r in sweep])}, folder / "guidance-accuracy.png",
              xlabel="guidance w", ylabel="overall compositional accuracy", title="NTM@4 on the canvas")
    line_plot({"FID (cell features)": (ws, [r["fid"] for r in sweep])}, folder / "guidance-fid.png",
              xlabel="guidance w", ylabel="FID", title="NTM@4 on the canvas")
    prompt_grid(models["ntm"], folder / "prompt-grid.png", settings["guidance"])
    results["config"]["step_cost"] = text_step_cost(settings["preset"], encoder, settings["probe_steps"],
                                                    spec.text_attention, spec.patch)
    write_results(out, results)
    return results


def prompt_grid(model, png: Path, guidance: float, per_prompt: int = 6) -> None:
    """One row of samples per prompt of ``GRID_PROMPTS`` (their order is listed in the docs)."""
    prompts = [p for p in GRID_PROMPTS for _ in range(per_prompt)]
    images, _ = generate(model, prompts, 4, guidance)
    image_grid(images.numpy(), png, title=f"NTM, 4 steps, guidance {guidance:g}: one prompt per row", ncol=per_prompt)
