"""Position embeddings: the fixed 2-D sin-cos option follows its formula over the patch grid, is not
trained, reaches the predictor, the FM baseline and a finetune from FM, survives a save/load, and an
unknown option is refused."""

import math
from dataclasses import replace

import pytest
import torch
from conftest import randomize

from ntm import FlowMatching
from ntm.config import (BackboneConfig, DataSpec, FMConfig, NTMConfig, PredictorConfig, TrajectoryConfig,
                        TransporterConfig, get_preset, to_dict, validate_model_config)
from ntm.io import write_artifact
from ntm.model import NTM
from ntm.nn import sincos_positions
from ntm.train.finetune import finetune_config


def test_sincos_positions_follow_the_formula_on_a_row_major_grid():
    rows, cols, width = 3, 5, 16
    pos = sincos_positions((rows, cols), width)
    assert pos.shape == (rows * cols, width)
    k = width // 4
    for i in range(rows):
        for j in range(cols):
            want = []
            for coord in (i, j):
                want += [math.sin(coord / 10_000 ** (f / k)) for f in range(k)]
                want += [math.cos(coord / 10_000 ** (f / k)) for f in range(k)]
            assert torch.allclose(pos[i * cols + j], torch.tensor(want), atol=1e-6)
    # every token's embedding has norm sqrt(width / 2) and no two tokens share one
    assert torch.allclose(pos.norm(dim=1), torch.full((rows * cols,), math.sqrt(width / 2)))
    assert torch.cdist(pos, pos).add(torch.eye(rows * cols)).min() > 0.1
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_positions((2, 2), 10)


def _image_spec() -> DataSpec:
    return DataSpec(kind="image", shape=(1, 4, 8), mean=(0.0,), std=(1.0,), patch=2, num_classes=3)


def test_sincos_positions_reach_both_models_untrained_and_reload(tmp_path):
    spec = _image_spec()
    assert spec.grid == (2, 4) and DataSpec(shape=(3,), mean=(0.0,) * 3, std=(1.0,) * 3).grid == (1, 3)
    cfg = NTMConfig(data=spec, trajectory=TrajectoryConfig(T=4, shift=-1.0),
                    transporter=TransporterConfig(blocks=1, layers=1, width=8, heads=2),
                    predictor=PredictorConfig(layers=1, width=16, heads=2, position="sincos"))
    model = NTM(cfg)
    randomize(model, 0.2)
    assert torch.equal(model.predictor.pos, sincos_positions((2, 4), 16))
    assert all(p is not model.predictor.pos for p in model.parameters())  # fixed: no optimiser sees it
    write_artifact(tmp_path / "m", "ntm", to_dict(cfg), {"model": model.state_dict()}, meta={"step": 0})
    again = NTM.from_pretrained(tmp_path / "m").eval()
    assert again.config.predictor.position == "sincos"
    u, t = torch.randn(2, 8, 4), torch.full((2,), 0.7)
    with torch.no_grad():
        assert torch.allclose(again.predictor(u, t, t / 2)[0], model.eval().predictor(u, t, t / 2)[0])
    fm_cfg = FMConfig(data=spec, velocity=BackboneConfig(1, 16, 2, position="sincos"))
    fm = FlowMatching(fm_cfg)
    assert torch.equal(fm.velocity.pos, sincos_positions((2, 4), 16))
    # a finetune starts from the FM network as it is: same positions, same conditioning
    ft = finetune_config(replace(fm_cfg, velocity=BackboneConfig(1, 16, 2, "adaln", 1.0, "sincos")))
    assert (ft.predictor.kind, ft.predictor.position, ft.predictor.conditioning, ft.predictor.condition_std) == \
        ("velocity", "sincos", "adaln", 1.0)
    p = get_preset("mnist-sincos")
    assert p.ntm(spec).predictor.position == "sincos" and p.fm(spec).velocity.position == "sincos"
    assert get_preset("mnist").ntm(spec).predictor.position == "learned"


def test_an_unknown_position_embedding_is_refused():
    spec = _image_spec()
    cfg = get_preset("tiny").ntm(spec)
    with pytest.raises(ValueError, match="unknown predictor position embedding 'rope'"):
        validate_model_config(replace(cfg, predictor=replace(cfg.predictor, position="rope")))
    with pytest.raises(ValueError, match="unknown velocity position embedding 'rope'"):
        validate_model_config(FMConfig(data=spec, velocity=BackboneConfig(position="rope")))
    with pytest.raises(ValueError, match="predictor sin-cos positions need a width divisible by 4, got 6"):
        validate_model_config(replace(cfg, predictor=replace(cfg.predictor, width=6, heads=2, position="sincos")))
