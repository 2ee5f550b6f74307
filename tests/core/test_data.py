"""Toy generators, closed-form densities, user files and the token layout."""

import math

import numpy as np
import pytest
import torch

from ntm.config import DataSpec
from ntm.data import TOY_NAMES, DataSource, from_tokens, load_array, open_source, sample_toy, to_tokens, toy_log_density
from ntm.errors import DataError


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toys_are_seeded_2d_and_finite(name):
    a = sample_toy(name, 1000, torch.Generator().manual_seed(0))
    b = sample_toy(name, 1000, torch.Generator().manual_seed(0))
    assert a.shape == (1000, 2) and torch.isfinite(a).all() and torch.equal(a, b)


def test_checkerboard_density_is_exact():
    x = sample_toy("checkerboard", 20000, torch.Generator().manual_seed(1))
    logp = toy_log_density("checkerboard", x)
    assert torch.allclose(logp, torch.full_like(logp, -math.log(32)))  # every sample on the squares
    # Monte Carlo check that the squares hold all the mass: uniform points on [-4, 4]^2 land on them half the time
    u = torch.rand(100_000, 2, generator=torch.Generator().manual_seed(2)) * 8 - 4
    frac = float(torch.isfinite(toy_log_density("checkerboard", u)).double().mean())
    assert frac == pytest.approx(0.5, abs=0.01)


def test_eight_gaussians_density_normalises_and_matches_entropy():
    lin = torch.linspace(-6, 6, 801, dtype=torch.float64)
    gx, gy = torch.meshgrid(lin, lin, indexing="ij")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    mass = float(torch.exp(toy_log_density("8gaussians", grid)).sum() * (lin[1] - lin[0]) ** 2)
    assert mass == pytest.approx(1.0, abs=1e-3)
    x = sample_toy("8gaussians", 100_000, torch.Generator().manual_seed(3))
    assert float(-toy_log_density("8gaussians", x).mean()) == pytest.approx(2.831, abs=0.01)


def test_tokens_round_trip_and_standardisation():
    src = DataSource("moons")
    spec = src.spec()
    x = sample_toy("moons", 50000, torch.Generator().manual_seed(4))
    z = to_tokens(x, spec)
    assert z.shape == (50000, 2, 1)
    assert torch.allclose(z.mean(0), torch.zeros(2, 1), atol=0.02) and torch.allclose(z.std(0), torch.ones(2, 1), atol=0.02)
    assert torch.allclose(from_tokens(z, spec), x, atol=1e-5)
    with pytest.raises(DataError):
        to_tokens(torch.zeros(3, 5), spec)


def test_user_arrays(tmp_path):
    pts = np.random.default_rng(0).normal(size=(20, 2))
    np.save(tmp_path / "a.npy", pts)
    assert torch.allclose(load_array(tmp_path / "a.npy").double(), torch.from_numpy(pts), atol=1e-6)
    np.savetxt(tmp_path / "b.csv", pts, delimiter=",")
    assert load_array(tmp_path / "b.csv").shape == (20, 2)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_array(tmp_path / "empty.csv")
    np.save(tmp_path / "str.npy", np.array([["a", "b"]]))
    with pytest.raises(DataError, match="numbers"):
        load_array(tmp_path / "str.npy")
    np.save(tmp_path / "inf.npy", np.array([[1.0, np.inf], [0.0, 0.0]]))
    with pytest.raises(DataError, match="NaN or inf"):
        load_array(tmp_path / "inf.npy")
    (tmp_path / "x.txt").write_text("1,2")
    with pytest.raises(DataError, match="unsupported"):
        open_source(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="folder"):
        load_array(tmp_path)
    src = open_source(str(tmp_path / "a.npy"))
    x, _ = src.sample(7, torch.Generator().manual_seed(0))
    assert x.shape == (7, 2)
    assert src.spec().shape == (2,)


def test_spec_json_round_trip():
    from ntm.config import FinetuneConfig, NTMConfig, TrainConfig, from_dict, to_dict
    cfg = NTMConfig(data=DataSpec(name="x", mean=(1.0, 2.0), std=(3.0, 4.0)))
    assert from_dict(NTMConfig, to_dict(cfg)) == cfg
    train = TrainConfig(finetune=FinetuneConfig(teacher="runs/fm", aux_weight=1.5))
    assert from_dict(TrainConfig, to_dict(train)) == train and from_dict(TrainConfig, to_dict(TrainConfig())).finetune is None
    with pytest.raises(ValueError):
        from_dict(NTMConfig, {"bogus": 1})


def test_toy_labels_identify_the_component():
    from ntm.data import EIGHT_CENTERS, TOY_CLASSES, sample_toy_labeled
    g = torch.Generator().manual_seed(0)
    x, y = sample_toy_labeled("8gaussians", 5000, g)
    nearest = torch.cdist(x, EIGHT_CENTERS).argmin(1)
    assert float((nearest == y).double().mean()) > 0.99
    x, y = sample_toy_labeled("checkerboard", 5000, g)
    cell = (torch.floor(x / 2) + 2).long()
    assert torch.equal(y, cell[:, 0] * 2 + cell[:, 1] // 2) and set(y.tolist()) == set(range(8))
    for name, k in TOY_CLASSES.items():
        x, y = sample_toy_labeled(name, 1000, torch.Generator().manual_seed(1))
        assert torch.equal(x, sample_toy(name, 1000, torch.Generator().manual_seed(1)))  # labels cost no draws
        assert y.min() >= 0 and y.max() == k - 1

