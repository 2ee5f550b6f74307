"""`ntm bench text` end to end on a tiny budget (stub encoder, a small canvas), and its scoring."""

import json

import pytest
import torch

import ntm.captions as captions
import ntm.cli as cli
import ntm.bench.text as text_bench
from ntm.bench.text import accuracy_row, load_or_train_cell_classifier, read_canvases, run_text_bench, evaluation_prompts, train_cell_classifier
from ntm.canvas import COLOR_NAMES, EMPTY, TASKS, make_canvases
from ntm.cli import main
from ntm.errors import ConfigError
from ntm.hub import load_model
from ntm.images import dequantize, load_named
from ntm.tools.datasets import open_text_data

from conftest import StubEncoder, one_error_line

TINY = {"preset": "tiny", "n_prompts": 3, "sweep": (0.0, 1.0), "cell_steps": 20, "probe_steps": 1}


@pytest.fixture
def tiny_canvas(tmp_path, monkeypatch):
    """Results and caches under tmp_path, and a canvas of 300 training and 40 test images."""
    monkeypatch.setenv("NTM_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("NTM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(captions, "CANVAS_TRAIN", 300)
    monkeypatch.setattr(captions, "CANVAS_TEST", 40)


def test_accuracy_row_scores_each_task_and_the_held_out_splits():
    specs = evaluation_prompts(4)
    assert [s.task for s in specs] == [t for t in TASKS for _ in range(4)]
    red = COLOR_NAMES.index("red")
    wrong = [[(EMPTY, -1), (EMPTY, -1)] for _ in specs]
    row = accuracy_row(specs, wrong)
    assert row["acc_overall"] == 0.0
    # the ground truth of a "single" prompt passes, the rest stay wrong
    fixed = [[(s.a, red), (EMPTY, -1)] if s.task == "single" else w for s, w in zip(specs, wrong)]
    row = accuracy_row(specs, fixed)
    assert row["acc_single"] == 1.0 and row["acc_overall"] == pytest.approx(1 / len(TASKS))


def test_cell_classifier_reads_canvases_it_was_trained_on():
    x, y = load_named("mnist", "train")
    images, specs, cells = make_canvases(600, x[:3000], y[:3000], seed=0)
    clf, acc = train_cell_classifier(images, cells, steps=150)
    assert acc["digit_acc"] > 0.5 and acc["color_acc"] > 0.8
    read = read_canvases(clf, dequantize(images[:50], torch.Generator().manual_seed(0)))
    empties = sum(r[i][0] == EMPTY for r in read for i in range(2))
    assert empties == int((cells[:50, :, 0] == EMPTY).sum())


def test_text_bench_end_to_end(tmp_path, tiny_canvas):
    res = run_text_bench(quick=True, progress=False, settings=TINY, encoder=StubEncoder(dim=8, max_tokens=8))
    assert [(r["model"], r["steps"]) for r in res["rows"]] == [("ntm", 4), ("ntm-ft", 4), ("fm", 4), ("fm", 50)]
    keys = ("acc_overall", "acc_single", "acc_two", "acc_counting", "acc_colors", "acc_position", "acc_color_attr",
            "acc_heldout_phrasing", "acc_heldout_combination")
    for r in res["rows"]:
        for k in keys:
            assert 0.0 <= r[k] <= 1.0 or r[k] != r[k], (k, r[k])  # NaN only when a split is empty
        assert r["fid"] >= 0 and r["img_per_s"] > 0 and r["train_seconds"] > 0
    assert [r["nfe"] for r in res["rows"]] == [8, 8, 8, 100]
    out = tmp_path / "results" / "text-quick.json"
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    assert "| ntm | 4 | 2 |" in out.with_suffix(".md").read_text()
    folder = out.with_suffix("")
    for png in ("prompt-grid.png", "guidance-accuracy.png", "guidance-fid.png", "samples-ntm-4.png"):
        assert (folder / png).stat().st_size > 1000
    cost = res["config"]["step_cost"]
    assert cost["text_over_labels"] == pytest.approx(cost["text_seconds_per_step"] / cost["labels_seconds_per_step"])
    assert cost["steps_timed"] == 4 and len(res["config"]["guidance_sweep"]) == 2  # probe_steps 1: one step in each of 4 rounds


def test_text_bench_runs_one_model_with_cross_attention(tmp_path, tiny_canvas):
    enc = StubEncoder(dim=8, max_tokens=8)
    res = run_text_bench(quick=True, progress=False, settings={**TINY, "models": ("ntm",), "text_attention": "cross",
                                                               "sweep": (1.0,)}, encoder=enc)
    assert [(r["model"], r["steps"]) for r in res["rows"]] == [("ntm", 4)]
    assert res["config"]["text_attention"] == "cross" and "cross-attention" in res["config"]["conditioning"]
    assert res["config"]["finetune_steps"] is None
    with pytest.raises(ConfigError, match="ntm-ft needs fm"):
        run_text_bench(quick=True, progress=False, settings={**TINY, "models": ("ntm-ft",)}, encoder=enc)


def test_text_attention_is_for_text_data_only(tmp_path, capsys):
    code = main(["train", "--data", "checkerboard", "--preset", "tiny", "--text-attention", "cross",
                 "--out", str(tmp_path / "run"), "--no-progress"])
    assert one_error_line(code, capsys.readouterr().err, "--text-attention applies to text data only")
    assert not (tmp_path / "run").exists()


def test_a_bench_of_some_models_keeps_the_other_models_rows_of_the_same_comparison(tmp_path, tiny_canvas):
    enc = StubEncoder(dim=8, max_tokens=8)
    first = run_text_bench(quick=True, progress=False, settings={**TINY, "models": ("ntm",), "sweep": (1.0,)}, encoder=enc)
    res = run_text_bench(quick=True, progress=False, settings={**TINY, "models": ("fm",)}, encoder=enc)
    assert [(r["model"], r["steps"]) for r in res["rows"]] == [("ntm", 4), ("fm", 4), ("fm", 50)]
    assert res["rows"][0] == first["rows"][0]
    assert res["config"]["rows_kept_from_earlier_run"] == ["ntm"]
    assert res["config"]["guidance_sweep"] == first["config"]["guidance_sweep"]
    out = tmp_path / "results" / "text-quick.json"
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    # another comparison (more prompts) keeps nothing
    res = run_text_bench(quick=True, progress=False, settings={**TINY, "models": ("fm",), "n_prompts": 4}, encoder=enc)
    assert [r["model"] for r in res["rows"]] == ["fm", "fm"] and "rows_kept_from_earlier_run" not in res["config"]


def test_text_bench_preset_names_its_results_file_and_an_unknown_one_is_one_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NTM_RESULTS_DIR", str(tmp_path / "results"))
    seen = []

    def fake_bench(out, quick, progress, settings):
        seen.append((out.name, settings["preset"] if "preset" in settings else None, settings["models"]))
        return {"rows": [], "config": {}}

    monkeypatch.setattr(cli, "run_text_bench", fake_bench)
    assert main(["bench", "text", "--models", "ntm", "--no-progress"]) == 0
    assert main(["bench", "text", "--models", "ntm", "--preset", "mnist", "--no-progress"]) == 0
    assert main(["bench", "text", "--models", "ntm", "--preset", "mnist-affine", "--no-progress"]) == 0
    assert main(["bench", "text", "--models", "ntm", "--preset", text_bench.TEXT_PRESET, "--no-progress"]) == 0
    assert seen == [("text.json", None, ("ntm",)), ("text-mnist.json", "mnist", ("ntm",)),
                    ("text-mnist-affine.json", "mnist-affine", ("ntm",)), ("text.json", text_bench.TEXT_PRESET, ("ntm",))]
    capsys.readouterr()
    code = main(["bench", "text", "--preset", "huge", "--no-progress"])
    assert one_error_line(code, capsys.readouterr().err, "huge")
    assert len(seen) == 4 and not (tmp_path / "results").exists()


def test_cell_classifiers_of_two_budgets_are_cached_side_by_side(tiny_canvas, monkeypatch):
    src = open_text_data("canvas", encoder=StubEncoder(dim=8, max_tokens=8))
    _, five = load_or_train_cell_classifier(src, 5, progress=False)
    _, six = load_or_train_cell_classifier(src, 6, progress=False)
    assert (five["steps"], six["steps"]) == (5, 6)
    assert five["recipe"] == {"lr": 1e-3, "batch": 128, "seed": 0, "feature_images": 4000}

    def no_training(*args, **kwargs):
        raise AssertionError("a cached classifier was trained again")

    monkeypatch.setattr(text_bench, "train_cell_classifier", no_training)
    assert load_or_train_cell_classifier(src, 5, progress=False)[1] == five
    assert load_or_train_cell_classifier(src, 6, progress=False)[1] == six


def test_the_canvas_patch_size_is_part_of_the_comparison(tmp_path, tiny_canvas):
    enc = StubEncoder(dim=8, max_tokens=8)
    first = run_text_bench(quick=True, progress=False, settings={**TINY, "models": ("ntm",), "sweep": (1.0,), "patch": 7},
                           encoder=enc)
    assert first["config"]["patch"] == 7
    model = load_model(tmp_path / "results" / "text-quick" / "runs" / "ntm")
    assert (model.spec.patch, model.spec.num_tokens, model.spec.token_dim) == (7, 4 * 8, 3 * 49)
    # FM on the default patch (4) is another comparison: the patch-7 NTM row is not kept
    res = run_text_bench(quick=True, progress=False, settings={**TINY, "models": ("fm",)}, encoder=enc)
    assert [r["model"] for r in res["rows"]] == ["fm", "fm"] and "rows_kept_from_earlier_run" not in res["config"]
    # a results file written before the key existed was measured on patch 4: its rows stand beside patch-4 rows
    out = tmp_path / "results" / "text-quick.json"
    old = json.loads(out.read_text())
    del old["config"]["patch"]
    out.write_text(json.dumps(old))
    res = run_text_bench(quick=True, progress=False, settings={**TINY, "models": ("ntm",), "sweep": (1.0,)}, encoder=enc)
    assert res["config"]["rows_kept_from_earlier_run"] == ["fm"] and res["config"]["patch"] == 4


def test_bench_text_with_a_patch_that_does_not_divide_the_canvas_is_one_error(tmp_path, tiny_canvas, capsys,
                                                                              monkeypatch):
    monkeypatch.setattr(text_bench, "load_encoder", lambda name: StubEncoder(dim=8, max_tokens=8))
    out = tmp_path / "mine.json"
    code = main(["bench", "text", "--quick", "--patch", "5", "--out", str(out), "--no-progress"])
    assert one_error_line(code, capsys.readouterr().err, "not divisible by the patch size 5")
    assert not out.exists() and not out.with_suffix("").exists()


def test_text_step_cost_interleaves_label_and_text_steps(tiny_canvas, monkeypatch):
    """Warm-up steps of each model, then rounds that alternate label and text steps, so a change in
    machine load falls on both; every timed step counts once."""
    calls = []
    real = text_bench.make_objective

    class Logged:  # the probe calls an objective and its draw_noise, nothing else
        def __init__(self, objective, name):
            self.objective, self.name = objective, name

        def __call__(self, *args, **kwargs):
            calls.append(self.name)
            return self.objective(*args, **kwargs)

        def draw_noise(self, *args, **kwargs):
            return self.objective.draw_noise(*args, **kwargs)

    def logged(model, train_cfg, device):
        return Logged(real(model, train_cfg, device), "text" if model.spec.text_dim else "labels")

    monkeypatch.setattr(text_bench, "make_objective", logged)
    cost = text_bench.text_step_cost("tiny", StubEncoder(dim=8, max_tokens=8), steps=8, warmup=1, rounds=4)
    assert calls == ["labels", "text"] + ["labels", "labels", "text", "text"] * 4
    assert cost["steps_timed"] == 8 and cost["labels_seconds_per_step"] > 0 and cost["text_seconds_per_step"] > 0
