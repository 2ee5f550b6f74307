"""Data only the tools layer reads (image folders, via Pillow), and images end to end on the CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

from ntm.cli import main
from ntm.data import from_tokens, to_tokens
from ntm.errors import DataError
from ntm.likelihood import bits_per_dim
from ntm.tools.datasets import open_data


def _write_png(path, arr):
    Image.fromarray(arr).save(path)


def test_user_image_folder_with_classes_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "ok" / cls).mkdir(parents=True)
        for i in range(3):
            _write_png(tmp_path / "ok" / cls / f"{i}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    src = open_data(str(tmp_path / "ok"), patch=2)
    assert src.images.shape == (6, 1, 8, 8) and src.labels.tolist() == [0, 0, 0, 1, 1, 1]
    spec = src.spec()
    assert spec.num_classes == 2 and spec.num_tokens == 16 and spec.token_dim == 4
    x, y = src.sample(4, torch.Generator().manual_seed(0))
    assert torch.allclose(from_tokens(to_tokens(x, spec), spec), x)

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG or JPEG"):
        open_data(str(tmp_path / "empty"))
    (tmp_path / "mixed").mkdir()
    _write_png(tmp_path / "mixed" / "a.png", np.zeros((8, 8), np.uint8))
    _write_png(tmp_path / "mixed" / "b.png", np.zeros((9, 8), np.uint8))
    with pytest.raises(DataError, match="differ in size"):
        open_data(str(tmp_path / "mixed"))
    (tmp_path / "text").mkdir()
    _write_png(tmp_path / "text" / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "text" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not a PNG"):
        open_data(str(tmp_path / "text"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="unreadable"):
        open_data(str(tmp_path / "broken"))


def test_image_ntm_end_to_end_cli(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            _write_png(tmp_path / "imgs" / cls / f"{i}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "imgs"), "--preset", "tiny", "--patch", "2", "--steps", "6",
                 "--out", str(run), "--no-progress"]) == 0
    assert main(["sample", str(run), "--n", "4", "--class", "1", "--guidance", "1.5", "--out", str(tmp_path / "s.npy"),
                 "--png", str(tmp_path / "s.png")]) == 0
    s = np.load(tmp_path / "s.npy")
    assert s.shape == (4, 1, 8, 8) and np.isfinite(s).all()
    assert main(["sample", str(run), "--n", "3", "--each-class", "--out", str(tmp_path / "e.npy"),
                 "--png", str(tmp_path / "e.png")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (6, 1, 8, 8) and (tmp_path / "e.png").stat().st_size > 500
    assert main(["sample", str(run), "--n", "12", "--each-class", "--out", str(tmp_path / "e12.npy"),
                 "--png", str(tmp_path / "e12.png")]) == 0  # 10 of each class drawn in the grid
    assert np.load(tmp_path / "e12.npy").shape == (24, 1, 8, 8) and (tmp_path / "e12.png").is_file()
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(tmp_path / "imgs"), "--trajectories", "2", "--json"]) == 0
    import json
    res = json.loads(capsys.readouterr().out)
    assert res["bits_per_dim"] == pytest.approx(bits_per_dim(res["nll_bound_nats"], 64))
    assert res["bits_per_dim"] > 0

