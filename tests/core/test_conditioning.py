"""adaLN-Zero conditioning: each block starts as the identity, follows its formula once trained, the
predictor and the FM baseline read their condition through it, it survives a save/load, and an
unknown conditioning is refused."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize

from ntm import FlowMatching
from ntm.config import (BackboneConfig, DataSpec, FMConfig, NTMConfig, PredictorConfig, TrajectoryConfig,
                        TransporterConfig, get_preset, to_dict, validate_model_config)
from ntm.io import write_artifact
from ntm.model import NTM
from ntm.nn import ConditionedTransformer, Layer, Transformer


def test_an_adaln_layer_starts_as_the_identity_and_then_follows_its_formula():
    torch.manual_seed(0)
    layer = Layer(16, 2, adaln=True).eval()
    x, c = torch.randn(3, 5, 16), torch.randn(3, 16)
    assert torch.equal(layer(x, False, cond=c), x)  # zero gates: the residual stream passes unchanged
    randomize(layer, 0.3)
    b_a, a_a, g_a, b_m, a_m, g_m = (v[:, None] for v in (F.silu(c) @ layer.modulation.weight.T
                                                         + layer.modulation.bias).split(16, dim=-1))
    h = x + g_a * layer.attn(layer.norm1(x) * (1 + a_a) + b_a, False)
    want = h + g_m * layer.mlp(layer.norm2(h) * (1 + a_m) + b_m)
    assert torch.allclose(layer(x, False, cond=c), want, atol=1e-5)
    # every sample is modulated by its own condition only
    assert torch.allclose(layer(x[:1], False, cond=c[:1]), want[:1], atol=1e-5)


def test_an_adaln_transformer_needs_its_condition():
    net = Transformer(16, 1, 2, causal=False, adaln=True)
    with pytest.raises(ValueError, match="needs its condition vector"):
        net(torch.randn(2, 3, 16))


def _image_spec() -> DataSpec:
    return DataSpec(kind="image", shape=(1, 4, 4), mean=(0.0,), std=(1.0,), patch=2, num_classes=3)


def test_the_adaln_predictor_and_velocity_field_read_the_label_and_reload(tmp_path):
    spec = _image_spec()
    cfg = NTMConfig(data=spec, trajectory=TrajectoryConfig(T=4, shift=-1.0),
                    transporter=TransporterConfig(blocks=1, layers=1, width=8, heads=2),
                    predictor=PredictorConfig(layers=2, width=16, heads=2, conditioning="adaln"))
    model = NTM(cfg)
    randomize(model, 0.2)
    model.eval()
    assert all(layer.modulation is not None for layer in model.predictor.net.layers)
    u, t = torch.randn(2, 4, 4), torch.full((2,), 0.7)
    s = t / 2
    with torch.no_grad():
        mu0, _ = model.predictor(u, t, s, torch.tensor([0, 0]))
        mu1, _ = model.predictor(u, t, s, torch.tensor([1, 1]))
    assert not torch.allclose(mu0, mu1)  # the label reaches the output through the modulation alone
    write_artifact(tmp_path / "m", "ntm", to_dict(cfg), {"model": model.state_dict()}, meta={"step": 0})
    again = NTM.from_pretrained(tmp_path / "m").eval()
    assert again.config.predictor.conditioning == "adaln"
    with torch.no_grad():
        assert torch.allclose(again.predictor(u, t, s, torch.tensor([0, 0]))[0], mu0)
    fm = FlowMatching(FMConfig(data=spec, velocity=BackboneConfig(2, 16, 2, "adaln")))
    randomize(fm, 0.2)
    with torch.no_grad():
        v0, v1 = fm.velocity(u, t, torch.tensor([0, 0])), fm.velocity(u, t, torch.tensor([2, 2]))
    assert fm.velocity.adaln
    assert not torch.allclose(v0, v1)


def test_the_adaln_presets_carry_the_option_to_both_models():
    spec = _image_spec()
    p = get_preset("mnist-adaln")
    assert p.ntm(spec).predictor.conditioning == "adaln" and p.fm(spec).velocity.conditioning == "adaln"
    assert get_preset("mnist").ntm(spec).predictor.conditioning == "add"


def test_an_unknown_conditioning_is_refused():
    spec = _image_spec()
    cfg = get_preset("tiny").ntm(spec)
    with pytest.raises(ValueError, match="unknown predictor conditioning 'film'"):
        validate_model_config(replace(cfg, predictor=replace(cfg.predictor, conditioning="film")))
    with pytest.raises(ValueError, match="unknown velocity conditioning 'film'"):
        validate_model_config(FMConfig(data=spec, velocity=BackboneConfig(conditioning="film")))


def test_condition_std_sets_the_initial_scale_of_the_label_and_pooled_prompt():
    torch.manual_seed(0)
    for std in (0.02, 1.0):
        net = ConditionedTransformer(64, 1, 2, 4, 3, 3, num_classes=50, text_dim=96, text_tokens=2, condition_std=std)
        assert abs(float(net.label.weight.detach().std()) / std - 1) < 0.05
        pooled = F.normalize(torch.randn(400, 96), dim=-1)  # the encoders' pooled vectors have unit norm
        assert abs(float(net.text_pool(pooled).detach().std()) / std - 1) < 0.05
    spec = _image_spec()
    p = get_preset("mnist-cond1")
    assert p.ntm(spec).predictor.condition_std == 1.0 and p.fm(spec).velocity.condition_std == 1.0
    cfg = get_preset("tiny").ntm(spec)
    with pytest.raises(ValueError, match="condition_std must be > 0"):
        validate_model_config(replace(cfg, predictor=replace(cfg.predictor, condition_std=0.0)))
