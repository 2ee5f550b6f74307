"""Text-conditioned NTM and FM: training on captioned images with a stub encoder, the null prompt,
product-rule guidance on prompts, sampling from prompt strings, and checkpoints that name their encoder."""

from dataclasses import replace

import pytest
import torch

from ntm.captions import CLASS_TEMPLATES, open_text_source, read_captions
from ntm.config import get_preset
from ntm.errors import ConfigError, DataError
from ntm.guidance import product_rule
from ntm.hub import build_model, load_model
from ntm.text import CachedEncoder
from ntm.train import train

from conftest import StubEncoder


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    src = open_text_source("captioned-mnist", CachedEncoder(StubEncoder(dim=8, max_tokens=6)))
    p = get_preset("tiny")
    cfg = replace(p.train, steps=6, checkpoint_every=6)
    spec = src.spec()
    train(p.ntm(spec), cfg, src, root / "ntm", progress=False)
    train(p.fm(spec), cfg, src, root / "fm", progress=False)
    return src, root


def test_text_source_captions_use_training_phrasings_and_hold_one_out(text_runs):
    src, _ = text_runs
    caps = src.captions(torch.arange(300), seed=0, train=True)
    held = CLASS_TEMPLATES["mnist"][-1].split("{c}")[0]
    assert not any(c.startswith(held) for c in caps)
    test_caps = src.caption_fn(torch.arange(300), torch.Generator().manual_seed(0), False)
    assert any(c.startswith(held) for c in test_caps)
    x, prompts = src.sample(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, 28, 28) and prompts.tokens.shape == (5, 6, 8)
    spec = src.spec()
    assert spec.is_text and spec.text_encoder == "stub/8/6" and spec.num_classes == 0


def test_empty_prompt_is_the_null_condition_and_guidance_is_the_gaussian_product(text_runs):
    src, root = text_runs
    model = load_model(root / "ntm").eval()
    model.attach_text_encoder(StubEncoder(dim=8, max_tokens=6))
    u = torch.randn(3, model.spec.num_tokens, model.spec.token_dim)
    t, s = torch.full((3,), 0.8), torch.full((3,), 0.5)
    with torch.no_grad():
        empty = model.predict(u, t, s, model.encode_prompts(["", "", ""]))
        null = model.predict(u, t, s, None)
        assert torch.allclose(empty[0], null[0], atol=1e-6) and torch.allclose(empty[1], null[1], atol=1e-6)
        y = model.encode_prompts(["a 3", "the digit 7", "a 1"])
        cond = model.predict(u, t, s, y)
        guided = model.predict(u, t, s, y, guidance=2.0)
        assert not torch.allclose(cond[0], null[0])
    mu, sigma = product_rule(cond[0], cond[1], null[0], null[1], 2.0)
    assert torch.allclose(guided[0], mu, atol=1e-5) and torch.allclose(guided[1], sigma, atol=1e-5)


def test_sampling_from_prompt_strings_for_ntm_and_fm(text_runs):
    src, root = text_runs
    for kind in ("ntm", "fm"):
        model = load_model(root / kind).eval()
        with pytest.raises(ConfigError, match="needs the text encoder 'stub/8/6'"):
            model.sample(2, prompt="a 3")
        with pytest.raises(ConfigError, match="needs the text encoder"):
            model.attach_text_encoder(StubEncoder(dim=8, max_tokens=7))
        model.attach_text_encoder(StubEncoder(dim=8, max_tokens=6))
        g = torch.Generator().manual_seed(0)
        a = model.sample(4, prompt="a 3", guidance=1.5, generator=g)
        b = model.sample(4, prompt=["a 3"] * 4, guidance=1.5, generator=torch.Generator().manual_seed(0))
        assert a.shape == (4, 1, 28, 28) and torch.equal(a, b)
        with pytest.raises(ValueError, match="prompts, not class labels"):
            model.sample(2, y=torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="3 prompts for 2 samples"):
            model.sample(2, prompt=["a", "b", "c"])


def test_text_checkpoint_keeps_the_null_prompt_not_the_encoder(text_runs):
    src, root = text_runs
    model = load_model(root / "ntm")
    keys = model.state_dict().keys()
    assert any(k.endswith("null_pooled") for k in keys)
    assert not any("encoder" in k for k in keys)
    null = src.null_prompt()
    net = model.predictor
    assert torch.equal(net.null_pooled, null.pooled[0]) and torch.equal(net.null_mask, null.mask[0])


def test_captions_files_are_read_and_bad_ones_are_one_clear_error(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"file": "a.png", "caption": "a red 3"}\n\n{"file": "b.png", "caption": "x, y"}\n')
    assert read_captions(tmp_path / "c.jsonl") == {"a.png": "a red 3", "b.png": "x, y"}
    (tmp_path / "c.csv").write_text("file,caption\na.png,a red 3, with a comma\n")
    assert read_captions(tmp_path / "c.csv") == {"a.png": "a red 3, with a comma"}
    (tmp_path / "bad.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_captions(tmp_path / "bad.jsonl")
    (tmp_path / "empty.csv").write_text("file,caption\n")
    with pytest.raises(DataError, match="no captions"):
        read_captions(tmp_path / "empty.csv")


def test_cross_attention_text_model_masks_padding_saves_and_reloads(tmp_path):
    src = open_text_source("captioned-mnist", CachedEncoder(StubEncoder(dim=8, max_tokens=6)))
    p = get_preset("tiny")
    spec = replace(src.spec(), text_attention="cross")
    train(p.ntm(spec), replace(p.train, steps=2, checkpoint_every=2), src, tmp_path / "ntm", progress=False)
    model = load_model(tmp_path / "ntm").eval()
    assert model.spec.text_attention == "cross" and model.predictor.cross_text
    assert any(name.startswith("net.layers.0.cross.") for name, _ in model.predictor.named_parameters())
    model.attach_text_encoder(StubEncoder(dim=8, max_tokens=6))
    u = torch.randn(2, model.spec.num_tokens, model.spec.token_dim)
    t, s = torch.full((2,), 0.8), torch.full((2,), 0.5)
    y = model.encode_prompts(["a 3", "the digit 7 and more"])
    assert not bool(y.mask.all())  # the short prompt has padding
    noisy = type(y)(torch.where(y.mask[..., None], y.tokens, torch.randn_like(y.tokens)), y.mask, y.pooled)
    with torch.no_grad():
        a, b = model.predict(u, t, s, y), model.predict(u, t, s, noisy)
        empty, null = model.predict(u, t, s, model.encode_prompts(["", ""])), model.predict(u, t, s, None)
    # what sits in the masked positions never reaches the output; the empty prompt is the null one
    assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[1], b[1], atol=1e-6)
    assert torch.allclose(empty[0], null[0], atol=1e-6)


def test_an_unknown_text_attention_is_refused():
    src = open_text_source("captioned-mnist", CachedEncoder(StubEncoder(dim=8, max_tokens=6)))
    with pytest.raises(ValueError, match="unknown text attention 'sideways'"):
        build_model(get_preset("tiny").ntm(replace(src.spec(), text_attention="sideways")))
