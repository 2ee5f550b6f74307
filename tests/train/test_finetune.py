"""Finetuning from a flow-matching model: the optimiser groups of the pretrained and fresh weights."""


import pytest
import torch
from conftest import fm_and_ntm

from ntm import NTM
from ntm.config import FinetuneConfig
from ntm.train.finetune import finetune_config
from ntm.train.runs import initial_weights


def test_pretrained_weights_get_their_own_learning_rate():
    from dataclasses import replace

    from ntm.config import TrainConfig
    from ntm.train import make_optimizer

    _, ntm = fm_and_ntm()
    cfg = TrainConfig(lr=2e-3, steps=100, warmup=10)
    opt, _ = make_optimizer(ntm, cfg)  # not finetuning: one learning rate
    assert len(opt.param_groups) == 2
    opt, sched = make_optimizer(ntm, replace(cfg, finetune=FinetuneConfig("fm-run", pretrained_lr_scale=0.25)))
    velocity = {id(p) for p in ntm.predictor.velocity.parameters()}
    seen = set()
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= velocity or not ids & velocity
        assert group["initial_lr"] == pytest.approx(5e-4 if ids <= velocity else 2e-3)
        seen |= ids
    assert seen == {id(p) for p in ntm.parameters()}
    for _ in range(10):
        opt.step()
        sched.step()
    lrs = {g["initial_lr"]: g["lr"] for g in opt.param_groups}
    assert lrs[2e-3] == pytest.approx(4 * lrs[5e-4], rel=0.05)  # the warmup/cosine schedule scales both
    opt, _ = make_optimizer(ntm, replace(cfg, finetune=FinetuneConfig("fm-run", pretrained_lr_scale=0.0)))  # frozen backbone
    kept = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not kept & velocity and kept == {id(p) for p in ntm.parameters()} - velocity


def test_finetune_start_is_the_fm_velocity_in_an_identity_transporter():
    """finetune_config + initial_weights build exactly the model that conftest builds by hand."""

    fm, by_hand = fm_and_ntm(4)
    ntm = NTM(finetune_config(fm.config, "tiny", "floor"))
    assert ntm.config.predictor == by_hand.config.predictor and ntm.config.transporter == by_hand.config.transporter
    ntm.load_state_dict(initial_weights(ntm, fm))
    for (k, a), (_, b) in zip(ntm.predictor.state_dict().items(), by_hand.predictor.state_dict().items()):
        assert k.startswith("time_s.") or torch.equal(a, b), k  # the "floor" s embedding starts random
    x, t = torch.randn(6, 3, 1), torch.full((6,), 0.6)
    assert torch.equal(ntm.transporter(x, t)[0], x)
