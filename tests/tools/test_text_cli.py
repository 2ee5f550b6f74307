"""Text-to-image on the command line with the real MiniLM encoder: train on captioned images, sample
from prompts, and the errors for missing encoders, prompts on label models and uncaptioned images."""

import json

import numpy as np
import pytest
from PIL import Image

import ntm.tools.text_encoders as text_encoders
from ntm.cli import main
from ntm.hub import load_model
from ntm.tools.text_encoders import load_encoder

from conftest import one_error_line, run_cli

run = run_cli


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("textcli")
    assert main(["train", "--data", "captioned-mnist", "--preset", "tiny", "--steps", "6", "--out", str(root / "run"),
                 "--no-progress"]) == 0
    return root / "run"


def test_minilm_encodes_token_states_mask_and_a_unit_pooled_vector():
    enc = load_encoder("minilm")
    p = enc.encode(["a red 3 on the left of a blue 7", ""])
    assert p.tokens.shape == (2, 16, 384) and p.pooled.shape == (2, 384)
    assert p.mask[0].sum() > p.mask[1].sum() == 2  # "" is [CLS] [SEP]
    assert np.allclose(p.pooled.norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert float(p.tokens[1, 2:].abs().max()) == 0.0  # padding is zero
    same = enc.encode(["a red 3 on the left of a blue 7"])
    assert np.allclose(same.pooled.numpy(), p.pooled[:1].numpy(), atol=1e-5)


def test_train_and_sample_from_prompts(text_run, tmp_path, capsys):
    model = load_model(text_run)
    assert model.spec.text_encoder == "minilm-l6-v2/384/16" and model.spec.is_text
    # the checkpoint holds our networks only: nothing of MiniLM's 22.7M weights
    assert sum(v.numel() for v in model.state_dict().values()) < 1e6
    code, out, err = run(capsys, "sample", str(text_run), "--prompt", "a handwritten 3", "--n", "5", "--guidance", "1.5",
                         "--out", str(tmp_path / "s.npy"), "--png", str(tmp_path / "s.png"))
    assert code == 0, err
    assert np.load(tmp_path / "s.npy").shape == (5, 1, 28, 28) and (tmp_path / "s.png").stat().st_size > 1000
    (tmp_path / "p.txt").write_text("a 3\n\nthe digit 7\n")
    code, _, err = run(capsys, "sample", str(text_run), "--prompts", str(tmp_path / "p.txt"), "--n", "3",
                       "--out", str(tmp_path / "s2.npy"))
    assert code == 0, err
    assert np.load(tmp_path / "s2.npy").shape == (6, 1, 28, 28)
    code, _, err = run(capsys, "sample", str(text_run), "--class", "3", "--n", "2", "--out", str(tmp_path / "s3.npy"))
    assert one_error_line(code, err, "prompts, not class labels")
    # likelihoods given the captions (test phrasings included) and without them
    code, out, err = run(capsys, "score", str(text_run), "--data", "captioned-mnist", "--n", "6", "--labels",
                         "--trajectories", "2", "--out", str(tmp_path / "sc.npy"))
    assert code == 0, err
    given = np.load(tmp_path / "sc.npy")
    code, _, err = run(capsys, "score", str(text_run), "--data", "captioned-mnist", "--n", "6", "--trajectories", "2",
                       "--out", str(tmp_path / "su.npy"))
    assert code == 0, err
    assert given.shape == (6,) and not np.allclose(given["iw_nats"], np.load(tmp_path / "su.npy")["iw_nats"])


def test_a_missing_encoder_is_one_clear_error(text_run, tmp_path, capsys, monkeypatch):
    def missing(name):
        raise ImportError(name)

    monkeypatch.setattr(text_encoders.importlib, "import_module", missing)
    code, _, err = run(capsys, "sample", str(text_run), "--prompt", "a 3", "--n", "2", "--out", str(tmp_path / "x.npy"))
    assert one_error_line(code, err, "text encoder 'minilm' is not installed")
    assert not (tmp_path / "x.npy").exists()
    monkeypatch.undo()
    cfg_file = next((text_run / "checkpoints").glob("step-*")) / "config.json"
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in cfg_file.parent.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    meta = json.loads((bad / "config.json").read_text())
    meta["config"]["data"]["text_encoder"] = "t5-xl/1024/16"
    (bad / "config.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, "sample", str(bad), "--prompt", "a 3", "--n", "2", "--out", str(tmp_path / "y.npy"))
    assert one_error_line(code, err, "unknown text encoder 't5-xl/1024/16'")


def test_prompts_on_a_label_model_and_uncaptioned_folders_are_errors(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "caps.csv").write_text("file,caption\n0.png,a dark square\n1.png,a bright square\n")
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "imgs"), "--captions", str(tmp_path / "caps.csv"),
                       "--preset", "tiny", "--patch", "2", "--out", str(tmp_path / "r"))
    assert one_error_line(code, err, "2 image(s) have no caption")
    (tmp_path / "caps.csv").write_text("file,caption\n" + "".join(f"{i}.png,square number {i}\n" for i in range(4)))
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "imgs"), "--captions", str(tmp_path / "caps.csv"),
                       "--preset", "tiny", "--patch", "2", "--steps", "3", "--out", str(tmp_path / "r"), "--no-progress")
    assert code == 0, err
    code, _, err = run(capsys, "train", "--data", "checkerboard", "--preset", "tiny", "--steps", "3",
                       "--out", str(tmp_path / "toy"), "--no-progress")
    assert code == 0, err
    code, _, err = run(capsys, "sample", str(tmp_path / "toy"), "--prompt", "a 3", "--n", "2",
                       "--out", str(tmp_path / "z.npy"))
    assert one_error_line(code, err, "need a text-conditioned model")
