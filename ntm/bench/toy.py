"""``ntm bench toy`` and ``ntm bench multi-t``: NTM against its transporter-free ablation and the Gaussian ceiling on 2-D toys.

For each data set, these 4-step samplers are compared (``models`` picks among them):

* ``ntm``: the model of the chosen preset;
* ``ntm-no-transporter``: the same with f_T = identity, same budget (a 4-step heteroscedastic
  Gaussian diffusion);
* ``gaussian-ceiling``: no training; an oracle Gaussian predictor with the exact posterior moments
  E[x_0 | x_t], Var[x_0 | x_t] of a large reference sample (the best any Gaussian 4-step sampler can do);
* ``fm``: the flow-matching baseline on the same backbone and budget, at 1, 2, 4, 8 and 64 Euler
  steps and 4 Heun steps, with its ODE likelihood estimate in place of a bound.

Reported per model: the NLL bound (ELBO) and importance-weighted bound on held-out data against the
entropy floor, the energy distance of 4-step samples to held-out data against the noise floor, the
low-density sample fraction, and wall times.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..config import default_preset, get_preset
from ..data import ENTROPY_FLOOR, open_source, to_tokens
from ..errors import ConfigError
from ..flow_matching import FlowMatching, network_evaluations
from ..likelihood import nll_bounds
from ..model import NTM
from ..predictor import EmpiricalPosterior
from ..tools.metrics import energy_distance, low_density_fraction, off_support_fraction
from .common import bench_device, train_or_reuse, write_results

TOY_BENCH_DATA = ("checkerboard", "8gaussians", "moons")
BENCH_MODELS = ("ntm", "ntm-no-transporter", "gaussian-ceiling", "fm")
DEFAULT_BENCH_MODELS = BENCH_MODELS
TOY_DECODES = ("inverse", "inverse+score")  # the decoders of ntm.sampling.DECODERS that need no distilled denoiser
FM_TOY_ROWS = (("euler", 1), ("euler", 2), ("euler", 4), ("euler", 8), ("euler", 64), ("heun", 4))
FM_ODE_STEPS = 64  # Heun steps of the FM baseline's likelihood estimate (named in every FM row's nll_kind)


def sample_quality(name: str, n_samples: int, seeds: tuple[int, ...], draw) -> tuple[list, list, float]:
    """Energy distances and low-density fractions of ``draw(generator)`` samples against fresh held-out
    sets, one per seed, and the total sampling seconds."""
    eds, lows, seconds = [], [], 0.0
    for seed in seeds:
        ref = open_source(name).held_out(n_samples, seed=10_000 + seed)[0]
        t0 = time.perf_counter()
        xs = draw(torch.Generator().manual_seed(seed)).cpu()
        seconds += time.perf_counter() - t0
        eds.append(energy_distance(xs, ref))
        if name == "checkerboard":
            lows.append(off_support_fraction(name, xs))
        elif name == "8gaussians":
            lows.append(low_density_fraction(name, xs, ref))
    return eds, lows, seconds


def evaluate_toy(model: NTM, name: str, held_out: Tensor, n_samples: int, seeds: tuple[int, ...],
                 num_trajectories: int, steps: int | None = None, decode: str = "inverse") -> dict:
    """Bounds, energy distances and low-density fractions of one model on one toy, at T = ``steps``;
    samples decoded by ``decode`` (see ``NTM.sample``)."""
    g = torch.Generator().manual_seed(2024)
    t0 = time.perf_counter()
    elbo, iw = nll_bounds(model, held_out, num_trajectories=num_trajectories, generator=g, steps=steps)
    eval_seconds = time.perf_counter() - t0
    eds, lows, samples_seconds = sample_quality(
        name, n_samples, seeds, lambda g: model.sample(n_samples, steps=steps, generator=g, decode=decode))
    n = held_out.shape[0]
    row = {
        "nll_bound": float(elbo.mean()), "nll_bound_se": float(elbo.std() / math.sqrt(n)),
        "iw_bound": float(iw.mean()), "iw_bound_se": float(iw.std() / math.sqrt(n)),
        "energy_distance": sum(eds) / len(eds), "energy_distances": eds,
        "low_density_fraction": (sum(lows) / len(lows)) if lows else None,
        "samples_per_s": n_samples * len(seeds) / samples_seconds, "bound_seconds": eval_seconds,
    }
    return row


def evaluate_toy_flow(model, name: str, held_out: Tensor, n_samples: int, seeds: tuple[int, ...], steps: int,
                      solver: str, ode_steps: int = FM_ODE_STEPS, nll: tuple[Tensor, float] | None = None) -> dict:
    """The FM baseline on one toy: its ODE NLL estimate (exact divergence, ``ode_steps`` Heun steps)
    in place of a bound, and energy distance / low-density fraction of ``steps``-step samples.
    ``nll`` (values, seconds) reuses an estimate already computed for this model."""
    if nll is None:
        t0 = time.perf_counter()
        values = model.nll(held_out, steps=ode_steps, exact=True)
        nll = (values, time.perf_counter() - t0)
    nll, eval_seconds = nll
    eds, lows, samples_seconds = sample_quality(
        name, n_samples, seeds, lambda g: model.sample(n_samples, steps=steps, solver=solver, generator=g))
    n = held_out.shape[0]
    return {"steps": steps, "solver": solver, "nfe": network_evaluations(steps, solver),
            "nll_bound": float(nll.mean()), "nll_bound_se": float(nll.std() / math.sqrt(n)),
            "nll_kind": f"ODE estimate ({ode_steps} Heun steps, exact divergence)",
            "iw_bound": None, "iw_bound_se": None,
            "energy_distance": sum(eds) / len(eds), "energy_distances": eds,
            "low_density_fraction": (sum(lows) / len(lows)) if lows else None,
            "samples_per_s": n_samples * len(seeds) / samples_seconds, "bound_seconds": eval_seconds}


def noise_floor(name: str, n: int, seeds: tuple[int, ...]) -> float:
    """Mean energy distance between two independent held-out sets of size n."""
    src = open_source(name)
    vals = [energy_distance(src.held_out(n, seed=20_000 + s)[0], src.held_out(n, seed=30_000 + s)[0]) for s in seeds]
    return sum(vals) / len(vals)


def run_toy_bench(out: str | Path, preset: str = "toy", data: tuple[str, ...] = TOY_BENCH_DATA,
                  steps: int | None = None, n_eval: int = 5000, n_samples: int = 5000,
                  seeds: tuple[int, ...] = (0, 1, 2), num_trajectories: int = 8, n_reference: int = 20_000,
                  work_dir: str | Path | None = None, progress: bool = True,
                  models: tuple[str, ...] = DEFAULT_BENCH_MODELS, decode: str = "inverse") -> dict:
    """Train and evaluate the samplers of ``models`` on each toy; write ``out`` (JSON) and return it.
    ``decode``: how NTM samples leave u-space, "inverse" or "inverse+score" (trajectory score denoising)."""
    p = get_preset(preset)
    if decode not in TOY_DECODES:
        raise ConfigError(f"unknown decode '{decode}' (use {' or '.join(TOY_DECODES)})")
    unknown = set(models) - set(BENCH_MODELS)
    if unknown:
        raise ConfigError(f"unknown bench model(s) {', '.join(sorted(unknown))} (known: {', '.join(BENCH_MODELS)})")
    train_cfg = p.train if steps is None else replace(p.train, steps=steps)
    work = Path(work_dir) if work_dir else Path(out).with_suffix("") / "runs"
    results = {"config": {"preset": preset, "steps": train_cfg.steps, "batch_size": train_cfg.batch_size,
                          "T": p.trajectory.T, "shift": p.trajectory.shift, "n_eval": n_eval,
                          "n_samples": n_samples, "seeds": list(seeds), "num_trajectories": num_trajectories,
                          "n_reference": n_reference, "decode": decode, "torch_threads": torch.get_num_threads()},
               "rows": []}
    for name in data:
        src = open_source(name)
        spec = src.spec()
        held_out = src.held_out(n_eval, seed=40_000)[0]
        floor_ed = noise_floor(name, n_samples, seeds)
        base = p.ntm(spec)
        # a disabled transporter has no element-wise transform (the same run for every transform)
        variants = {"ntm": base, "ntm-no-transporter": replace(base, transporter=replace(p.transporter, enabled=False,
                                                                                            transform="affine"))}
        for label, cfg in variants.items():
            if label not in models:
                continue
            run_dir = work / name / label
            summary = train_or_reuse(run_dir, cfg, train_cfg, src, progress)
            model = NTM.from_pretrained(run_dir, map_location=bench_device())
            row = evaluate_toy(model, name, held_out, n_samples, seeds, num_trajectories, decode=decode)
            row.update(model=label, decode=decode, data=name, train_seconds=summary["seconds"],
                       skipped_steps=summary["skipped"],
                       objective=train_cfg.objective, transform=cfg.transporter.transform if cfg.transporter.enabled else "none",
                       bound_kind=f"ELBO / IW, T={cfg.trajectory.T}, K={num_trajectories}",
                       default=label == "ntm" and preset == default_preset(spec))
            finish_row(row, name, floor_ed)
            results["rows"].append(row)
            write_results(out, results)
        if "fm" in models:
            run_dir = work / name / "fm"
            summary = train_or_reuse(run_dir, p.fm(spec), train_cfg, src, progress)
            fm = FlowMatching.from_pretrained(run_dir, map_location=bench_device())
            t0 = time.perf_counter()
            values = fm.nll(held_out, steps=FM_ODE_STEPS, exact=True)  # one likelihood estimate serves every row
            nll = (values, time.perf_counter() - t0)
            for solver, k in FM_TOY_ROWS:
                row = evaluate_toy_flow(fm, name, held_out, n_samples, seeds, k, solver, FM_ODE_STEPS, nll=nll)
                row.update(model="fm", data=name, train_seconds=summary["seconds"], skipped_steps=summary["skipped"],
                           objective="fm", transform=None, bound_kind="ODE estimate")
                finish_row(row, name, floor_ed)
                results["rows"].append(row)
                write_results(out, results)
        if "gaussian-ceiling" not in models:
            continue
        reference = to_tokens(src.held_out(n_reference, seed=50_000)[0], spec)
        oracle_cfg = replace(base, transporter=replace(p.transporter, enabled=False))
        oracle = NTM(oracle_cfg, predictor=EmpiricalPosterior(reference)).eval().to(bench_device())
        row = evaluate_toy(oracle, name, held_out, n_samples, seeds, num_trajectories)
        row.update(model="gaussian-ceiling", data=name, train_seconds=0.0, skipped_steps=0, objective=None,
                   transform="none", bound_kind=f"ELBO / IW, T={oracle_cfg.trajectory.T}, K={num_trajectories}")
        finish_row(row, name, floor_ed)
        results["rows"].append(row)
        write_results(out, results)
    return results


def run_multi_t_bench(out: str | Path, data: str = "checkerboard", Ts: tuple[int, ...] = (4, 8, 16),
                      steps: int | None = None, n_eval: int = 5000, n_samples: int = 5000,
                      seeds: tuple[int, ...] = (0, 1, 2), num_trajectories: int = 8,
                      work_dir: str | Path | None = None, progress: bool = True) -> dict:
    """One model trained over T in ``Ts`` against one single-T model per T, same step budget.

    Rows: ``ntm-multi-t`` evaluated at each T, and ``ntm`` trained at that T alone.
    """
    p = get_preset("toy")
    train_cfg = p.train if steps is None else replace(p.train, steps=steps)
    work = Path(work_dir) if work_dir else Path(out).with_suffix("") / "runs"
    src = open_source(data)
    spec = src.spec()
    held_out = src.held_out(n_eval, seed=40_000)[0]
    floor_ed = noise_floor(data, n_samples, seeds)
    results = {"config": {"bench": "multi-t", "data": data, "Ts": list(Ts), "steps": train_cfg.steps,
                          "batch_size": train_cfg.batch_size, "n_eval": n_eval, "n_samples": n_samples,
                          "seeds": list(seeds), "num_trajectories": num_trajectories,
                          "torch_threads": torch.get_num_threads()}, "rows": []}
    variants = [("ntm-multi-t", replace(p.trajectory, T=Ts[0], train_Ts=tuple(Ts)), Ts)]
    variants += [("ntm", replace(p.trajectory, T=T, train_Ts=()), (T,)) for T in Ts]
    for label, traj, eval_Ts in variants:
        cfg = replace(p.ntm(spec), trajectory=traj)
        run_dir = work / (label if label != "ntm" else f"ntm-T{traj.T}")
        summary = train_or_reuse(run_dir, cfg, train_cfg, src, progress)
        model = NTM.from_pretrained(run_dir, map_location=bench_device())
        for T in eval_Ts:
            row = evaluate_toy(model, data, held_out, n_samples, seeds, num_trajectories, steps=T)
            row.update(model=label, data=data, steps=T, train_seconds=summary["seconds"],
                       skipped_steps=summary["skipped"])
            finish_row(row, data, floor_ed)
            results["rows"].append(row)
            write_results(out, results)
    return results


def finish_row(row: dict, name: str, floor_ed: float) -> None:
    floor = ENTROPY_FLOOR[name]
    row["entropy_floor"] = floor
    row["bound_gap"] = row["nll_bound"] - floor
    row["iw_gap"] = None if row["iw_bound"] is None else row["iw_bound"] - floor
    row["ed_noise_floor"] = floor_ed
    row["ed_ratio"] = row["energy_distance"] / floor_ed


