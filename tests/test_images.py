"""Image data: loaders, dequantisation, patch tokens, bits/dim, and an image NTM end to end."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ntm.cli import main
from ntm.data import from_tokens, open_source, to_tokens
from ntm.errors import DataError
from ntm.images import bits_per_dim, dequantize, load_named, patchify, to_uint8, unpatchify


@pytest.mark.parametrize("name,mean", [("mnist", 33.32), ("fashion", 72.94)])
def test_mnist_and_fashion_load_offline(name, mean):
    if True:
        x, y = load_named(name, "train")
        assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
        assert y.shape == (60000,) and set(y.tolist()) == set(range(10))
        assert float(x.float().mean()) == pytest.approx(mean, abs=0.05)
        xt, yt = load_named(name, "test")
        assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)


def test_dequantisation_range_and_round_trip():
    q = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    x = dequantize(q, torch.Generator().manual_seed(0))
    assert x.min() >= -1 and x.max() < 1
    assert torch.equal(torch.floor((x + 1) * 128).to(torch.uint8), q)
    assert torch.equal(to_uint8((q.float() + 0.5) / 128 - 1), q)


@pytest.mark.parametrize("shape,p", [((1, 28, 28), 4), ((3, 8, 12), 2), ((2, 6, 6), 1)])
def test_patchify_round_trip_and_layout(shape, p):
    x = torch.randn((5,) + shape)
    t = patchify(x, p)
    C, H, W = shape
    assert t.shape == (5, (H // p) * (W // p), C * p * p)
    assert torch.equal(unpatchify(t, shape, p), x)
    # token 1 is the second patch of the first patch row
    assert torch.equal(t[0, 1].reshape(C, p, p), x[0, :, :p, p:2 * p])
    with pytest.raises(DataError):
        patchify(torch.zeros(1, 1, 5, 5), 2)


def test_bits_per_dim_by_hand():
    # uniform density on [-1, 1]^D: NLL = D ln 2 nats -> bpd = 1 + 7 = 8 bits (uniform over 256 levels)
    D = 784
    assert bits_per_dim(D * math.log(2), D) == pytest.approx(8.0)
    assert bits_per_dim(0.0, D) == pytest.approx(7.0)


def _write_png(path, arr):
    Image.fromarray(arr).save(path)


def test_user_image_folder_with_classes_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "ok" / cls).mkdir(parents=True)
        for i in range(3):
            _write_png(tmp_path / "ok" / cls / f"{i}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    src = open_source(str(tmp_path / "ok"), patch=2)
    assert src.images.shape == (6, 1, 8, 8) and src.labels.tolist() == [0, 0, 0, 1, 1, 1]
    spec = src.spec()
    assert spec.num_classes == 2 and spec.num_tokens == 16 and spec.token_dim == 4
    x, y = src.sample(4, torch.Generator().manual_seed(0))
    assert torch.allclose(from_tokens(to_tokens(x, spec), spec), x)

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG or JPEG"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "mixed").mkdir()
    _write_png(tmp_path / "mixed" / "a.png", np.zeros((8, 8), np.uint8))
    _write_png(tmp_path / "mixed" / "b.png", np.zeros((9, 8), np.uint8))
    with pytest.raises(DataError, match="differ in size"):
        open_source(str(tmp_path / "mixed"))
    (tmp_path / "text").mkdir()
    _write_png(tmp_path / "text" / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "text" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not a PNG"):
        open_source(str(tmp_path / "text"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="unreadable"):
        open_source(str(tmp_path / "broken"))


def test_user_image_arrays(tmp_path):
    np.save(tmp_path / "gray.npy", np.random.default_rng(0).integers(0, 256, (10, 8, 8)).astype(np.uint8))
    np.save(tmp_path / "rgb.npy", np.random.default_rng(0).random((10, 8, 8, 3)).astype(np.float32))
    assert open_source(str(tmp_path / "gray.npy")).images.shape == (10, 1, 8, 8)
    assert open_source(str(tmp_path / "rgb.npy"), patch=2).spec().token_dim == 12
    np.save(tmp_path / "bad.npy", np.full((4, 8, 8), 300))
    with pytest.raises(DataError, match="0..255"):
        open_source(str(tmp_path / "bad.npy"))
    np.save(tmp_path / "nan.npy", np.full((4, 8, 8), np.nan))
    with pytest.raises(DataError, match="NaN"):
        open_source(str(tmp_path / "nan.npy"))


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
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(tmp_path / "imgs"), "--trajectories", "2", "--json"]) == 0
    import json
    res = json.loads(capsys.readouterr().out)
    assert res["bits_per_dim"] == pytest.approx(bits_per_dim(res["nll_bound_nats"], 64))
    assert res["bits_per_dim"] > 0
