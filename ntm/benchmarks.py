"""``ntm bench toy``: NTM against its transporter-free ablation and the Gaussian ceiling on 2-D toys.

For each data set, three 4-step samplers are compared:

* ``ntm``: the model of the chosen preset;
* ``ntm-no-transporter``: the same with f_T = identity, same budget (a 4-step heteroscedastic
  Gaussian diffusion);
* ``gaussian-ceiling``: no training; an oracle Gaussian predictor with the exact posterior moments
  E[x_0 | x_t], Var[x_0 | x_t] of a large reference sample (the best any Gaussian 4-step sampler can do).

Reported per model: the NLL bound (ELBO) and importance-weighted bound on held-out data against the
entropy floor, the energy distance of 4-step samples to held-out data against the noise floor, the
low-density sample fraction, and wall times.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import load_model, read_meta, resolve
from .config import PRESETS, ModelConfig, TrainConfig, model_config_from_dict
from .data import ENTROPY_FLOOR, open_source, to_tokens
from .errors import CheckpointError, ConfigError, NTMError
from .flow_matching import network_evaluations
from .likelihood import nll_bounds
from .metrics import energy_distance, low_density_fraction, off_support_fraction
from .model import NTM
from .predictor import EmpiricalPosterior
from .training import train

TOY_BENCH_DATA = ("checkerboard", "8gaussians", "moons")
BENCH_MODELS = ("ntm", "ntm-no-transporter", "gaussian-ceiling", "fm")
DEFAULT_BENCH_MODELS = BENCH_MODELS
FM_TOY_ROWS = (("euler", 1), ("euler", 2), ("euler", 4), ("euler", 8), ("euler", 64), ("heun", 4))


def sample_quality(name: str, n_samples: int, seeds: tuple[int, ...], draw) -> tuple[list, list, float]:
    """Energy distances and low-density fractions of ``draw(generator)`` samples against fresh held-out
    sets, one per seed, and the total sampling seconds."""
    eds, lows, seconds = [], [], 0.0
    for seed in seeds:
        ref = open_source(name).held_out(n_samples, seed=10_000 + seed)[0]
        t0 = time.perf_counter()
        xs = draw(torch.Generator().manual_seed(seed))
        seconds += time.perf_counter() - t0
        eds.append(energy_distance(xs, ref))
        if name == "checkerboard":
            lows.append(off_support_fraction(name, xs))
        elif name == "8gaussians":
            lows.append(low_density_fraction(name, xs, ref))
    return eds, lows, seconds


def evaluate_toy(model: NTM, name: str, held_out: Tensor, n_samples: int, seeds: tuple[int, ...],
                 num_trajectories: int, steps: int | None = None) -> dict:
    """Bounds, energy distances and low-density fractions of one model on one toy, at T = ``steps``."""
    g = torch.Generator().manual_seed(2024)
    t0 = time.perf_counter()
    elbo, iw = nll_bounds(model, held_out, num_trajectories=num_trajectories, generator=g, steps=steps)
    eval_seconds = time.perf_counter() - t0
    eds, lows, samples_seconds = sample_quality(
        name, n_samples, seeds, lambda g: model.sample(n_samples, steps=steps, generator=g, decode="inverse"))
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
                      solver: str, ode_steps: int = 64, nll: tuple[Tensor, float] | None = None) -> dict:
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
                  models: tuple[str, ...] = DEFAULT_BENCH_MODELS) -> dict:
    """Train and evaluate the three samplers on each toy; write ``out`` (JSON) and return it."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    unknown = set(models) - set(BENCH_MODELS)
    if unknown:
        raise ConfigError(f"unknown bench model(s) {', '.join(sorted(unknown))} (known: {', '.join(BENCH_MODELS)})")
    p = PRESETS[preset]
    train_cfg = p.train if steps is None else replace(p.train, steps=steps)
    work = Path(work_dir) if work_dir else Path(out).with_suffix("") / "runs"
    results = {"config": {"preset": preset, "steps": train_cfg.steps, "batch_size": train_cfg.batch_size,
                          "T": p.trajectory.T, "shift": p.trajectory.shift, "n_eval": n_eval,
                          "n_samples": n_samples, "seeds": list(seeds), "num_trajectories": num_trajectories,
                          "n_reference": n_reference, "torch_threads": torch.get_num_threads()},
               "rows": []}
    for name in data:
        src = open_source(name)
        spec = src.spec()
        held_out = src.held_out(n_eval, seed=40_000)[0]
        floor_ed = noise_floor(name, n_samples, seeds)
        base = ModelConfig(data=spec, trajectory=p.trajectory, transporter=p.transporter, predictor=p.predictor)
        variants = {"ntm": base, "ntm-no-transporter": replace(base, transporter=replace(p.transporter, enabled=False))}
        for label, cfg in variants.items():
            if label not in models:
                continue
            run_dir = work / name / label
            summary = _train_or_reuse(run_dir, cfg, train_cfg, src, progress)
            model = NTM.from_pretrained(run_dir)
            row = evaluate_toy(model, name, held_out, n_samples, seeds, num_trajectories)
            row.update(model=label, data=name, train_seconds=summary["seconds"], skipped_steps=summary["skipped"])
            _finish_row(row, name, floor_ed)
            results["rows"].append(row)
            _write(out, results)
        if "fm" in models:
            run_dir = work / name / "fm"
            summary = _train_or_reuse(run_dir, replace(base, kind="fm"), train_cfg, src, progress)
            fm = load_model(run_dir)
            t0 = time.perf_counter()
            values = fm.nll(held_out, steps=64, exact=True)  # one likelihood estimate serves every sampler row
            nll = (values, time.perf_counter() - t0)
            for solver, k in FM_TOY_ROWS:
                row = evaluate_toy_flow(fm, name, held_out, n_samples, seeds, k, solver, nll=nll)
                row.update(model="fm", data=name, train_seconds=summary["seconds"], skipped_steps=summary["skipped"])
                _finish_row(row, name, floor_ed)
                results["rows"].append(row)
                _write(out, results)
        if "gaussian-ceiling" not in models:
            continue
        reference = to_tokens(src.held_out(n_reference, seed=50_000)[0], spec)
        oracle_cfg = replace(base, transporter=replace(p.transporter, enabled=False))
        oracle = NTM(oracle_cfg, predictor=EmpiricalPosterior(reference)).eval()
        row = evaluate_toy(oracle, name, held_out, n_samples, seeds, num_trajectories)
        row.update(model="gaussian-ceiling", data=name, train_seconds=0.0, skipped_steps=0)
        _finish_row(row, name, floor_ed)
        results["rows"].append(row)
        _write(out, results)
    return results


