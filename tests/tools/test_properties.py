"""Property-based tests: malformed data, checkpoints and options always end in one clear error line."""


import string
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from ntm.cli import main
from ntm.data import load_array
from ntm.errors import DataError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


dtypes = st.sampled_from([np.float32, np.float64, np.int64, np.int8, np.uint8, np.bool_, np.complex64, "U3"])


@SETTINGS
@given(arr=arrays(dtype=dtypes, shape=array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
@example(arr=np.full((2, 2), 3.40282357e38))  # finite in float64, beyond float32's range
def test_load_array_accepts_only_finite_numeric_n_by_2(tmp_path, arr):
    path = tmp_path / "a.npy"
    np.save(path, arr)
    try:
        x = load_array(path)
    except DataError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert x.shape[1] == 2 and x.shape[0] >= 2 and arr.dtype.kind in "fiu"
    assert torch.isfinite(x).all()


@SETTINGS
@given(payload=st.binary(max_size=200), suffix=st.sampled_from([".npy", ".csv"]))
def test_garbage_data_files_give_one_error_line(tmp_path, capsys, payload, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(payload)
    try:
        arr = load_array(path)
        if arr.shape[0] >= 2:
            return  # garbage that happens to parse as >= 2 finite 2-D rows is valid data
    except DataError:
        pass
    code = main(["train", "--data", str(path), "--preset", "tiny", "--steps", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code != 0
    assert len([line for line in err.splitlines() if line.strip()]) == 1 and "Traceback" not in err
    assert path.read_bytes() == payload
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("prop") / "run"
    assert main(["train", "--data", "moons", "--preset", "tiny", "--steps", "4", "--out", str(d), "--no-progress"]) == 0
    return d


def _checkpoint_files(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


@SETTINGS
@given(target=st.sampled_from(["model.safetensors", "config.json"]), payload=st.binary(max_size=300),
       keep=st.integers(min_value=0, max_value=400))
def test_truncated_or_garbage_checkpoints_give_one_error_line(tmp_path, capsys, run_dir, target, payload, keep):
    import shutil
    run = tmp_path / "copy"
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(run_dir, run)
    f = _checkpoint_files(run) / target
    original = f.read_bytes()
    f.write_bytes(original[:keep] + payload if keep < len(original) else payload)
    out = tmp_path / "s.npy"
    code = main(["sample", str(run), "--n", "3", "--out", str(out)])
    err = capsys.readouterr().err
    if code == 0:  # the mutation left a valid checkpoint (e.g. equivalent JSON): then sampling is fine
        out.unlink()
        return
    assert len([line for line in err.splitlines() if line.strip()]) == 1 and "Traceback" not in err
    assert not out.exists()


option_names = st.text(alphabet=string.ascii_lowercase + "-", min_size=1, max_size=12)


@SETTINGS
@given(name=option_names)
def test_unknown_presets_options_and_data_names(tmp_path, capsys, name):
    for argv in (["train", "--data", "moons", "--preset", "zz" + name, "--out", str(tmp_path / "r")],
                 ["train", "--data", "zz" + name, "--out", str(tmp_path / "r")],
                 ["train", "--zz" + name, "1"],
                 ["bench", "toy", "--preset", "zz" + name]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code != 0, argv
        assert len([line for line in err.splitlines() if line.strip()]) == 1 and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "r").exists()


@SETTINGS
@given(label=st.integers(min_value=-5, max_value=50), n=st.integers(min_value=-3, max_value=0))
def test_bad_sampling_options(tmp_path, capsys, run_dir, label, n):
    for argv in (["sample", str(run_dir), "--n", str(n), "--out", str(tmp_path / "s.npy")],
                 ["sample", str(run_dir), "--n", "3", "--class", str(label), "--out", str(tmp_path / "s.npy")],
                 ["sample", str(run_dir), "--n", "3", "--out", str(tmp_path / "s.txt")],
                 ["sample", str(run_dir), "--n", "3", "--steps", "0", "--out", str(tmp_path / "s.npy")]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code != 0, argv
        assert len([line for line in err.splitlines() if line.strip()]) == 1 and "Traceback" not in err, (argv, err)
        assert not (tmp_path / "s.npy").exists()


def test_unwritable_output_locations(tmp_path, capsys, run_dir):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    for argv in (["sample", str(run_dir), "--n", "3", "--out", str(blocker / "s.npy")],
                 ["train", "--data", "moons", "--preset", "tiny", "--out", str(blocker / "run")],
                 ["train", "--data", "moons", "--preset", "tiny", "--out", str(blocker)]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code != 0, argv
        assert len([line for line in err.splitlines() if line.strip()]) == 1 and "Traceback" not in err, (argv, err)
    assert blocker.read_text() == "mine"

