"""`ntm bench ood` and `ntm bench bayes` end to end on a tiny budget, and their image sets."""

import json
from dataclasses import replace

import pytest
import torch

from ntm.bench.common import train_or_reuse
from ntm.bench.images import labelled_source
from ntm.bench.ood import image_set, run_bayes_bench, run_coupling_bench, run_ood_bench, run_tightness_bench
from ntm.cli import main
from ntm.config import TransporterConfig, get_preset
from ntm.errors import CheckpointError, ConfigError
from ntm.images import load_named, to_uint8
from ntm.tools.glow import GlowConfig

from conftest import one_error_line

TINY = {"preset": "tiny", "n": 24, "n_fit": 30, "n_fm": 6, "fm_ode_steps": 2, "iw_k": 2,
        "glow": GlowConfig(steps=3, blocks=1, hidden=8), "n_bayes": 12, "n_bayes_fm": 4, "bayes_k": 1,
        "n_tight": 6, "ks": (1, 2), "classifier_steps": 10}


def test_image_sets_are_what_they_say():
    q = load_named("mnist", "test")[0][:5]
    assert torch.equal(to_uint8(image_set("mnist-vflip", 5)), q.flip(2))
    assert torch.equal(to_uint8(image_set("mnist-inverted", 5)), 255 - q)
    const = to_uint8(image_set("constant", 7))
    assert (const == const[:, :, :1, :1]).all() and len(set(const[:, 0, 0, 0].tolist())) > 1
    x = image_set("noise", 3)
    assert x.shape == (3, 1, 28, 28) and -1 <= float(x.min()) and float(x.max()) < 1
    with pytest.raises(ValueError, match="unknown image set"):
        image_set("cifar", 2)


