"""Benchmarks end to end on tiny budgets: toy FM rows, the quick image bench, the finetune bench."""
import json
import math
from dataclasses import replace

import pytest

import torch

from ntm.bench import common
from ntm.bench.common import interleaved_step_seconds, run_differences, same_run, train_or_reuse
from ntm.bench.images import run_guidance_sweep
from ntm.cli import main
from ntm.config import default_preset, get_preset, validate_train_config
from ntm.data import open_source
from ntm.errors import ConfigError
from ntm.hub import build_model


def test_toy_bench_fm_rows(tmp_path, capsys):
    out = tmp_path / "fm.json"
    assert main(["bench", "toy", "--preset", "tiny", "--steps", "4", "--data", "8gaussians", "--models", "fm",
                 "--out", str(out), "--n-eval", "40", "--n-samples", "60", "--seeds", "1", "--no-progress"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["steps"], r["solver"], r["nfe"]) for r in rows] == [
        ("fm", 1, "euler", 1), ("fm", 2, "euler", 2), ("fm", 4, "euler", 4), ("fm", 8, "euler", 8),
        ("fm", 64, "euler", 64), ("fm", 4, "heun", 7)]
    assert all(math.isfinite(r["nll_bound"]) and r["iw_bound"] is None and "ODE" in r["nll_kind"] for r in rows)
    assert "4 heun" in out.with_suffix(".md").read_text()


def test_ablation_needs_the_bench_teacher(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "finetune", "--ablation", "--quick", "--no-progress"]) == 1
    assert "no FM teacher" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["--ablation", "--levers"], "give one"),
    (["--levers", "--preset", "mnist"], "no --preset"),
    (["--ablation", "--distill-steps", "5"], "no --preset or --distill-steps"),
])
def test_image_bench_refuses_options_it_would_drop(tmp_path, monkeypatch, capsys, args, says):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "mnist", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_finetune_bench_end_to_end(tmp_path, monkeypatch):
    from ntm.bench.finetune import run_finetune_bench

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NTM_CACHE_DIR", str(tmp_path / "cache"))
    res = run_finetune_bench("mnist", quick=True, steps=4, n_samples=20, progress=False, classifier_steps=10,
                             settings={"n_bpd": 4, "n_bpd_fm": 2, "fm_ode_steps": 2, "bpd_trajectories": 1})
    assert [(r["model"], r["steps"], r.get("aux_weight")) for r in res["rows"]] == [
        ("fm", 4, None), ("fm", 50, None), ("ntm-ft", 4, 2.5), ("ntm-ft", 4, 0.0), ("ntm-ft", 4, 2.5), ("ntm", 4, None)]
    assert [r.get("backbone") for r in res["rows"][2:]] == ["trained", "trained", "frozen", None]
    assert res["config"]["finetune_steps"] == 1 and res["config"]["scratch_steps"] == 5
    assert (tmp_path / "results" / "mnist-finetune-quick.json").is_file()
    assert (tmp_path / "results" / "mnist-finetune-quick" / "finetune-loss-curves.png").is_file()
    # the ablation reuses that teacher
    from ntm.bench.finetune import run_finetune_ablation
    abl = run_finetune_ablation("mnist", quick=True, steps=2, n_samples=20, n_bpd=4, progress=False,
                                classifier_steps=10, variants=(("a", "floor", 1e-3, 1e-3, 0.01), ("b", "x0", 0.0, 4e-3, 0.005)))
    assert [r["variant"] for r in abl["rows"]] == ["step-0", "a", "b"] and abl["rows"][2]["fresh_lr"] == pytest.approx(4e-3)
    assert all(math.isfinite(r["bpd"]) and math.isfinite(r["fid"]) for r in abl["rows"])
    assert (tmp_path / "results" / "mnist-finetune-ablation-quick.md").is_file()
    from ntm.bench.common import check_bench_output
    check_bench_output(tmp_path / "results" / "mnist-finetune-ablation-quick.json")  # a re-run may replace it


