"""``ntm bench ood`` and ``ntm bench bayes``: what NTM's likelihood is worth to a user, against the
tools a user would otherwise pick.

Models: the NTM and the FM baseline of the image bench (``results/<data>[-quick]/runs/{ntm,fm}``,
trained here with the same preset if missing) and a Glow from ``normflows`` trained on the same data
with the same step budget and batch size (``results/ood/runs/glow-<data>``).

Out-of-distribution detection (``results/ood[-quick].json``): models trained on MNIST score MNIST test
images (in) against Fashion-MNIST, uniform noise, constant images and vertically flipped and inverted
MNIST (out); models trained on Fashion-MNIST score Fashion test images against MNIST. All images are
uniformly dequantised 8-bit values, and every density is unconditional (NTM and FM: the null label).
The statistics (larger = more anomalous):

* ``ntm-bound``: the ELBO bound on -log p(x) from one trajectory (T network evaluations);
* ``ntm-iw``: the importance-weighted bound from K trajectories (T K evaluations);
* ``ntm-steps``: the squared Mahalanobis distance of the vector of per-step terms of the one-trajectory
  bound (and its prior term) under a Gaussian fitted to the same vectors of training images
  (``ntm.scoring.StepTypicality``): a typicality test across the trajectory's noise scales;
* ``ntm-steps-k``: the same test on the step terms averaged over ``steps_k`` trajectories (less
  trajectory noise; T steps_k evaluations); each NTM row records its ``trajectories``;
* ``ntm-noisy``: the bound on -log p(x_{t_1}) of the data at the trajectory's first noisy level, read
  off the same ``steps_k`` trajectories (``ntm.scoring.noisy_level_bound``): the likelihood without
  the finest step, where pixel-level detail (the "simplicity" of MNIST) is paid for;
* ``fm-ode``: FM's ODE estimate of -log p(x) (Heun, Hutchinson; 2 evaluations and 2 vector-Jacobian
  products per step), on a smaller subset;
* ``glow``: Glow's exact -log p(x) (one pass).

Bayes classification (``results/bayes[-quick].json``): argmax_y log p(x | y) + log p(y), uniform prior,
with NTM's IW bound (``ntm-bayes``) and FM's ODE estimate (common random numbers across classes),
against the project's CNN classifier; accuracy and expected calibration error (15 bins). The row
``ntm-bayes-noisy`` applies the same rule to the data noised to the trajectory's first level,
log p(x_{t_1} | y) averaged over the same trajectories (no extra network evaluations);
``ntm-bayes-levels`` to the mean over every noisy level j = 1..T-1 of log p(x_{t_j} | y), from the
same trajectories again: each level is a differently noised view of x, and their mean pools them.

The IW bound's tightness against K goes to ``results/ood/iw-vs-k.png`` (MNIST NTM) and its numbers into
the OOD results' config. ``ntm bench tightness`` (``results/tightness.json``) gives the bound of one
multi-T image model against T and K.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import get_preset
from ..errors import CheckpointError, ConfigError
from ..hub import load_model
from ..io import read_meta, resolve
from ..images import dequantize, load_named
from ..likelihood import bits_per_dim, coupling_gap
from ..scoring import (StepTypicality, bayes_posterior, class_log_likelihoods, level_mean, noisy_level_bound,
                       ntm_class_log_likelihoods, step_features)
from ..tools.glow import GlowConfig, glow_nll, glow_or_train
from ..tools.metrics import calibration_error, classifier_accuracy, detection_scores, load_or_train_classifier
from ..tools.plots import line_plot
from .common import QUICK_PRESET, bench_device, image_bench_folder, results_dir, train_or_reuse, write_results
from .images import labelled_source

OUT_SETS = {"mnist": ("fashion", "noise", "constant", "mnist-vflip", "mnist-inverted"), "fashion": ("mnist",)}
IW_KS = (1, 2, 4, 8, 16, 32, 64)


def ood_settings(quick: bool, overrides: dict | None = None) -> dict:
    """Sample counts and budgets of the full or the quick bench, with ``overrides`` applied."""
    return {**_base_settings(quick), **(overrides or {})}


def _base_settings(quick: bool) -> dict:
    if quick:
        return {"preset": QUICK_PRESET, "n": 200, "n_fit": 400, "n_fm": 24, "fm_ode_steps": 16, "iw_k": 4,
                "glow": GlowConfig(steps=300, blocks=4, hidden=32), "n_bayes": 100, "n_bayes_fm": 10,
                "bayes_k": 2, "n_tight": 50, "ks": (1, 4, 16), "classifier_steps": 3000, "steps_k": 2}
    # sized for 2 CPU cores: FM's ODE likelihood (64 Heun steps with a vector-Jacobian product each)
    # costs about a second per image, so it scores fewer images than the one-pass statistics.
    # The default recipe's runs (results/<data>/runs); --preset mnist-affine: results/<data>-mnist-affine/runs
    return {"preset": "mnist", "n": 500, "n_fit": 2000, "n_fm": 100, "fm_ode_steps": 64, "iw_k": 4,
            "glow": GlowConfig(), "n_bayes": 1000, "n_bayes_fm": 40, "bayes_k": 8, "n_tight": 100, "ks": IW_KS, "steps_k": 16,
            "classifier_steps": 3000}


def image_set(name: str, n: int, seed: int = 4242) -> torch.Tensor:
    """n dequantised 28x28 images in [-1, 1): a test split ("mnist", "fashion"), "noise" (uniform
    pixels), "constant" (one uniform level per image), "mnist-vflip" (upside down) or "mnist-inverted"."""
    g = torch.Generator().manual_seed(seed)
    if name in ("mnist", "fashion"):
        q = load_named(name, "test")[0][:n]
    elif name == "noise":
        q = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    elif name == "constant":
        q = torch.randint(0, 256, (n, 1, 1, 1), generator=g, dtype=torch.uint8).expand(n, 1, 28, 28).contiguous()
    elif name == "mnist-vflip":
        q = load_named("mnist", "test")[0][:n].flip(2)
    elif name == "mnist-inverted":
        q = 255 - load_named("mnist", "test")[0][:n]
    else:
        raise ValueError(f"unknown image set '{name}'")
    return dequantize(q, g)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_models(data: str, quick: bool, settings: dict, progress: bool, glow: bool = True) -> tuple[dict, dict]:
    """The NTM and FM runs of the image bench on ``data`` (trained now if missing) and, with ``glow``,
    the Glow. -> (models {"ntm", "fm"[, "glow"]}, info)."""
    src, spec = labelled_source(data)
    p = get_preset(settings["preset"])
    folder = image_bench_folder(data, settings["preset"], quick)
    models, info = {}, {}
    for kind, cfg in (("ntm", p.ntm(spec)), ("fm", p.fm(spec))):
        summary = train_or_reuse(folder / "runs" / kind, cfg, p.train, src, progress)
        models[kind] = load_model(folder / "runs" / kind, map_location=bench_device()).eval()
        info[kind] = {"run": str(folder / "runs" / kind), "train_seconds": summary["seconds"]}
    if not glow:
        return models, info
    glow_cfg = replace(settings["glow"], steps=p.train.steps if not quick else settings["glow"].steps,
                       batch_size=p.train.batch_size)
    glow_dir = results_dir() / ("ood-quick" if quick else "ood") / "runs" / f"glow-{data}"
    models["glow"], meta = glow_or_train(glow_dir, glow_cfg, src, progress=progress)
    info["glow"] = {"run": str(glow_dir), "train_seconds": meta.get("train_seconds"),
                    "parameters": sum(q.numel() for q in models["glow"].parameters()),
                    "levels": glow_cfg.levels, "blocks": glow_cfg.blocks, "hidden": glow_cfg.hidden,
                    "steps": glow_cfg.steps, "batch_size": glow_cfg.batch_size}
    return models, info


def ood_statistics(models: dict, x: torch.Tensor, settings: dict, typicality: StepTypicality | None,
                   fm: bool, typicality_k: StepTypicality | None = None) -> dict:
    """Every statistic of images x (B, 1, 28, 28): {method: (scores (B,), seconds)} and mean bits/dim."""
    ntm = models["ntm"]
    out = {}
    one, s1 = _timed(lambda: ntm.score(x, num_trajectories=1, generator=torch.Generator().manual_seed(1)))
    out["ntm-bound"] = (one["elbo"], s1)
    if typicality is not None:
        out["ntm-steps"] = (typicality.distance(step_features(one)), s1)
    iw, s2 = _timed(lambda: ntm.score(x, num_trajectories=settings["iw_k"], generator=torch.Generator().manual_seed(2)))
    out["ntm-iw"] = (iw["iw"], s2)
    if typicality_k is not None:  # the same test on step terms averaged over steps_k trajectories
        many, s5 = _timed(lambda: ntm.score(x, num_trajectories=settings["steps_k"],
                                            generator=torch.Generator().manual_seed(4)))
        out["ntm-steps-k"] = (typicality_k.distance(step_features(many)), s5)
        out["ntm-noisy"] = (noisy_level_bound(many), s5)  # the same trajectories, no more evaluations
    if fm:
        m = settings["n_fm"]
        res, s3 = _timed(lambda: models["fm"].score(x[:m], steps=settings["fm_ode_steps"],
                                                    generator=torch.Generator().manual_seed(3)))
        out["fm-ode"] = (res["nll"], s3)
    if "glow" in models:
        nll, s4 = _timed(lambda: glow_nll(models["glow"], x))
        out["glow"] = (nll, s4)
    return out


def network_evaluations_per_image(method: str, T: int, settings: dict) -> int:
    return {"ntm-bound": T, "ntm-steps": T, "ntm-iw": T * settings["iw_k"], "ntm-steps-k": T * settings["steps_k"],
            "ntm-noisy": T * settings["steps_k"], "glow": 1, "fm-ode": 2 * settings["fm_ode_steps"]}[method]


def trajectories_of(method: str, settings: dict) -> int | None:
    """How many trajectories per image an NTM statistic averages (None for the other methods)."""
    return {"ntm-bound": 1, "ntm-steps": 1, "ntm-iw": settings["iw_k"], "ntm-steps-k": settings["steps_k"],
            "ntm-noisy": settings["steps_k"]}.get(method)


def previous_results(out: Path, config: dict, field: str, running, keys: tuple[str, ...] | None = None) -> tuple[list, dict]:
    """The rows (and config) of an earlier run of ``out`` with the same settings (``keys`` of
    ``config``, default all), for the data sets (``field`` values) not re-run now; nothing when the
    file is missing or those settings differ."""
    try:
        prev = json.loads(out.read_text())
        same = all(prev["config"].get(k) == json.loads(json.dumps(v)) for k, v in config.items()
                   if k != "models" and (keys is None or k in keys))
    except (OSError, ValueError, KeyError, TypeError):
        return [], {}
    if not same:
        return [], {}
    return [r for r in prev.get("rows", []) if r.get(field) not in running], prev["config"]


def run_ood_bench(out: str | Path | None = None, quick: bool = False, progress: bool = True,
                  settings: dict | None = None, out_sets: dict | None = None, only: tuple[str, ...] | None = None,
                  glow: bool = True) -> dict:
    """Write the OOD detection table and the IW tightness figure (see the module doc). ``settings``
    override the sizes; ``out_sets`` {trained on: (out-of-distribution sets, ...)} the pairs; ``only``
    restricts the run to some training sets and keeps the earlier rows of the others; ``glow`` False
    leaves the Glow out (no training, no rows)."""
    settings = ood_settings(quick, settings)
    out = Path(out) if out else results_dir() / ("ood-quick.json" if quick else "ood.json")
    pairs = {k: v for k, v in (out_sets or OUT_SETS).items() if only is None or k in only}
    bayes_only = ("glow", "n_bayes", "n_bayes_fm", "bayes_k", "classifier_steps")
    results = {"config": {"quick": quick, **{k: v for k, v in settings.items() if k not in bayes_only},
                          "dequantisation": "uniform", "conditioning": "none (null label)", "models": {}},
               "rows": []}
    # the settings a detection row depends on (the tightness figures have their own)
    row_keys = ("quick", "preset", "n", "n_fit", "n_fm", "fm_ode_steps", "iw_k", "dequantisation", "conditioning")
    kept, old = previous_results(out, results["config"], "train_data", tuple(pairs), row_keys)
    results["rows"] = kept
    results["config"]["models"] = {k: v for k, v in old.get("models", {}).items() if k not in pairs}
    if "iw_vs_k" in old and "mnist" not in pairs:
        results["config"]["iw_vs_k"] = old["iw_vs_k"]
    n = settings["n"]
    for train_data, sets in pairs.items():
        models, info = bench_models(train_data, quick, settings, progress, glow=glow)
        results["config"]["models"][train_data] = info
        src, _ = labelled_source(train_data)
        fit_x = dequantize(src.images[-settings["n_fit"]:], torch.Generator().manual_seed(7))  # training images
        typicality = StepTypicality(step_features(models["ntm"].score(
            fit_x, num_trajectories=1, generator=torch.Generator().manual_seed(1))))
        typicality_k = StepTypicality(step_features(models["ntm"].score(
            fit_x, num_trajectories=settings["steps_k"], generator=torch.Generator().manual_seed(2))))
        T = models["ntm"].config.trajectory.T
        stats_in = ood_statistics(models, image_set(train_data, n), settings, typicality, fm=True,
                                  typicality_k=typicality_k)
        for ood in sets:
            stats_out = ood_statistics(models, image_set(ood, n, seed=4343), settings, typicality, fm=True,
                                       typicality_k=typicality_k)
            for method, (s_in, sec_in) in stats_in.items():
                s_out, sec_out = stats_out[method]
                row = {"train_data": train_data, "ood_data": ood, "method": method,
                       **detection_scores(s_in, s_out), "nfe_per_image": network_evaluations_per_image(method, T, settings),
                       "seconds_per_1000": 1000 * (sec_in + sec_out) / (len(s_in) + len(s_out)),
                       "n_in": len(s_in), "n_out": len(s_out), "trajectories": trajectories_of(method, settings)}
                if method in ("ntm-bound", "ntm-iw", "fm-ode", "glow"):
                    row["bpd_in"] = float(bits_per_dim(s_in.mean(), 784))
                    row["bpd_out"] = float(bits_per_dim(s_out.mean(), 784))
                results["rows"].append(row)
            write_results(out, results)
        if train_data == "mnist" and settings["ks"]:
            results["config"]["iw_vs_k"] = iw_tightness(models["ntm"], image_set("mnist", settings["n_tight"], seed=99),
                                                        settings["ks"], out.with_suffix("") / "iw-vs-k.png")
            write_results(out, results)
    return results


def bench_run_model(run: str | Path | None, data: str, Ts: tuple[int, ...] | None, what: str):
    """The NTM of ``run`` (default: the NTM of ``ntm bench <data>``) and the grids to score (default:
    every trained T). -> (run folder, model, Ts); a missing run or an untrained T is one clear error."""
    run = Path(run) if run else image_bench_folder(data, "mnist", quick=False) / "runs" / "ntm"
    if not (run / "config.json").is_file() and not (run / "checkpoints").is_dir():
        raise CheckpointError(f"no {what} in {run}: train one with `ntm bench {data}` or name it with --run")
    model = load_model(run, map_location=bench_device()).eval()
    Ts = Ts or model.train_Ts
    if set(Ts) - set(model.train_Ts):
        raise ConfigError(f"{run} was trained for T in {list(model.train_Ts)}; got T = {list(Ts)}")
    return run, model, Ts


def run_tightness_bench(out: str | Path | None = None, quick: bool = False, progress: bool = True,
                        run: str | Path | None = None, data: str = "mnist", n: int | None = None,
                        ks: tuple[int, ...] | None = None, Ts: tuple[int, ...] | None = None) -> dict:
    """The bounds of one multi-T image model against T and K (``results/tightness[-quick].json``): per
    (T, K) the mean uniform ELBO and IW bounds in bits/dim on ``n`` test images (the same images for
    every cell; fresh trajectories per cell), their standard errors, and ``iw-vs-t.png``. ``run``
    defaults to the NTM of ``ntm bench <data>`` (the default recipe trains over T in {4, 8, 16})."""
    out = Path(out) if out else results_dir() / ("tightness-quick.json" if quick else "tightness.json")
    run, model, Ts = bench_run_model(run, data, Ts, "multi-T model")
    if not model.multi_T:
        raise CheckpointError(f"{run} was trained for T = {model.config.trajectory.T} only; the bound against T "
                              "needs a multi-T model (train_Ts)")
    n = n or (20 if quick else 200)
    ks = ks or ((1, 4) if quick else (1, 4, 16))
    x = image_set(data, n, seed=99)
    rows = []
    bar = tqdm(total=len(Ts) * len(ks), desc="bounds", disable=not progress, dynamic_ncols=True)
    for T in Ts:
        for K in ks:
            rows.append({"data": data, "model": "ntm-multi-t", "steps": T, "trajectories": K,
                         **mean_bounds(model, x, K, seed=1000 * T + K, steps=T)})
            bar.update(1)
    bar.close()
    results = {"config": {"quick": quick, "data": data, "run": str(run), "train_Ts": list(Ts),
                          "ks": list(ks), "n": n, "bound": "uniformly dequantised, bits/dim"}, "rows": rows}
    out.with_suffix("").mkdir(parents=True, exist_ok=True)
    line_plot({f"T = {T}": (list(ks), [r["iw_bpd"] for r in rows if r["steps"] == T]) for T in Ts},
              out.with_suffix("") / "iw-vs-t.png", xlabel="trajectories K", ylabel="IW bound, bits/dim", log_x=True,
              errors={f"T = {T}": [r["se"] for r in rows if r["steps"] == T] for T in Ts},
              title=f"one multi-T model ({data}): the bound against T and K")
    write_results(out, results)
    return results


def run_coupling_bench(out: str | Path | None = None, quick: bool = False, progress: bool = True,
                       run: str | Path | None = None, data: str = "mnist", n: int | None = None,
                       Ts: tuple[int, ...] | None = None) -> dict:
    """Why finer grids loosen the bound (``results/coupling[-quick].json``): per trained T and level
    of the grid, the Hadamard gap of the transporter's Jacobian (``ntm.likelihood.coupling_gap``),
    the floor a fine step pays at that level for the coupling between dimensions, in nats/dim, on
    ``n`` test images (one trajectory each), and per T the sum over the noisy levels. ``run``
    defaults to the NTM of ``ntm bench <data>``."""
    out = Path(out) if out else results_dir() / ("coupling-quick.json" if quick else "coupling.json")
    run, model, Ts = bench_run_model(run, data, Ts, "NTM")
    n = n or (1 if quick else 4)
    x = image_set(data, n, seed=99)
    rows, sums = [], {}
    for T in tqdm(Ts, desc="coupling gap", disable=not progress, dynamic_ncols=True):
        t, gap = coupling_gap(model, x, steps=T, generator=torch.Generator().manual_seed(7 * T))
        for k in range(T):
            g = gap[:, k]
            rows.append({"data": data, "model": "ntm", "steps": T, "level": k, "t": float(t[k]),
                         "gap_nats": float(g.mean()), "se": float(g.std() / n ** 0.5) if n > 1 else None, "n": n})
        noisy = gap[:, 1:].sum(1)
        sums[str(T)] = {"noisy_levels_nats": float(noisy.mean()),
                        "noisy_levels_bits": float(noisy.mean()) / math.log(2), "levels": T - 1}
    results = {"config": {"quick": quick, "data": data, "run": str(run), "train_Ts": list(Ts), "n": n,
                          "gap": "0.5 [sum_i log (J J^T)_ii - log det J J^T] / dim, J = df_T/dx at the level",
                          "sum_over_noisy_levels": sums}, "rows": rows}
    write_results(out, results)
    return results


def mean_bounds(model, x: torch.Tensor, K: int, seed: int, steps: int | None = None) -> dict:
    """The mean uniform ELBO and IW bounds (bits/dim) of images x with K trajectories drawn from ``seed``,
    the IW bound's standard error, the number of images and the seconds per 1,000 images."""
    t0 = time.perf_counter()
    s = model.score(x, num_trajectories=K, steps=steps, generator=torch.Generator().manual_seed(seed))
    return {"elbo_bpd": float(s["bpd"].mean()), "iw_bpd": float(s["iw_bpd"].mean()),
            "se": float(s["iw_bpd"].std() / len(x) ** 0.5), "n": len(x),
            "seconds_per_1000": 1000 * (time.perf_counter() - t0) / len(x)}


