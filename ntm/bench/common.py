"""What every benchmark shares: output checks, run reuse (an interrupted bench loses no finished
training), the results writer and the default results folder."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from ..config import FMConfig, NTMConfig, TrainConfig, from_dict
from ..data import to_tokens
from ..errors import CheckpointError, ConfigError, NTMError
from ..hub import MODEL_CLASSES
from ..io import read_meta, resolve, write_json, write_text
from ..train import train
from ..train.loop import default_device
from .tables import is_generated_table, table_for


class BenchStopped(NTMError):
    """The user stopped a bench; its trainings are checkpointed and resume on the next run."""


def results_dir() -> Path:
    """Where benches write by default: $NTM_RESULTS_DIR, else ./results."""
    return Path(os.environ.get("NTM_RESULTS_DIR", "results"))


def bench_device() -> torch.device:
    """The device benches train and evaluate on (CUDA when there is one)."""
    return default_device()


def check_bench_output(out: Path) -> None:
    """Refuse an output that is not a .json path or would replace a file that is not a bench result."""
    out = Path(out)
    if out.suffix != ".json":
        raise ConfigError(f"the bench output must be a .json file, got {out}")
    for f in (out, out.with_suffix(".md")):
        if f.exists() and not is_bench_output(f, out):
            raise ConfigError(f"{f} exists and is not a previous bench result; choose another --out")


def is_bench_output(f: Path, out: Path) -> bool:
    """Is ``f`` (the JSON ``out`` or the table beside it) a bench result that a re-run may replace?"""
    try:
        res = json.loads(out.read_text())
        ok = isinstance(res, dict) and "rows" in res and "config" in res
    except (OSError, ValueError):
        return False
    return ok and (f == out or is_generated_table(f))


# the image recipe the runs of the OOD, Bayes, finetune and text benches and of the objective and
# lever ablations were trained with (the default until the spline transporter): those benches keep it
# so that their runs are reused, not retrained
AFFINE_RUNS_PRESET = "mnist-affine"
QUICK_PRESET = "mnist-quick"  # the preset of every `ntm bench ... --quick`


def image_bench_folder(data: str, preset: str, quick: bool) -> Path:
    """Where ``ntm bench <data> [--preset P] [--quick]`` keeps its runs and pictures (the JSON is this
    path + ``.json``): ``results/<data>[-<preset>][-quick]``, the preset named unless it is the
    default (mnist) or the quick one."""
    named = f"-{preset}" if preset not in ("mnist", QUICK_PRESET) else ""
    return results_dir() / f"{data}{named}{'-quick' if quick else ''}"


def replaceable_run(run_dir: Path) -> None:
    """A bench work folder may be replaced only if it is (the start of) an ntm run."""
    if run_dir.exists() and not ((run_dir / "checkpoints").is_dir() or (run_dir / "metrics.jsonl").is_file()):
        raise ConfigError(f"{run_dir} exists and is not an ntm run; move it away first")


# the training settings that do not change what a run learns (how it is run and logged)
RUN_ONLY_KEYS = ("fsdp", "compile", "checkpoint_every", "log_every")
# the NTM objective's settings, which an FM run ignores
NTM_ONLY_KEYS = ("mode", "finetune", "objective", "stratified", "step_weights", "hybrid_weight", "hybrid_schedule",
                 "T_weights")


def run_differences(run_dir: Path, model_cfg: NTMConfig | FMConfig, train_cfg: TrainConfig) -> list[str] | None:
    """What differs between the run in ``run_dir`` and these configs: [] for the same run, the names of
    the differing settings otherwise, None when the folder holds no readable run."""
    try:
        meta = read_meta(resolve(run_dir), tuple(MODEL_CLASSES))
        saved_model = from_dict(MODEL_CLASSES[meta["format"]].CONFIG, meta["config"])
        saved_train = from_dict(TrainConfig, meta["train"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None
    skip = RUN_ONLY_KEYS + (NTM_ONLY_KEYS if isinstance(model_cfg, FMConfig) else ())
    keys = [f.name for f in fields(TrainConfig) if f.name not in skip]
    return (["model config"] if saved_model != model_cfg else []) + \
        [k for k in keys if getattr(saved_train, k) != getattr(train_cfg, k)]


def same_run(run_dir: Path, model_cfg: NTMConfig | FMConfig, train_cfg: TrainConfig) -> bool:
    """Does ``run_dir`` hold (the start of) a run with this model config and these training settings?"""
    return run_differences(run_dir, model_cfg, train_cfg) == []


def train_or_reuse(run_dir: Path, model_cfg: NTMConfig | FMConfig, train_cfg: TrainConfig, src, progress: bool) -> dict:
    """Reuse a finished run with the same configs, resume an unfinished one, or train afresh (saying
    why when a run is replaced)."""
    differ = run_differences(run_dir, model_cfg, train_cfg)
    if differ == []:
        summary = train(None, train_cfg, src, run_dir, resume=True, progress=progress, device=bench_device())
    else:
        replaceable_run(run_dir)
        if differ:
            print(f"{run_dir}: trained again ({', '.join(differ)} differ from the stored run)", file=sys.stderr)
        shutil.rmtree(run_dir, ignore_errors=True)
        summary = train(model_cfg, train_cfg, src, run_dir, progress=progress, device=bench_device())
    if summary["stopped"]:  # Ctrl-C / SIGTERM: stop the whole bench; a re-run resumes this training
        raise BenchStopped(f"stopped during the training in {run_dir}; run the same command again to resume")
    return summary


def interleaved_step_seconds(jobs: dict[str, tuple], batch_size: int, steps: int, warmup: int = 3,
                             rounds: int = 4) -> tuple[dict[str, float], int]:
    """Seconds per training step (forward, backward, optimiser step) of each job, timed in ``rounds``
    turns that visit the jobs in order, steps / rounds steps each, after ``warmup`` untimed steps of
    every job: a machine load that comes or goes falls on all of them alike.

    ``jobs`` maps a name to (model, objective, optimizer, source, generator); each step draws a batch
    of ``batch_size`` from the job's source with its generator. Returns the seconds per step by name
    and the number of timed steps per job."""
    device = bench_device()

    def run(name: str, n: int) -> float:
        model, objective, opt, src, g = jobs[name]
        seconds = 0.0
        for _ in range(n):
            x, y = src.sample(batch_size, g)
            t0 = time.perf_counter()
            loss, _ = objective(to_tokens(x, model.spec).to(device), None if y is None else y.to(device),
                                objective.draw_noise(batch_size, g, device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seconds += time.perf_counter() - t0
        return seconds

    for name in jobs:
        run(name, warmup)
    per_round = max(1, steps // rounds)
    total = dict.fromkeys(jobs, 0.0)
    for _ in range(rounds):
        for name in jobs:
            total[name] += run(name, per_round)
    timed = per_round * rounds
    return {name: seconds / timed for name, seconds in total.items()}, timed


def write_results(out: str | Path, results: dict) -> None:
    """Write the results JSON and the markdown table beside it, each atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    write_text(out.with_suffix(".md"), table_for(results))


__all__ = ["AFFINE_RUNS_PRESET", "BenchStopped", "results_dir", "bench_device", "check_bench_output", "image_bench_folder", "interleaved_step_seconds",
           "is_bench_output",
           "run_differences", "same_run",
           "train_or_reuse", "write_results"]