@pytest.mark.slow
def test_quick_image_bench_end_to_end(tmp_path, monkeypatch, capsys):
    import ntm.cli as cli

    monkeypatch.setenv("NTM_CACHE_DIR", str(tmp_path / "cache"))
    real = cli.run_image_bench

    def tiny(*args, **kwargs):
        return real(*args, **{**kwargs, "classifier_steps": 20,
                              "settings": {"n_bpd": 8, "n_bpd_fm": 2, "fm_ode_steps": 2, "bpd_trajectories": 1}})

    monkeypatch.setattr(cli, "run_image_bench", tiny)
    out = tmp_path / "mnist-quick.json"
    argv = ["bench", "mnist", "--quick", "--steps", "3", "--n-samples", "20", "--distill-steps", "2",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    keys = {"model", "steps", "decode", "solver", "nfe", "fid", "kid", "precision", "recall", "class_acc", "bpd",
            "img_per_s", "train_seconds", "extractor", "n_samples", "objective", "transform", "bpd_kind"}
    assert [(r["model"], r["steps"], r["decode"], r["solver"]) for r in res["rows"]] == [
        ("ntm", 4, "inverse", None), ("ntm", 4, "inverse+score", None), ("ntm", 4, "denoiser", None),
        ("ntm", 8, "inverse", None), ("ntm", 16, "inverse", None), ("fm", 4, None, "euler"), ("fm", 8, None, "euler"),
        ("fm", 50, None, "euler"), ("fm", 4, None, "heun")]
    for r in res["rows"]:
        assert keys <= set(r) and r["n_samples"] == 20
    ntm_rows = [r for r in res["rows"] if r["model"] == "ntm"]
    for r in ntm_rows:  # the tightest of the four bounds at the row's own T, and named as such
        assert r["bpd"] == min(r["bpd_bounds"].values()) and r["bpd_kind"].endswith(f"T={r['steps']}, K=1")
        assert r["objective"] == "nll-rb+hybrid" and r["transform"] == "spline" and r["default"] is False
    assert res["config"]["by_step"]["times"][0] == 0.0 and len(res["config"]["by_step"]["neg_log_p_per_dim"]) == 4
    other = res["config"]["by_step_other_T"]  # the multi-T model's split on its other grids
    assert sorted(other) == ["16", "8"] and [len(other[k]["log_q_per_dim"]) for k in ("8", "16")] == [8, 16]
    assert "Per-step uniform ELBO of the NTM at T = 16" in out.with_suffix(".md").read_text()
    # the denoiser and the score-refined decode of the same trajectories differ, by less than the image range
    assert 0 < res["rows"][2]["rmse_to_score"] < 2 and 0 < res["rows"][2]["feature_dist_to_score"] < 10
    timing = res["config"]["inverse_timing"]
    assert timing["max_abs_diff"] < 1e-3 and timing["jacobi_seconds"] > 0
    assert res["config"]["train_steps"] == 3 and res["config"]["ntm_fm_step_cost_ratio"] > 0
    folder = tmp_path / "mnist-quick"
    assert (folder / "training-curves.png").is_file() and (folder / "samples-ntm-4.png").is_file()
    assert (folder / "samples-fm-heun-4.png").is_file()
    assert out.with_suffix(".md").read_text().startswith("| model | objective | steps |")
    # a re-run of the same command reuses the trained runs and every finished row
    assert main(argv) == 0
    again = json.loads(out.read_text())
    assert [r["img_per_s"] for r in again["rows"]] == [r["img_per_s"] for r in res["rows"]]
    # another preset with the same FM and training, over a copy of this FM run: its FM rows are reused
    import shutil
    from dataclasses import replace

    import ntm.bench.images as images
    from ntm.config import PRESETS

    quick = PRESETS["mnist-quick"]
    monkeypatch.setitem(PRESETS, "quick-affine", replace(quick, transporter=replace(quick.transporter, transform="affine")))
    shutil.copytree(folder / "runs" / "fm", tmp_path / "affine" / "runs" / "fm")
    scored, real_row = [], images.evaluate_image_row
    monkeypatch.setattr(images, "evaluate_image_row",
                        lambda model, *a, **k: scored.append(type(model).__name__) or real_row(model, *a, **k))
    other = real("mnist", out=tmp_path / "affine.json", quick=True, steps=3, n_samples=20, progress=False,
                 classifier_steps=20, settings={"preset": "quick-affine", "n_bpd": 8, "n_bpd_fm": 2,
                                                "fm_ode_steps": 2, "bpd_trajectories": 1})
    assert scored == ["NTM"] * 3  # the NTM rows at 4, 8 and 16 steps; no FM row scored again
    assert [r for r in other["rows"] if r["model"] == "fm"] == [r for r in res["rows"] if r["model"] == "fm"]
    assert {r["transform"] for r in other["rows"] if r["model"] == "ntm"} == {"affine"}
    assert (tmp_path / "affine" / "samples-fm-euler-4.png").is_file()  # a reused row's picture comes with it


@pytest.mark.slow
def test_objective_ablation_bench_end_to_end(tmp_path, monkeypatch, capsys):
    import ntm.cli as cli

    monkeypatch.setenv("NTM_CACHE_DIR", str(tmp_path / "cache"))
    real = cli.run_image_ablation
    monkeypatch.setattr(cli, "run_image_ablation", lambda *a, **k: real(*a, **{**k, "classifier_steps": 20, "n_bpd": 8,
                                                                                      "probe_steps": 1}))
    out = tmp_path / "abl.json"
    assert main(["bench", "mnist", "--ablation", "--quick", "--steps", "2", "--n-samples", "20", "--out", str(out),
                 "--no-progress"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["objective"], r["stratified"], r["precondition"]) for r in rows] == [
        ("paper-nll", "nll", False, "unit"), ("nll-rb-stratified", "nll-rb", True, "unit"),
        ("default", "nll-rb+hybrid", True, "data")]
    assert all(math.isfinite(r["bpd"]) and r["bpd"] == min(r["bpd_bounds"].values()) for r in rows)
    assert out.with_suffix(".md").read_text().startswith("Objective ablation on mnist")
    assert (tmp_path / "abl" / "nll-curves.png").is_file()


@pytest.mark.slow
def test_lever_ablation_bench_end_to_end(tmp_path, monkeypatch):
    import ntm.bench.images as images
    import ntm.cli as cli

    monkeypatch.setenv("NTM_CACHE_DIR", str(tmp_path / "cache"))
    real = cli.run_image_ablation
    monkeypatch.setattr(cli, "run_image_ablation", lambda *a, **k: real(*a, **{**k, "classifier_steps": 20, "n_bpd": 4,
                                                                                      "probe_steps": 1}))
    # the shipped levers plus a multi-T variant (a row per step count, from one checkpoint)
    monkeypatch.setattr(cli, "LEVERS", images.LEVERS + (("multi-t", "mnist-multi-t", {}),))
    out = tmp_path / "levers.json"
    assert main(["bench", "mnist", "--levers", "--steps", "1", "--n-samples", "10", "--out", str(out),
                 "--no-progress"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["steps"]) for r in rows] == [
        ("default", 4), ("cosine-lambda", 4), ("wide-transporter", 4), ("spline", 4), ("spline-one-block", 4),
        ("spline-4-bins", 4), ("t0-zero", 4), ("multi-t", 4), ("multi-t", 8), ("multi-t", 16)]
    assert [r["transporter"] for r in rows[1:4]] == ["2x1 w32", "2x2 w64", "2x1 w32"]
    assert [r["transform"] for r in rows[2:4]] == ["affine", "spline"]
    assert [r["splines"] for r in rows[2:6]] == [None, "2 of 2 blocks, 8 bins", "1 of 2 blocks, 8 bins",
                                                 "2 of 2 blocks, 4 bins"]
    assert all(r["step_cost_vs_fm"] > 0 for r in rows)
    assert [r["bpd_kind"].split("T=")[1][:2] for r in rows[7:]] == ["4,", "8,", "16"]
    assert rows[7]["multi_T"] == [4, 8, 16] and rows[0]["multi_T"] == []
    assert rows[0]["t_min_high"] == 0.05 and rows[6]["t_min_high"] == 0.0
    # trained at t_0 = 0 only: no discretised bound (its t_0 lies outside the trained range)
    assert not any(k.startswith("discretised") for k in rows[6]["bpd_bounds"])
    assert (tmp_path / "levers" / "samples-multi-t-T16.png").is_file()
    # a re-run keeps every finished row (same runs, same settings) instead of scoring it again
    monkeypatch.setattr(images, "evaluate_image_row", lambda *a, **k: pytest.fail("row scored again"))
    assert main(["bench", "mnist", "--levers", "--steps", "1", "--n-samples", "10", "--out", str(out),
                 "--no-progress"]) == 0
    again = json.loads(out.read_text())["rows"]
    assert [{k: v for k, v in r.items() if k != "step_cost_vs_fm"} for r in again] == \
        [{k: v for k, v in r.items() if k != "step_cost_vs_fm"} for r in rows]
    assert out.with_suffix(".md").read_text().startswith("Lever ablation on mnist")


def test_toy_bench_scores_the_decode_it_is_given(tmp_path, capsys):
    args = ["bench", "toy", "--preset", "tiny", "--steps", "4", "--data", "checkerboard", "--models", "ntm",
            "--n-eval", "40", "--n-samples", "60", "--seeds", "1", "--no-progress"]
    plain, scored = tmp_path / "plain.json", tmp_path / "scored.json"
    assert main(args + ["--out", str(plain)]) == 0
    assert main(args + ["--out", str(scored), "--decode", "inverse+score"]) == 0
    a, b = json.loads(plain.read_text()), json.loads(scored.read_text())
    assert (a["config"]["decode"], b["config"]["decode"]) == ("inverse", "inverse+score")
    assert [r["decode"] for r in b["rows"]] == ["inverse+score"]
    # same run, same bound; only the samples' decoding differs
    assert b["rows"][0]["nll_bound"] == a["rows"][0]["nll_bound"]
    assert b["rows"][0]["energy_distance"] != a["rows"][0]["energy_distance"]
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "bad.json"), "--decode", "denoise"]) == 1
    err = capsys.readouterr().err
    assert "unknown decode 'denoise'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad.json").exists()