def run_multi_t_bench(out: str | Path, data: str = "checkerboard", Ts: tuple[int, ...] = (4, 8, 16),
                      steps: int | None = None, n_eval: int = 5000, n_samples: int = 5000,
                      seeds: tuple[int, ...] = (0, 1, 2), num_trajectories: int = 8,
                      work_dir: str | Path | None = None, progress: bool = True) -> dict:
    """One model trained over T in ``Ts`` against one single-T model per T, same step budget.

    Rows: ``ntm-multi-t`` evaluated at each T, and ``ntm`` trained at that T alone.
    """
    p = PRESETS["toy"]
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
        cfg = ModelConfig(data=spec, trajectory=traj, transporter=p.transporter, predictor=p.predictor)
        run_dir = work / (label if label != "ntm" else f"ntm-T{traj.T}")
        summary = _train_or_reuse(run_dir, cfg, train_cfg, src, progress)
        model = NTM.from_pretrained(run_dir)
        for T in eval_Ts:
            row = evaluate_toy(model, data, held_out, n_samples, seeds, num_trajectories, steps=T)
            row.update(model=label, data=data, steps=T, train_seconds=summary["seconds"],
                       skipped_steps=summary["skipped"])
            _finish_row(row, data, floor_ed)
            results["rows"].append(row)
            _write(out, results)
    return results


class BenchStopped(NTMError):
    """The user stopped a bench; its trainings are checkpointed and resume on the next run."""


def check_bench_output(out: Path) -> None:
    """Refuse an output that is not a .json path or would replace a file that is not a bench result."""
    out = Path(out)
    if out.suffix != ".json":
        raise ConfigError(f"the bench output must be a .json file, got {out}")
    for f in (out, out.with_suffix(".md")):
        if f.exists() and not _is_bench_output(f, out):
            raise ConfigError(f"{f} exists and is not a previous bench result; choose another --out")


def _is_bench_output(f: Path, out: Path) -> bool:
    try:
        res = json.loads(out.read_text())
        ok = isinstance(res, dict) and "rows" in res and "config" in res
    except (OSError, ValueError):
        return False
    return ok and (f == out or f.read_text().startswith(("| data | model |", "| model | steps |", "Finetune ablation on ")))