def test_ood_and_bayes_benches_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("NTM_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("NTM_CACHE_DIR", str(tmp_path / "cache"))
    res = run_ood_bench(quick=True, progress=False, settings=TINY, out_sets={"mnist": ("noise", "mnist-inverted")})
    methods = {"ntm-bound", "ntm-iw", "ntm-steps", "ntm-steps-k", "ntm-noisy", "fm-ode", "glow"}
    assert {(r["ood_data"], r["method"]) for r in res["rows"]} == {(o, m) for o in ("noise", "mnist-inverted")
                                                                   for m in methods}
    for r in res["rows"]:
        assert 0 <= r["auroc"] <= 1 and 0 <= r["aupr"] <= 1 and r["seconds_per_1000"] > 0
    nfe = {r["method"]: r["nfe_per_image"] for r in res["rows"]}
    assert nfe == {"ntm-bound": 4, "ntm-steps": 4, "ntm-iw": 8, "ntm-steps-k": 8, "ntm-noisy": 8, "fm-ode": 4, "glow": 1}
    assert {r["n_in"] for r in res["rows"] if r["method"] == "fm-ode"} == {6}
    out = tmp_path / "results" / "ood-quick.json"
    assert json.loads(out.read_text())["rows"] == res["rows"]
    assert "| mnist | noise | ntm-steps |" in out.with_suffix(".md").read_text()
    assert set(res["config"]["iw_vs_k"]["by_k"]) == {"1", "2"}
    assert (tmp_path / "results" / "ood-quick" / "iw-vs-k.png").stat().st_size > 1000
    assert "iw_vs_t" not in res["config"]  # the bound against T is `ntm bench tightness`
    # the Glow of the first run is reused: same config, no retraining
    glow = tmp_path / "results" / "ood-quick" / "runs" / "glow-mnist" / "model.safetensors"
    stamp = glow.stat().st_mtime_ns
    res = run_bayes_bench(quick=True, progress=False, settings=TINY, data_sets=("mnist",))
    assert glow.stat().st_mtime_ns == stamp
    assert [r["method"] for r in res["rows"]] == ["ntm-bayes", "ntm-bayes-noisy", "ntm-bayes-levels", "fm-ode-bayes", "cnn"]
    for r in res["rows"]:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["ece"] <= 1
    assert [r["n"] for r in res["rows"]][:4] == [12, 12, 12, 4] and res["rows"][1]["level"] == 1
    assert res["rows"][2]["levels"] == [1, 2, 3]  # every noisy level of the T = 4 grid
    assert [r.get("trajectories") for r in res["rows"]] == [TINY["bayes_k"]] * 3 + [None, None]  # NTM rows give K
    assert "| mnist | cnn |" in (tmp_path / "results" / "bayes-quick.md").read_text()
    # the noisy row's diagnostic: the same trajectories' accuracy at every noisy level, level 1 = the row
    by_level = res["rows"][1]["accuracy_by_level"]
    assert list(by_level) == ["1", "2", "3"] and by_level["1"]["accuracy"] == res["rows"][1]["accuracy"]
    assert 0 < by_level["1"]["t"] < by_level["2"]["t"] < by_level["3"]["t"] < 1
    assert "steps" not in res["rows"][0] and "ntm_steps" not in res["config"]
    # another trajectory length of the multi-T model: NTM's rows say their T, the other rows are the same
    res8 = run_bayes_bench(tmp_path / "results" / "bayes-t8.json", quick=True, progress=False,
                           settings={**TINY, "bayes_steps": 8}, data_sets=("mnist",))
    assert res8["config"]["ntm_steps"] == 8 and [r.get("steps") for r in res8["rows"]] == [8, 8, 8, None, None]
    assert res8["rows"][2]["levels"] == list(range(1, 8))
    assert list(res8["rows"][1]["accuracy_by_level"]) == [str(j) for j in range(1, 8)]
    assert res8["rows"][1]["accuracy_by_level"]["2"]["t"] == pytest.approx(by_level["1"]["t"], abs=1e-6)
    assert _untimed(res8["rows"][3:]) == _untimed(res["rows"][3:])
    # a run of one's own (here the bench's NTM, named by its folder): NTM's rows as before, no FM row
    run = next((tmp_path / "results").rglob("runs/ntm"))
    mine = run_bayes_bench(tmp_path / "results" / "bayes-ntm.json", quick=True, progress=False, settings=TINY,
                           data_sets=("mnist",), run=run)
    assert [r["method"] for r in mine["rows"]] == ["ntm-bayes", "ntm-bayes-noisy", "ntm-bayes-levels", "cnn"]
    assert mine["config"]["run"] == str(run) and "preset" not in mine["config"]
    saved = json.loads((run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "config.json").read_text())
    assert mine["config"]["run_train"] == {"steps": saved["train"]["steps"], "batch_size": saved["train"]["batch_size"],
                                           "lr": saved["train"]["lr"], "objective": saved["train"]["objective"],
                                           "hybrid_weight": saved["train"]["hybrid_weight"], "saved_at_step": saved["step"]}
    assert res["config"]["preset"] == TINY["preset"] and "run_train" not in res["config"]
    assert _untimed(mine["rows"]) == _untimed(res["rows"][:3] + [res["rows"][4]])
    with pytest.raises(ConfigError, match="one model"):
        run_bayes_bench(tmp_path / "results" / "bayes-two.json", quick=True, progress=False, settings=TINY,
                        data_sets=("mnist", "fashion"), run=run)
    assert not (tmp_path / "results" / "bayes-two.json").exists()
    with pytest.raises(CheckpointError, match="no NTM in"):
        run_bayes_bench(tmp_path / "results" / "bayes-missing.json", quick=True, progress=False, settings=TINY,
                        data_sets=("mnist",), run=tmp_path / "missing")
    assert not (tmp_path / "results" / "bayes-missing.json").exists()


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds_per_1000"} for r in rows]


def test_a_partial_rerun_keeps_the_rows_of_the_other_training_sets(tmp_path):
    from ntm.bench.ood import previous_results

    out = tmp_path / "ood.json"
    config = {"n": 10, "ks": (1, 2), "models": {"mnist": {}}}
    rows = [{"train_data": "mnist", "auroc": 0.9}, {"train_data": "fashion", "auroc": 0.7}]
    out.write_text(json.dumps({"config": {**config, "ks": [1, 2]}, "rows": rows}))
    kept, old = previous_results(out, config, "train_data", ("fashion",))
    assert kept == rows[:1] and old["n"] == 10
    assert previous_results(out, {**config, "n": 11}, "train_data", ("fashion",)) == ([], {})
    assert previous_results(tmp_path / "missing.json", config, "train_data", ("fashion",)) == ([], {})
    # settings outside ``keys`` (e.g. the tightness figure's) do not drop the rows
    assert previous_results(out, {**config, "ks": (1,)}, "train_data", ("fashion",), keys=("n",))[0] == rows[:1]


def test_the_new_tables_are_recognised_as_bench_output(tmp_path):
    from ntm.bench.common import check_bench_output
    from ntm.bench.tables import table_for

    for rows in ([{"train_data": "mnist", "ood_data": "noise", "method": "glow", "auroc": 1.0, "aupr": 1.0,
                   "nfe_per_image": 1, "seconds_per_1000": 2.0, "n_in": 5, "n_out": 5}],
                 [{"data": "mnist", "method": "cnn", "accuracy": 0.98, "ece": 0.01, "n": 10}],
                 [{"data": "mnist", "model": "ntm", "steps": 4, "level": 1, "t": 0.3, "gap_nats": 0.01, "se": None,
                   "n": 1}]):
        config = {"sum_over_noisy_levels": {"4": {"levels": 3, "noisy_levels_nats": 0.01, "noisy_levels_bits": 0.014}}}
        out = tmp_path / "r.json"
        out.write_text(json.dumps({"rows": rows, "config": config}))
        out.with_suffix(".md").write_text(table_for({"rows": rows, "config": config}))
        check_bench_output(out)  # a re-run may replace its own table


def test_tightness_bench_needs_a_multi_t_model(tmp_path, capsys):
    plain = tmp_path / "plain"
    assert main(["train", "--data", "checkerboard", "--preset", "tiny", "--out", str(plain), "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["bench", "tightness", "--run", str(plain), "--out", str(tmp_path / "t.json"), "--no-progress"])
    assert one_error_line(code, capsys.readouterr().err, "needs a multi-T model")
    code = main(["bench", "tightness", "--run", str(tmp_path / "none"), "--out", str(tmp_path / "t.json"), "--no-progress"])
    assert one_error_line(code, capsys.readouterr().err, "no multi-T model")
    for bad in (["--ks", "4,x"], ["--steps", "0"], ["--ks", ""]):
        code = main(["bench", "tightness", *bad, "--out", str(tmp_path / "t.json"), "--no-progress"])
        assert one_error_line(code, capsys.readouterr().err, "comma-separated integers")
    assert not (tmp_path / "t.json").exists()


@pytest.mark.slow
def test_tightness_bench_end_to_end(tmp_path):
    src, spec = labelled_source("mnist")
    p = get_preset("mnist-multi-t")
    cfg = replace(p.ntm(spec), transporter=TransporterConfig(blocks=1, layers=1, width=16, heads=2),
                  predictor=replace(p.predictor, layers=1, width=16, heads=2))
    train_or_reuse(tmp_path / "run", cfg, replace(p.train, steps=2, warmup=1, checkpoint_every=2), src, False)
    out = tmp_path / "tight.json"
    assert main(["bench", "tightness", "--quick", "--run", str(tmp_path / "run"), "--out", str(out), "--no-progress"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["steps"], r["trajectories"]) for r in rows] == [(4, 1), (4, 4), (8, 1), (8, 4), (16, 1), (16, 4)]
    # the IW bound is never above the ELBO bound of the same trajectories; K = 1: they coincide
    assert all(r["iw_bpd"] <= r["elbo_bpd"] + 1e-6 for r in rows)
    assert all(abs(r["iw_bpd"] - r["elbo_bpd"]) < 1e-5 for r in rows if r["trajectories"] == 1)
    assert (tmp_path / "tight" / "iw-vs-t.png").is_file()
    assert out.with_suffix(".md").read_text().startswith("| data | model | T | K |")
    # some T and K only, on n images; a T the model was not trained for is one clear error
    assert main(["bench", "tightness", "--run", str(tmp_path / "run"), "--out", str(out), "--n", "3", "--ks", "2",
                 "--steps", "8", "--no-progress"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["steps"], r["trajectories"], r["n"]) for r in rows] == [(8, 2, 3)]
    with pytest.raises(ConfigError, match="trained for T"):
        run_tightness_bench(tmp_path / "t2.json", run=tmp_path / "run", n=2, ks=(1,), Ts=(5,), progress=False)
    # the coupling gap of the same model: one row per level of each grid, never below 0, and a sum per T
    out = tmp_path / "coupling.json"
    assert main(["bench", "coupling", "--quick", "--run", str(tmp_path / "run"), "--steps", "4,8", "--out", str(out),
                 "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert [(r["steps"], r["level"]) for r in res["rows"]] == [(4, k) for k in range(4)] + [(8, k) for k in range(8)]
    assert all(r["gap_nats"] >= -1e-9 for r in res["rows"]) and set(res["config"]["sum_over_noisy_levels"]) == {"4", "8"}
    assert out.with_suffix(".md").read_text().startswith("| T | level | t | coupling gap")
    with pytest.raises(ConfigError, match="trained for T"):
        run_coupling_bench(tmp_path / "c2.json", run=tmp_path / "run", n=1, Ts=(5,), progress=False)


def test_likelihood_benches_score_the_runs_of_a_named_preset(tmp_path, monkeypatch, capsys):
    """--preset picks the recipe whose runs are scored and names the results file after it (the
    default recipe keeps results/<bench>.json); an unknown preset is one error line and no file."""
    import ntm.cli as cli

    monkeypatch.setenv("NTM_RESULTS_DIR", str(tmp_path))
    seen = []

    def fake(out, quick, progress, settings=None, data_sets=()):
        seen.append((out.name, (settings or {}).get("preset")))
        return {"config": {}, "rows": [{"data": "mnist", "method": "cnn", "accuracy": 0.9, "ece": 0.1, "n": 1}]}

    monkeypatch.setattr(cli, "run_bayes_bench", fake)
    assert main(["bench", "bayes", "--preset", "mnist-affine", "--no-progress"]) == 0
    assert main(["bench", "bayes", "--no-progress"]) == 0
    assert main(["bench", "bayes", "--preset", "mnist", "--no-progress"]) == 0
    assert seen == [("bayes-mnist-affine.json", "mnist-affine"), ("bayes.json", None), ("bayes.json", "mnist")]
    # the bench draws no figure, so the closing line names no pictures folder
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("wrote") and "pictures" not in last
    (tmp_path / "bayes").mkdir()
    assert main(["bench", "bayes", "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"pictures in {tmp_path / 'bayes'}/")
    # another number of trajectories is a setting of its own and a file of its own
    seen.clear()
    monkeypatch.setattr(cli, "run_bayes_bench", lambda out, quick, progress, settings=None, data_sets=(): (
        seen.append((out.name, settings["bayes_k"])) or {"config": {}, "rows": []}))
    assert main(["bench", "bayes", "--trajectories", "32", "--no-progress"]) == 0
    assert main(["bench", "bayes", "--trajectories", "8", "--no-progress"]) == 0
    assert main(["bench", "bayes", "--quick", "--trajectories", "8", "--no-progress"]) == 0
    assert seen == [("bayes-k32.json", 32), ("bayes.json", 8), ("bayes-k8-quick.json", 8)]
    assert main(["bench", "bayes", "--trajectories", "0", "--no-progress"]) == 2
    # so is another trajectory length T
    seen.clear()
    monkeypatch.setattr(cli, "run_bayes_bench", lambda out, quick, progress, settings=None, data_sets=(): (
        seen.append((out.name, settings.get("bayes_steps"))) or {"config": {}, "rows": []}))
    assert main(["bench", "bayes", "--steps", "16", "--no-progress"]) == 0
    assert main(["bench", "bayes", "--trajectories", "16", "--steps", "8", "--no-progress"]) == 0
    assert main(["bench", "bayes", "--no-progress"]) == 0
    assert seen == [("bayes-t16.json", 16), ("bayes-k16-t8.json", 8), ("bayes.json", None)]
    assert main(["bench", "bayes", "--steps", "0", "--no-progress"]) == 2
    # a run of one's own is named by its folder; --preset beside it is one clear error
    seen.clear()
    monkeypatch.setattr(cli, "run_bayes_bench", lambda out, quick, progress, settings=None, data_sets=(), run=None: (
        seen.append((out.name, data_sets, run.name)) or {"config": {}, "rows": []}))
    assert main(["bench", "bayes", "--run", str(tmp_path / "mnist-12k"), "--data", "mnist", "--no-progress"]) == 0
    assert main(["bench", "bayes", "--run", str(tmp_path / "mnist-12k"), "--data", "mnist", "--steps", "16",
                 "--no-progress"]) == 0
    assert seen == [("bayes-mnist-12k.json", ("mnist",), "mnist-12k"), ("bayes-mnist-12k-t16.json", ("mnist",), "mnist-12k")]
    capsys.readouterr()
    assert one_error_line(main(["bench", "bayes", "--run", str(tmp_path), "--preset", "mnist-affine", "--no-progress"]),
                          capsys.readouterr().err, "--run and --preset")
    capsys.readouterr()
    assert one_error_line(main(["bench", "bayes", "--preset", "nope", "--no-progress"]), capsys.readouterr().err, "nope")
    assert not (tmp_path / "bayes-nope.json").exists()