def test_step_cost_bench_end_to_end(tmp_path, capsys):
    """`ntm bench step-cost`: one row per preset and thread count with both step times and their ratio;
    a re-run replaces its own table; an unknown preset or a bad thread list is one error line, no file."""
    from conftest import one_error_line

    out = tmp_path / "cost.json"
    for _ in range(2):
        assert main(["bench", "step-cost", "--presets", "tiny", "--threads", "1", "--steps", "4", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["preset"], r["threads"], r["steps_timed"]) for r in rows] == [("tiny", 1, 4)]
    r = rows[0]
    assert r["ntm_seconds_per_step"] > 0 and r["fm_seconds_per_step"] > 0
    assert r["ratio"] == pytest.approx(r["ntm_seconds_per_step"] / r["fm_seconds_per_step"])
    assert out.with_suffix(".md").read_text().startswith("| preset | transform | threads |")
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    assert one_error_line(main(["bench", "step-cost", "--presets", "nope", "--out", str(bad)]), capsys.readouterr().err, "nope")
    assert one_error_line(main(["bench", "step-cost", "--threads", "0", "--out", str(bad)]), capsys.readouterr().err,
                          "--threads")
    assert not bad.exists()


def test_interleaved_step_seconds_alternates_jobs_and_divides_by_the_timed_steps(monkeypatch):
    """Warm-up steps of every job, then rounds that visit the jobs in order; a job's seconds per step
    are its timed seconds over its timed steps (a fake clock that each job's step advances by a known
    amount), and a step count that does not divide into rounds times whole rounds only."""
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    calls = []
    src = open_source("moons")
    model = build_model(get_preset("tiny").ntm(src.spec()))

    class Job:  # an objective whose step costs `cost` seconds on the fake clock
        def __init__(self, name, cost):
            self.name, self.cost = name, cost

        def __call__(self, x, y, noise):
            calls.append(self.name)
            clock[0] += self.cost
            return sum(p.sum() for p in model.parameters()) * 0.0, {}

        def draw_noise(self, batch, generator, device):
            return None

    jobs = {name: (model, Job(name, cost), torch.optim.SGD(model.parameters(), lr=0.0), src, torch.Generator().manual_seed(0))
            for name, cost in (("a", 2.0), ("b", 0.5))}
    seconds, timed = interleaved_step_seconds(jobs, batch_size=4, steps=7, warmup=2, rounds=3)
    assert timed == 6 and calls == ["a", "a", "b", "b"] + ["a", "a", "b", "b"] * 3
    assert seconds == {"a": pytest.approx(2.0), "b": pytest.approx(0.5)}