def _replaceable_run(run_dir: Path) -> None:
    """A bench work folder may be replaced only if it is (the start of) an ntm run."""
    if run_dir.exists() and not ((run_dir / "checkpoints").is_dir() or (run_dir / "metrics.jsonl").is_file()):
        raise ConfigError(f"{run_dir} exists and is not an ntm run; move it away first")


def _same_run(run_dir: Path, model_cfg: ModelConfig, train_cfg) -> bool:
    """Does ``run_dir`` hold (the start of) a run with this model config and these training settings?"""
    try:
        meta = read_meta(resolve(run_dir))
        keys = ("steps", "batch_size", "lr", "seed", "mode", "aux_weight", "teacher", "pretrained_lr_scale")
        return model_config_from_dict(meta["model"]) == model_cfg and \
            {k: meta["train"].get(k, getattr(TrainConfig, k, None)) for k in keys} == {k: getattr(train_cfg, k) for k in keys}
    except (CheckpointError, KeyError, TypeError, ValueError, AttributeError):
        return False


def _train_or_reuse(run_dir: Path, model_cfg: ModelConfig, train_cfg, src, progress: bool,
                    init_from_teacher: bool = False) -> dict:
    """Reuse a finished run with the same configs, resume an unfinished one, or train afresh, so an
    interrupted bench loses no finished work."""
    if _same_run(run_dir, model_cfg, train_cfg):
        summary = train(None, train_cfg, src, run_dir, resume=True, progress=progress, device="cpu")
    else:
        _replaceable_run(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        summary = train(model_cfg, train_cfg, src, run_dir, progress=progress, device="cpu",
                        init_from_teacher=init_from_teacher)
    if summary["stopped"]:  # Ctrl-C / SIGTERM: stop the whole bench; a re-run resumes this training
        raise BenchStopped(f"stopped during the training in {run_dir}; run the same command again to resume")
    return summary


def _finish_row(row: dict, name: str, floor_ed: float) -> None:
    floor = ENTROPY_FLOOR[name]
    row["entropy_floor"] = floor
    row["bound_gap"] = row["nll_bound"] - floor
    row["iw_gap"] = None if row["iw_bound"] is None else row["iw_bound"] - floor
    row["ed_noise_floor"] = floor_ed
    row["ed_ratio"] = row["energy_distance"] / floor_ed


def _write_json(out: str | Path, results: dict, table: str) -> None:
    """Write results JSON atomically and the markdown table beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)
    out.with_suffix(".md").write_text(table)


def _write(out: str | Path, results: dict) -> None:
    _write_json(out, results, markdown_table(results))


def markdown_table(results: dict) -> str:
    """The bench results as a markdown table. FM rows show their ODE NLL estimate (marked ODE) in
    the bound column and the solver beside the step count."""
    with_steps = any("steps" in r for r in results["rows"])
    if with_steps:
        lines = ["| data | model | T | NLL bound (gap to floor) | IW bound (gap) | energy dist. / noise floor | low-density frac. | train s | samples/s |",
                 "|---|---|---|---|---|---|---|---|---|"]
    else:
        lines = ["| data | model | NLL bound (gap to floor) | IW bound (gap) | energy dist. / noise floor | low-density frac. | train s | samples/s |",
                 "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        low = "n/a" if r["low_density_fraction"] is None else f"{100 * r['low_density_fraction']:.1f}%"
        steps = f"{r.get('steps')}" + (f" {r['solver']}" if r.get("solver") else "")
        iw = "n/a" if r["iw_bound"] is None else f"{r['iw_bound']:.3f} ({r['iw_gap']:+.3f})"
        ode = " (ODE)" if r.get("solver") else ""
        lines.append(
            f"| {r['data']} | {r['model']} | " + (f"{steps} | " if with_steps else "") + f"{r['nll_bound']:.3f} ± {r['nll_bound_se']:.3f} ({r['bound_gap']:+.3f}){ode} "
            f"| {iw} | {r['energy_distance']:.5f} / {r['ed_noise_floor']:.5f} "
            f"= {r['ed_ratio']:.2f}× | {low} | {r['train_seconds']:.0f} | {r['samples_per_s']:.0f} |")
    return "\n".join(lines) + "\n"