def iw_tightness(model, x: torch.Tensor, ks: tuple[int, ...], png: Path) -> dict:
    """Mean IW bound in bits/dim against K (same test images; fresh draws for each K) and its figure."""
    bpd = {K: mean_bounds(model, x, K, seed=K) for K in ks}
    plot_iw_vs_k(bpd, png)
    return {"n": len(x), "by_k": {str(k): v for k, v in bpd.items()}}


def plot_iw_vs_k(bpd: dict, png: Path) -> None:
    ks = list(bpd)
    line_plot({"importance-weighted bound": (ks, [bpd[k]["iw_bpd"] for k in ks]),
               "ELBO bound (same draws)": (ks, [bpd[k]["elbo_bpd"] for k in ks])}, png,
              xlabel="trajectories K", ylabel="bits/dim (uniform dequantisation)", log_x=True,
              title="NTM on MNIST test images: the bound against K", errors={"importance-weighted bound":
                                                                             [2 * bpd[k]["se"] for k in ks]})


def run_bayes_bench(out: str | Path | None = None, quick: bool = False, progress: bool = True,
                    settings: dict | None = None, data_sets: tuple[str, ...] = tuple(OUT_SETS),
                    run: str | Path | None = None) -> dict:
    """Bayes classification with the class-conditional NTM and FM against the project's CNN; the rows
    of data sets not in ``data_sets`` are kept from an earlier run with the same settings. ``run``
    scores that NTM instead of the bench's (one data set; no FM row, as the bench's FM is not its peer)."""
    settings = ood_settings(quick, settings)
    out = Path(out) if out else results_dir() / ("bayes-quick.json" if quick else "bayes.json")
    steps = settings.get("bayes_steps")  # NTM's trajectory length T (None: the model's own)
    if run is not None and len(data_sets) != 1:
        raise ConfigError(f"--run scores one model: name its training set with --data (got {', '.join(data_sets)})")
    # the recipe behind the rows: the bench's preset, or what the run's checkpoint says it was trained with
    recipe = {"preset": settings["preset"]} if run is None else {"run": str(run), "run_train": run_recipe(run)}
    results = {"config": {"quick": quick, **recipe, "prior": "uniform", "ntm_bound": f"importance-weighted, K={settings['bayes_k']}",
                          "fm_ode_steps": settings["fm_ode_steps"], "ece_bins": 15, "n_bayes": settings["n_bayes"],
                          "n_bayes_fm": settings["n_bayes_fm"], **({"ntm_steps": steps} if steps else {})}, "rows": []}
    results["rows"] = previous_results(out, results["config"], "data", data_sets)[0]
    for data in data_sets:
        if run is None:
            models, _ = bench_models(data, quick, settings, progress, glow=False)
        else:
            models = {"ntm": bench_run_model(run, data, (steps,) if steps else None, "NTM")[1]}
        src, _ = labelled_source(data)
        x, y = src.held_out(settings["n_bayes"], seed=4242)
        # one set of trajectories for every level: the data's own bound (level 0), the bound at the
        # first noisy level (the row) and, as a diagnostic, at each level above it
        T = steps or models["ntm"].config.trajectory.T
        ll, sec = _timed(lambda: ntm_class_log_likelihoods(models["ntm"], x, tuple(range(T)),
                                                           num_trajectories=settings["bayes_k"], steps=steps))
        k = {"trajectories": settings["bayes_k"], **({"steps": steps} if steps else {})}
        times = models["ntm"].grid(1, 0.0, T=T)[0].tolist()
        by_level = {str(j): {"t": times[j], "accuracy": float((ll[j].argmax(1) == y).float().mean())} for j in range(1, T)}
        results["rows"].append({**bayes_row(data, "ntm-bayes", ll[0], y, sec), **k})
        results["rows"].append({**bayes_row(data, "ntm-bayes-noisy", ll[1], y, sec), "level": 1, **k,
                                "accuracy_by_level": by_level})
        # every noisy level at once: the mean over levels of log p(x_{t_j} | y), a product of the
        # levels' tempered likelihoods (a fixed rule, no level chosen on the test images)
        results["rows"].append({**bayes_row(data, "ntm-bayes-levels", level_mean(ll, range(1, T)), y, sec),
                                "levels": list(range(1, T)), **k})
        if "fm" in models:
            m = settings["n_bayes_fm"]
            ll, sec = _timed(lambda: class_log_likelihoods(models["fm"], x[:m], steps=settings["fm_ode_steps"]))
            results["rows"].append(bayes_row(data, "fm-ode-bayes", ll, y[:m], sec))
        clf, info = load_or_train_classifier(src, steps=settings["classifier_steps"], progress=progress)
        tx, ty = src.held_out(None, seed=777)
        with torch.no_grad():
            logp = torch.cat([torch.log_softmax(clf(tx[lo:lo + 1000]), 1) for lo in range(0, len(tx), 1000)])
        results["rows"].append({"data": data, "method": "cnn", "accuracy": classifier_accuracy(clf, tx, ty),
                                "ece": calibration_error(logp, ty), "n": len(ty), "note": info["name"]})
        write_results(out, results)
    return results


def run_recipe(run: str | Path) -> dict | None:
    """The training settings a run's newest checkpoint (or a saved model folder) records: steps, batch
    size, peak lr, objective and hybrid weight, and the step it was saved at; None when it records
    none (a model saved without its training state, or no model at all)."""
    try:
        meta = read_meta(resolve(run))
    except CheckpointError:  # no model there: `bench_run_model` says so in the bench's own words
        return None
    if "train" not in meta:
        return None
    return {**{k: meta["train"][k] for k in ("steps", "batch_size", "lr", "objective", "hybrid_weight")},
            "saved_at_step": meta.get("step")}


def bayes_row(data: str, method: str, log_likelihoods: torch.Tensor, y: torch.Tensor, seconds: float) -> dict:
    post = bayes_posterior(log_likelihoods)
    return {"data": data, "method": method, "accuracy": float((post.argmax(1) == y).float().mean()),
            "ece": calibration_error(post, y), "n": len(y), "seconds_per_1000": 1000 * seconds / len(y)}