def test_a_bench_reuses_a_run_only_when_every_learning_setting_matches(tmp_path):
    p = get_preset("tiny")
    src = open_source("moons")
    cfg, fm_cfg = p.ntm(src.spec()), p.fm(src.spec())
    train_cfg = replace(p.train, steps=2, warmup=1, checkpoint_every=2)
    for run, model_cfg in ((tmp_path / "ntm", cfg), (tmp_path / "fm", fm_cfg)):
        train_or_reuse(run, model_cfg, train_cfg, src, False)
        assert same_run(run, model_cfg, train_cfg)
        # how a run is checkpointed and logged does not change what it learned
        assert same_run(run, model_cfg, replace(train_cfg, checkpoint_every=1, log_every=7))
        # any setting of the optimiser or the averaging does
        for changed in (dict(ema_decay=0.99), dict(warmup=0), dict(weight_decay=0.0), dict(betas=(0.9, 0.999)),
                        dict(grad_clip=5.0), dict(min_lr=0.0)):
            assert not same_run(run, model_cfg, replace(train_cfg, **changed)), changed
    # the NTM objective's settings matter to an NTM, not to the FM baseline
    assert not same_run(tmp_path / "ntm", cfg, replace(train_cfg, hybrid_weight=1.0))
    assert same_run(tmp_path / "fm", fm_cfg, replace(train_cfg, hybrid_weight=1.0, T_weights=(1.0,)))
    assert run_differences(tmp_path / "ntm", cfg, replace(train_cfg, warmup=0, lr=1.0)) == ["lr", "warmup"]
    assert run_differences(tmp_path / "nothing", cfg, train_cfg) is None


