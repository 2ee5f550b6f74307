"""Image data: loaders, dequantisation, patch tokens, bits/dim, and an image NTM end to end."""

import math

import numpy as np
import pytest
import torch

from ntm.data import open_source
from ntm.errors import DataError
from ntm.images import dequantize, load_named, patchify, to_uint8, unpatchify
from ntm.likelihood import bits_per_dim


@pytest.mark.parametrize("name,mean", [("mnist", 33.32), ("fashion", 72.94)])
def test_mnist_and_fashion_load_offline(name, mean):
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