@pytest.mark.slow
def test_demo_bench_scores_the_make_demo_model_and_reuses_its_run(tmp_path, monkeypatch, capsys):
    import ntm.cli as cli

    monkeypatch.setenv("NTM_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("NTM_CACHE_DIR", str(tmp_path / "cache"))
    real = cli.run_demo_bench
    monkeypatch.setattr(cli, "run_demo_bench", lambda *a, **k: real(*a, **{**k, "classifier_steps": 10, "n_bpd": 8}))
    assert main(["bench", "demo", "--steps", "2", "--n-samples", "20", "--no-progress"]) == 0
    out = tmp_path / "results" / "demo.json"
    res = json.loads(out.read_text())
    assert [(r["model"], r["steps"], r["guidance"], r["nfe"]) for r in res["rows"]] == [
        ("ntm", 4, 0.0, 4), ("ntm", 4, 1.0, 8), ("ntm", 4, 2.0, 8)]
    cfg = res["config"]
    assert (cfg["preset"], cfg["train_steps"], cfg["lr"], cfg["target_class_acc"]) == ("mnist-demo", 2, 2e-3, 0.9)
    assert cfg["train_seconds"] > 0 and math.isfinite(cfg["bpd"]) and "T=4, K=4" in cfg["bpd_kind"]
    assert "class accuracy at w = 1" in capsys.readouterr().out
    # a second run scores the same trained model again, without training it
    before = sorted(p.name for p in (tmp_path / "results" / "demo" / "runs" / "ntm" / "checkpoints").iterdir())
    assert main(["bench", "demo", "--steps", "2", "--n-samples", "20", "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "results" / "demo" / "runs" / "ntm" / "checkpoints").iterdir()) == before
    assert json.loads(out.read_text())["config"]["train_seconds"] == cfg["train_seconds"]


def test_guidance_sweep_scores_the_image_bench_runs_at_each_weight(tmp_path, monkeypatch, capsys):
    import ntm.cli as cli

    monkeypatch.setenv("NTM_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("NTM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "results" / "guidance-fashion.json"
    # before `ntm bench fashion` has trained its runs: one error, nothing written
    assert main(["bench", "guidance", "--data", "fashion", "--no-progress"]) == 1
    assert "run `ntm bench fashion` first" in capsys.readouterr().err and not out.exists()
    assert main(["bench", "guidance", "--data", "fashion", "--preset", "mnist-quick", "--no-progress"]) == 1
    assert "run `ntm bench fashion --quick` first" in capsys.readouterr().err
    assert main(["bench", "guidance", "--ws", "1,x", "--no-progress"]) == 2
    assert "--ws takes comma-separated numbers >= 0" in capsys.readouterr().err
    assert main(["bench", "guidance", "--data", "fashion", "--preset", "no-such-preset", "--no-progress"]) == 1
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err
    assert main(["bench", "guidance", "--data", "fashion", "--seeds", "0"]) == 2
    with pytest.raises(ConfigError, match="seeds must be >= 1"):
        run_guidance_sweep("fashion", (1.0,), seeds=0)
    # the runs `ntm bench fashion` would train (its preset, a short budget), and runs of another recipe
    # where `ntm bench fashion --preset mnist-lr2x` keeps its runs
    results = tmp_path / "results"
    for folder, preset in ((results / "fashion", "mnist"), (results / "fashion-mnist-lr2x", "tiny")):
        for kind in ("ntm", "fm"):
            assert main(["train", "--data", "fashion", "--model", kind, "--preset", preset, "--steps", "2",
                         "--out", str(folder / "runs" / kind), "--no-progress"]) == 0
    real = cli.run_guidance_sweep
    monkeypatch.setattr(cli, "run_guidance_sweep", lambda *a, **k: real(*a, **{**k, "classifier_steps": 10}))
    assert main(["bench", "guidance", "--data", "fashion", "--ws", "0,2", "--n-samples", "20", "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert [(r["model"], r["steps"], r["guidance"], r["nfe"]) for r in res["rows"]] == [
        ("ntm", 4, 0.0, 4), ("fm", 4, 0.0, 4), ("ntm", 4, 2.0, 8), ("fm", 4, 2.0, 8)]
    assert all(0 <= r["class_acc"] <= 1 and r["fid"] >= 0 and r["n_samples"] == 20 for r in res["rows"])
    assert res["config"]["preset"] == "mnist" and res["config"]["runs"].endswith("fashion/runs")
    assert out.with_suffix(".md").read_text().startswith("| model | steps | guidance w | NFE |")
    assert (out.with_suffix("") / "class-acc.png").is_file() and (out.with_suffix("") / "fid.png").is_file()
    # --preset P scores the runs of `ntm bench fashion --preset P` only if P trained them
    assert main(["bench", "guidance", "--data", "fashion", "--preset", "mnist-lr2x", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "fashion-mnist-lr2x/runs/ntm was not trained with preset mnist-lr2x (model config" in err
    assert not (results / "guidance-fashion-mnist-lr2x.json").exists()
    # --seeds 2 draws each (model, w) twice, into its own file: seed 0 is the draw above, seed 1 other noise
    assert main(["bench", "guidance", "--data", "fashion", "--ws", "2", "--n-samples", "20", "--seeds", "2",
                 "--no-progress"]) == 0
    seeded_out = results / "guidance-fashion-seeds2.json"
    seeded = json.loads(seeded_out.read_text())
    assert seeded["config"]["seeds"] == 2 and json.loads(out.read_text()) == res
    assert [(r["model"], r["guidance"], r["sample_seed"]) for r in seeded["rows"]] == [
        ("ntm", 2.0, 0), ("ntm", 2.0, 1), ("fm", 2.0, 0), ("fm", 2.0, 1)]
    first = {r["model"]: r["fid"] for r in res["rows"] if r["guidance"] == 2.0}
    assert [r["fid"] for r in seeded["rows"] if r["sample_seed"] == 0] == pytest.approx([first["ntm"], first["fm"]])
    assert all(a["fid"] != b["fid"] for a, b in zip(seeded["rows"][::2], seeded["rows"][1::2]))
    assert "| guidance w | sample seed | NFE |" in seeded_out.with_suffix(".md").read_text()


def test_the_lever_presets_change_only_their_named_setting_of_the_recipe_at_2e_3():
    """The hybrid-weight and bins lever presets on mnist-lr4x differ from it in the one setting each
    names, and share its FM baseline (FM ignores the NTM objective's settings)."""
    base = get_preset("mnist-lr4x")
    assert base.train == replace(get_preset("mnist-lr1x").train, lr=2e-3)
    expected = {"mnist-lr4x-lam3": (replace(base.train, hybrid_weight=3.0), base.transporter),
                "mnist-lr4x-lam1": (replace(base.train, hybrid_weight=1.0), base.transporter),
                "mnist-lr4x-lam1-bins16": (replace(base.train, hybrid_weight=1.0),
                                           replace(base.transporter, spline_bins=16))}
    spec = open_source("8gaussians").spec()
    for name, (train_cfg, transporter) in expected.items():
        p = get_preset(name)
        validate_train_config(p.train)
        assert (p.train, p.transporter) == (train_cfg, transporter), name
        assert (p.trajectory, p.predictor) == (base.trajectory, base.predictor), name
        assert p.fm(spec) == base.fm(spec), name


def test_the_default_image_preset_is_the_lambda_1_recipe_at_2e_3_and_mnist_lr1x_keeps_the_one_before():
    """The default took the recipe of the run that won (mnist-lr4x-lam1); mnist-lr1x is the previous
    default (5e-4, lambda 10), the base of the lr and coupling presets; quick follows the default."""
    default, won, before = get_preset("mnist"), get_preset("mnist-lr4x-lam1"), get_preset("mnist-lr1x")
    assert default_preset("image") == "mnist"
    assert (default.trajectory, default.transporter, default.predictor, default.train) == \
        (won.trajectory, won.transporter, won.predictor, won.train)
    assert (default.train.lr, default.train.hybrid_weight) == (2e-3, 1.0)
    assert (before.train.lr, before.train.hybrid_weight) == (5e-4, 10.0)
    assert replace(before.train, lr=2e-3, hybrid_weight=1.0) == default.train
    assert (before.trajectory, before.transporter, before.predictor) == \
        (default.trajectory, default.transporter, default.predictor)
    assert get_preset("mnist-coupling-low").train == before.train
    assert get_preset("mnist-lr2x").train == replace(before.train, lr=1e-3)
    quick = get_preset("mnist-quick").train
    assert replace(quick, steps=default.train.steps, warmup=default.train.warmup,
                   checkpoint_every=default.train.checkpoint_every) == default.train
