"""Frozen configuration dataclasses (one per model kind, training, finetuning, the denoiser), the
named presets and the one place that picks the default preset. Every config is saved as JSON with
the checkpoint it describes, so a checkpoint loads with nothing else."""
from __future__ import annotations

import dataclasses
import json
import math
import types
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError


TEXT_ATTENTION = ("concat", "cross")  # how the networks read a prompt's token states
# how a network reads its condition vector (times, label or pooled prompt): added to every token, or
# adaLN-Zero (DiT): per-layer shift, scale and gate of the pre-norm blocks, zero-initialised
CONDITIONING = ("add", "adaln")
POSITION = ("learned", "sincos")  # position embeddings: learned from 0.02 noise, or fixed 2-D sin-cos


@dataclass(frozen=True)
class DataSpec:
    """How raw samples of shape ``shape`` become tokens (N, D), and how they are standardised.

    kind "vector": a sample (d,) becomes d tokens of 1 channel; ``mean`` and ``std`` are per raw
    feature, the model works on (x - mean) / std and reports likelihoods in raw units.
    kind "image": a sample (C, H, W) in [-1, 1] becomes (H / patch)(W / patch) tokens of C patch^2
    channels; no standardisation. ``token_mean`` and ``token_var`` (N * D values, token order) are
    the training set's per-dimension mean and variance in model units (images: measured; vectors:
    empty, i.e. 0 and 1 after standardisation), read by the predictor's "data" preconditioning.
    ``text_encoder`` (an encoder's identity), ``text_dim`` and ``text_tokens`` describe the prompts of
    a text-conditioned model (``ntm.text``); the encoder itself is never saved with the model.
    ``text_attention`` is how the networks read the prompt's token states: "concat" (appended to
    the token sequence, the paper's choice) or "cross" (a cross-attention block in every layer).
    """

    name: str = "data"
    kind: str = "vector"
    shape: tuple[int, ...] = (2,)
    mean: tuple[float, ...] = (0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0)
    num_classes: int = 0
    patch: int = 1
    token_mean: tuple[float, ...] = ()
    token_var: tuple[float, ...] = ()
    text_encoder: str = ""
    text_dim: int = 0
    text_tokens: int = 0
    text_attention: str = "concat"

    @property
    def is_text(self) -> bool:
        """Conditioned on prompts encoded by ``text_encoder`` (its identity) rather than on labels."""
        return self.text_dim > 0

    @property
    def num_tokens(self) -> int:
        if self.kind == "image":
            return (self.shape[1] // self.patch) * (self.shape[2] // self.patch)
        return self.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        """The tokens' layout (rows, columns): the patch grid of an image, one row of tokens otherwise."""
        if self.kind == "image":
            return self.shape[1] // self.patch, self.shape[2] // self.patch
        return 1, self.shape[0]

    @property
    def token_dim(self) -> int:
        if self.kind == "image":
            return self.shape[0] * self.patch**2
        return 1

    @property
    def dim(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class TrajectoryConfig:
    """The time grid. ``shift`` None means mu from the sequence length (App. C.4).

    ``T`` is the default number of steps. A non-empty ``train_Ts`` (e.g. (4, 8, 16)) trains one model
    over several trajectory lengths, drawing T per sample; both networks then receive T as an input.
    Training draws the last level t_0 per sample from U[``t_min_low``, ``t_min_high``] (the paper's
    U[0, 0.05]); sampling stops at ``sample_t_min``. Every bound is taken at t_0 = 0, so ``t_min_high
    = 0`` trains the last step on the bound's own grid.
    """

    T: int = 4
    train_Ts: tuple[int, ...] = ()
    shift: float | None = None
    t_min_low: float = 0.0
    t_min_high: float = 0.05
    sample_t_min: float = 0.02


@dataclass(frozen=True)
class TransporterConfig:
    """f_T: ``blocks`` causal autoregressive blocks of ``layers`` transformer layers each.

    ``log_scale_clip`` soft-clips each block's log sigma to (-c, c). ``enabled`` False makes f_T the
    identity (every reverse step a diagonal Gaussian). ``transform`` is the element-wise map of each
    token given the previous ones: "affine", or "spline" (the affine map followed by a monotone
    rational-quadratic spline of ``spline_bins`` bins on [-spline_bound, spline_bound], identity
    outside; Durkan et al. 2019). ``spline_blocks`` limits the splines to the first that many blocks
    (those nearest the data; None: every block), the rest stay affine: a cheaper training step.
    ``coupling_gate`` scales what each block reads of the previous tokens by 1 + tanh(a(t, T)), a
    zero-initialised function of the level (and T): at 0 the block is element-wise at that level, so
    its Jacobian is diagonal. A reverse step whose true kernel is isotropic in x (a fine step) pays
    a diagonal Gaussian's mismatch with J J^T on every step; the gate lets the blocks turn that
    coupling off where it costs more than it gives (docs/objectives.md, "Why finer grids loosen").
    ``coupling_t_max`` < 1 makes every block element-wise at levels t >= it (coupling only nearer
    the data).
    """

    enabled: bool = True
    blocks: int = 2
    layers: int = 2
    width: int = 64
    heads: int = 4
    log_scale_clip: float = 4.0
    transform: str = "affine"
    spline_bins: int = 8
    spline_bound: float = 4.0
    spline_blocks: int | None = None
    coupling_gate: bool = False
    coupling_t_max: float = 1.0


@dataclass(frozen=True)
class PredictorConfig:
    """f_P: a bidirectional transformer over the N tokens of one level u_t.

    ``log_var_clip`` soft-clips the learned log-variance correction delta to (-c, c).
    ``conditioning`` (``CONDITIONING``): "add" sums the condition (times, label or pooled prompt)
    into every token; "adaln" modulates every block with it instead (DiT's adaLN-Zero).
    ``condition_std``: the initial std of each coordinate of the label embedding and of the pooled
    prompt's projection (0.02: the condition starts about 50x weaker than the time embedding; 1.0:
    on its scale).
    ``position`` (``POSITION``): "learned" position embeddings start at std 0.02 (about 30x weaker
    than a token's projection); "sincos" are fixed 2-D sine-cosine embeddings over the patch grid
    (DiT's), on the tokens' scale from the first step.
    ``precondition`` "unit" reads the network around the exact reverse kernel of zero-mean,
    unit-variance data; "data" uses the data's per-dimension mean and variance
    (``DataSpec.token_mean``/``token_var``, EDM's sigma_data) instead.
    ``kind`` "gaussian" is the from-scratch predictor; "velocity" is a flow-matching velocity network
    read in u-space (``ntm.predictor.VelocityPredictor``). Its scale (``velocity_scale``): "floor" is
    sigma_P = max(C, s0_std_floor) exp(delta) (C -> 0 as s -> 0, where the Gaussian posterior becomes
    a point mass); "x0" is sigma_P^2 = C^2 + B^2 tau^2 with a learned x0_hat uncertainty
    tau = s0_std_floor exp(delta). ``ntm finetune`` uses "x0"; the field defaults to "floor" so that
    checkpoints written before "x0" existed load unchanged.
    """

    layers: int = 4
    width: int = 128
    heads: int = 4
    log_var_clip: float = 8.0
    kind: str = "gaussian"
    s0_std_floor: float = 0.01
    velocity_scale: str = "floor"
    precondition: str = "unit"
    conditioning: str = "add"
    condition_std: float = 0.02
    position: str = "learned"


@dataclass(frozen=True)
class BackboneConfig:
    """A bidirectional transformer: the flow-matching velocity field's size and how it reads its
    condition and positions (``conditioning``, ``condition_std``, ``position``, as in ``PredictorConfig``)."""

    layers: int = 4
    width: int = 128
    heads: int = 4
    conditioning: str = "add"
    condition_std: float = 0.02
    position: str = "learned"


@dataclass(frozen=True)
class NTMConfig:
    """A Normalizing Trajectory Model: data layout, time grid, transporter f_T and predictor f_P."""

    data: DataSpec = field(default_factory=DataSpec)
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    transporter: TransporterConfig = field(default_factory=TransporterConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)


@dataclass(frozen=True)
class FMConfig:
    """The flow-matching baseline: a velocity field of size ``velocity`` and the time ``shift`` of its
    training and sampling times (None: the NTM grid's length-dependent shift)."""

    data: DataSpec = field(default_factory=DataSpec)
    velocity: BackboneConfig = field(default_factory=BackboneConfig)
    shift: float | None = None


@dataclass(frozen=True)
class DenoiserConfig:
    """The distilled denoiser g_phi: a small bidirectional transformer (``ntm.denoising.Denoiser``)."""

    layers: int = 2
    width: int = 64
    heads: int = 4


# the initial weight (cosine-decayed to 0) of a finetune's mean-alignment loss
AUX_WEIGHT = 2.5


@dataclass(frozen=True)
class FinetuneConfig:
    """Starting from a flow-matching run (``ntm.train.finetune``): the run folder of the frozen
    ``teacher``; ``aux_weight`` the initial weight of the mean-alignment loss, cosine-decayed to 0;
    the teacher's copied weights train at ``lr * pretrained_lr_scale`` (0 freezes them)."""

    teacher: str = ""
    aux_weight: float = AUX_WEIGHT
    pretrained_lr_scale: float = 0.25


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and objective: AdamW, linear warmup over ``warmup`` steps from
    ``warmup_start_factor * lr`` (``warmup`` 0: none) then cosine decay to ``min_lr``; EMA of decay
    min(``ema_decay``, (1 + n) / (``ema_warmup`` + n)) after n updates; clipping. ``mode`` scores
    every step of a trajectory ("e2e") or one random step ("pairwise"); ``class_dropout`` replaces
    that share of labels by the null label; ``finetune`` is set when the run starts from a
    flow-matching teacher.

    The NTM objective (``ntm.train.objectives.NTMObjective``): ``objective`` "nll" is the paper's
    exact trajectory NLL; "nll-rb" subtracts a Rao-Blackwellised control variate (same expectation,
    less gradient noise). ``stratified`` spreads the pair-wise steps evenly over the batch.
    ``step_weights`` (one per step k = 1..T, empty: all 1) weight the step NLLs (any other choice
    than 1 is no longer the likelihood). ``hybrid_weight`` lambda adds the x0_hat regression
    lambda sum_{k >= 2} ||x0_hat - x_0||^2 / t_k^2 / dim on the noisy steps; ``hybrid_schedule``
    "constant" keeps lambda, "cosine" decays it to 0 over the second half of training.
    ``T_weights`` (one per trained length of a multi-T model, empty: uniform) are the relative
    frequencies of the lengths T drawn for the samples: e.g. (4, 8, 16) gives every step of every
    grid the same share of the batches. Each grid's objective is unchanged; only the mix is."""

    steps: int = 6000
    batch_size: int = 512
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup: int = 200
    warmup_start_factor: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: int = 10
    mode: str = "e2e"
    class_dropout: float = 0.1
    seed: int = 0
    fsdp: bool = False
    compile: bool = False
    checkpoint_every: int = 500
    log_every: int = 25
    finetune: FinetuneConfig | None = None
    objective: str = "nll"
    stratified: bool = False
    step_weights: tuple[float, ...] = ()
    hybrid_weight: float = 0.0
    hybrid_schedule: str = "constant"
    T_weights: tuple[float, ...] = ()


MODES = ("e2e", "pairwise")
OBJECTIVES = ("nll", "nll-rb")
HYBRID_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class Preset:
    trajectory: TrajectoryConfig
    transporter: TransporterConfig
    predictor: PredictorConfig
    train: TrainConfig
    description: str = ""

    def ntm(self, data: DataSpec) -> NTMConfig:
        """The NTM this preset trains on ``data``."""
        return NTMConfig(data=data, trajectory=self.trajectory, transporter=self.transporter, predictor=self.predictor)

    def fm(self, data: DataSpec) -> FMConfig:
        """The flow-matching baseline on the same backbone as this preset's predictor."""
        pr = self.predictor
        return FMConfig(data=data, velocity=BackboneConfig(pr.layers, pr.width, pr.heads, pr.conditioning, pr.condition_std,
                                                                pr.position), shift=self.trajectory.shift)


_TOY_TRANSPORTER = TransporterConfig(blocks=2, layers=2, width=32, heads=4)
_TOY_PREDICTOR = PredictorConfig(layers=4, width=64, heads=4)
_TOY_TRAIN = TrainConfig(steps=5000, batch_size=256)
# images: a shallow, narrow transporter (2 blocks of 1 layer) and a 4-layer predictor; the FM
# baseline's velocity network is the same predictor transformer
_IMAGE_TRANSPORTER = TransporterConfig(blocks=2, layers=1, width=32, heads=2)
# spline blocks (the bound at T = 4 fell from 3.48 to 1.84 bits/dim at equal samples; docs/objectives.md):
# the default from the lever ablation until coupling_t_max; now the transporter of mnist-coupled
_IMAGE_TRANSPORTER_SPLINE = replace(_IMAGE_TRANSPORTER, transform="spline")
# the default since the full-budget coupling runs: element-wise spline blocks at every level t >= 0.1,
# so the transporter couples pixels only near the data (IW bound at T = 16 2.22 -> 1.80 bits/dim;
# docs/objectives.md, "Why finer grids loosen the bound")
_IMAGE_TRANSPORTER_LOW = replace(_IMAGE_TRANSPORTER_SPLINE, coupling_t_max=0.1)
# the default's trajectory since the multi-T spline run: one checkpoint trained over T in {4, 8, 16}
# with the last level at t_0 = 0 (the bound's grid); it samples at T = 4 unless told otherwise
_IMAGE_TRAJECTORY = TrajectoryConfig(T=4, shift=None, train_Ts=(4, 8, 16), t_min_high=0.0, sample_t_min=0.0)
_IMAGE_PREDICTOR = PredictorConfig(layers=4, width=128, heads=4)
_IMAGE_PREDICTOR_DATA = replace(_IMAGE_PREDICTOR, precondition="data")
# the conditioning lever: adaLN-Zero blocks instead of a condition added to every token
_IMAGE_PREDICTOR_ADALN = replace(_IMAGE_PREDICTOR_DATA, conditioning="adaln")
_IMAGE_PREDICTOR_SINCOS = replace(_IMAGE_PREDICTOR_DATA, position="sincos")
# the condition's initial scale: label embedding / pooled-prompt projection at unit std per coordinate
_IMAGE_PREDICTOR_COND1 = replace(_IMAGE_PREDICTOR_DATA, condition_std=1.0)
_IMAGE_TRAIN_PAPER = TrainConfig(steps=8000, batch_size=64, lr=5e-4, warmup=200, mode="pairwise")
# lambda = 10: at 3,500 steps it beat lambda = 1 at 8,000 on class accuracy (95% against 70% at w = 1)
_IMAGE_TRAIN = replace(_IMAGE_TRAIN_PAPER, objective="nll-rb", stratified=True, hybrid_weight=10.0)
# four times the rate: the base of the hybrid-weight and bins levers at 2e-3
_IMAGE_TRAIN_LR4X = replace(_IMAGE_TRAIN, lr=2e-3)
# the default since the hybrid-weight runs at 2e-3: lambda 1 at four times the rate (IW bound at T = 16
# 1.84 -> 1.44 bits/dim, NTM@4's best FID 1.18; docs/objectives.md). _IMAGE_TRAIN (5e-4, lambda 10)
# stays the recipe of mnist-lr1x, the default before, and of the presets built on it
_IMAGE_TRAIN_DEFAULT = replace(_IMAGE_TRAIN_LR4X, hybrid_weight=1.0)
# the transporter levers of the image ablation: the paper's proportions (a transporter about a quarter
# of the predictor), and spline blocks
_IMAGE_TRANSPORTER_WIDE = TransporterConfig(blocks=2, layers=2, width=64, heads=4)

PRESETS: dict[str, Preset] = {
    "toy": Preset(TrajectoryConfig(T=4, shift=-1.0), replace(_TOY_TRANSPORTER, transform="spline"), _TOY_PREDICTOR,
                  _TOY_TRAIN, "default 2-D preset: T=4, time shift -1, 2 blocks x 2 layers spline transporter, "
                  "4-layer predictor"),
    "toy-affine": Preset(TrajectoryConfig(T=4, shift=-1.0), _TOY_TRANSPORTER, _TOY_PREDICTOR, _TOY_TRAIN,
                         "the toy preset with affine transporter blocks (the default before the spline lever; "
                         "the base of the other toy-* presets)"),
    "toy-t8": Preset(TrajectoryConfig(T=8, shift=-1.0), _TOY_TRANSPORTER, _TOY_PREDICTOR, _TOY_TRAIN,
                     "the toy-affine preset with an 8-step trajectory"),
    "toy-paper-shift": Preset(TrajectoryConfig(T=4, shift=None), _TOY_TRANSPORTER, _TOY_PREDICTOR, _TOY_TRAIN,
                              "the toy-affine preset with the paper's length-dependent time shift"),
    "toy-deep": Preset(TrajectoryConfig(T=4, shift=-1.0), TransporterConfig(blocks=4, layers=2, width=32, heads=4),
                       _TOY_PREDICTOR, _TOY_TRAIN, "the toy-affine preset with a 4-block transporter"),
    "toy-spline": Preset(TrajectoryConfig(T=4, shift=-1.0), replace(_TOY_TRANSPORTER, transform="spline"), _TOY_PREDICTOR,
                         _TOY_TRAIN, "the toy-affine preset with spline blocks (affine + 8-bin rational-quadratic "
                         "spline): the toy preset"),
    "toy-bins16": Preset(TrajectoryConfig(T=4, shift=-1.0),
                         replace(_TOY_TRANSPORTER, transform="spline", spline_bins=16), _TOY_PREDICTOR, _TOY_TRAIN,
                         "the toy preset with 16-bin splines (sharper multimodal steps)"),
    "toy-spline-deep": Preset(TrajectoryConfig(T=4, shift=-1.0), replace(_TOY_TRANSPORTER, blocks=4, transform="spline"),
                              _TOY_PREDICTOR, _TOY_TRAIN, "the toy preset with a 4-block spline transporter"),
    "toy-spline-wide": Preset(TrajectoryConfig(T=4, shift=-1.0), replace(_TOY_TRANSPORTER, width=64, transform="spline"),
                              _TOY_PREDICTOR, _TOY_TRAIN, "the toy preset with a width-64 spline transporter"),
    "toy-multi-t": Preset(TrajectoryConfig(T=4, shift=-1.0, train_Ts=(4, 8, 16)), _TOY_TRANSPORTER, _TOY_PREDICTOR,
                          _TOY_TRAIN, "the toy-affine preset trained over T in {4, 8, 16} (one checkpoint samples at each)"),
    "mnist": Preset(_IMAGE_TRAJECTORY, _IMAGE_TRANSPORTER_LOW, _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN_DEFAULT,
                    "28x28 images (MNIST, Fashion-MNIST), patch 4 (49 tokens), 8000 pair-wise steps at lr 2e-3: "
                    "the Rao-Blackwellised NLL, stratified steps, the hybrid x0_hat term (lambda 1), data "
                    "preconditioning, spline transporter blocks coupling pixels only at levels t < 0.1, "
                    "T in {4, 8, 16} with t_0 = 0 (samples at T = 4)"),
    "mnist-lr1x": Preset(_IMAGE_TRAJECTORY, _IMAGE_TRANSPORTER_LOW, _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN,
                         "the mnist preset at lr 5e-4 with the hybrid weight lambda 10: the default until the "
                         "hybrid-weight runs at 2e-3, and the base of the lr2x, lr4x and coupling presets"),
    "mnist-lr2x": Preset(_IMAGE_TRAJECTORY, _IMAGE_TRANSPORTER_LOW, _IMAGE_PREDICTOR_DATA, replace(_IMAGE_TRAIN, lr=1e-3),
                         "the mnist-lr1x preset at twice the learning rate (1e-3), the lever of the text bench "
                         "(docs/objectives.md)"),
    "mnist-lr4x": Preset(_IMAGE_TRAJECTORY, _IMAGE_TRANSPORTER_LOW, _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN_LR4X,
                         "the mnist-lr1x preset at four times the learning rate (2e-3), the demo's rate at the "
                         "full budget (docs/objectives.md)"),
    "mnist-lr4x-lam3": Preset(_IMAGE_TRAJECTORY, _IMAGE_TRANSPORTER_LOW, _IMAGE_PREDICTOR_DATA,
                              replace(_IMAGE_TRAIN_LR4X, hybrid_weight=3.0),
                              "the mnist-lr4x preset with the hybrid weight lambda 3 instead of 10 (the lambda "
                              "lever at the higher rate; docs/objectives.md)"),
    "mnist-lr4x-lam1": Preset(_IMAGE_TRAJECTORY, _IMAGE_TRANSPORTER_LOW, _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN_DEFAULT,
                              "the mnist-lr4x preset with the hybrid weight lambda 1 instead of 10: the mnist "
                              "preset under the name of the run that made it the default (identical)"),
    "mnist-lr4x-lam1-bins16": Preset(_IMAGE_TRAJECTORY, replace(_IMAGE_TRANSPORTER_LOW, spline_bins=16),
                                     _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN_DEFAULT,
                                     "the mnist preset with 16-bin splines at every level instead of 8 (aimed "
                                     "at the last step; measured: the bound does not move and the step costs "
                                     "20% more, docs/objectives.md)"),
    "mnist-coupled": Preset(_IMAGE_TRAJECTORY, _IMAGE_TRANSPORTER_SPLINE, _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN,
                            "the mnist-lr1x preset with transporter blocks that couple pixels at every level (the "
                            "default before coupling_t_max; the base of the adaln, cond1, t16, t-by-steps and "
                            "gate presets)"),
    "mnist-affine": Preset(TrajectoryConfig(T=4, shift=None), _IMAGE_TRANSPORTER, _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN,
                           "the mnist-lr1x preset with affine transporter blocks (the default before the spline lever; "
                           "the base of the lever ablation and of the OOD, finetune and text benches' runs)"),
    "mnist-adaln": Preset(_IMAGE_TRAJECTORY, _IMAGE_TRANSPORTER_SPLINE, _IMAGE_PREDICTOR_ADALN, _IMAGE_TRAIN,
                          "the mnist-coupled preset with adaLN-Zero conditioning in the predictor and the FM baseline "
                          "(the condition modulates every block instead of being added to every token)"),
    "mnist-affine-adaln": Preset(TrajectoryConfig(T=4, shift=None), _IMAGE_TRANSPORTER, _IMAGE_PREDICTOR_ADALN,
                                 _IMAGE_TRAIN, "the mnist-affine preset with adaLN-Zero conditioning"),
    "mnist-cond1": Preset(_IMAGE_TRAJECTORY, _IMAGE_TRANSPORTER_SPLINE, _IMAGE_PREDICTOR_COND1, _IMAGE_TRAIN,
                          "the mnist-coupled preset with the label embedding (or the pooled prompt's projection) "
                          "initialised at unit std per coordinate, the time embedding's scale, not 0.02"),
    "mnist-affine-cond1": Preset(TrajectoryConfig(T=4, shift=None), _IMAGE_TRANSPORTER, _IMAGE_PREDICTOR_COND1,
                                 _IMAGE_TRAIN, "the mnist-affine preset with the condition initialised at unit std"),
    "mnist-sincos": Preset(_IMAGE_TRAJECTORY, _IMAGE_TRANSPORTER_LOW, _IMAGE_PREDICTOR_SINCOS, _IMAGE_TRAIN,
                           "the mnist-lr1x preset with fixed 2-D sin-cos position embeddings in the predictor and the "
                           "FM baseline (DiT's) instead of learned ones"),
    "mnist-affine-sincos": Preset(TrajectoryConfig(T=4, shift=None), _IMAGE_TRANSPORTER, _IMAGE_PREDICTOR_SINCOS,
                                  _IMAGE_TRAIN, "the mnist-affine preset with fixed 2-D sin-cos position embeddings"),
    "mnist-affine-sincos-lr2x": Preset(TrajectoryConfig(T=4, shift=None), _IMAGE_TRANSPORTER, _IMAGE_PREDICTOR_SINCOS,
                                       replace(_IMAGE_TRAIN, lr=1e-3),
                                       "the mnist-affine-sincos preset at twice the learning rate (1e-3): the text "
                                       "bench's recipe (docs/text.md)"),
    "mnist-affine-sincos-lr4x-lam1": Preset(TrajectoryConfig(T=4, shift=None), _IMAGE_TRANSPORTER,
                                            _IMAGE_PREDICTOR_SINCOS, _IMAGE_TRAIN_DEFAULT,
                                            "the text bench's recipe with the default image preset's training "
                                            "(lr 2e-3, hybrid weight lambda 1): the rate lever of docs/text.md"),
    "mnist-affine-sincos-lr4x": Preset(TrajectoryConfig(T=4, shift=None), _IMAGE_TRANSPORTER, _IMAGE_PREDICTOR_SINCOS,
                                       _IMAGE_TRAIN_LR4X, "the text bench's recipe at four times the learning rate "
                                       "(2e-3), lambda 10 kept: the rate lever of docs/text.md"),
    "mnist-affine-sincos-lr8x": Preset(TrajectoryConfig(T=4, shift=None), _IMAGE_TRANSPORTER, _IMAGE_PREDICTOR_SINCOS,
                                       replace(_IMAGE_TRAIN, lr=4e-3), "the text bench's recipe at eight times "
                                       "the learning rate (4e-3), lambda 10 kept: the rate lever's next doubling"),
    "mnist-paper": Preset(TrajectoryConfig(T=4, shift=None), _IMAGE_TRANSPORTER, _IMAGE_PREDICTOR, _IMAGE_TRAIN_PAPER,
                          "the mnist-affine preset with the paper's plain trajectory NLL and unit preconditioning"),
    "mnist-demo": Preset(_IMAGE_TRAJECTORY, _IMAGE_TRANSPORTER_LOW, _IMAGE_PREDICTOR_DATA,
                         replace(_IMAGE_TRAIN_LR4X, steps=2500, warmup=100),
                         "`make demo`: the mnist-lr4x preset (lr 2e-3, lambda 10) for 2500 steps, under 10 "
                         "minutes on 2 CPU cores (docs/objectives.md)"),
    "mnist-quick": Preset(_IMAGE_TRAJECTORY, _IMAGE_TRANSPORTER_LOW, _IMAGE_PREDICTOR_DATA,
                          replace(_IMAGE_TRAIN_DEFAULT, steps=600, warmup=100, checkpoint_every=200),
                          "the mnist preset with 600 steps (smoke checks; `ntm bench mnist --quick`)"),
    "mnist-wide": Preset(TrajectoryConfig(T=4, shift=None), _IMAGE_TRANSPORTER_WIDE, _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN,
                         "the mnist-affine preset with a 2 blocks x 2 layers, width-64 transporter (about a quarter "
                         "of the predictor)"),
    "mnist-spline": Preset(TrajectoryConfig(T=4, shift=None), _IMAGE_TRANSPORTER_SPLINE, _IMAGE_PREDICTOR_DATA,
                           _IMAGE_TRAIN, "the mnist-affine preset with spline transporter blocks"),
    "mnist-spline-one": Preset(TrajectoryConfig(T=4, shift=None), replace(_IMAGE_TRANSPORTER_SPLINE, spline_blocks=1),
                               _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN,
                               "the mnist-spline preset with a spline in the first block only (a cheaper step)"),
    "mnist-spline-4bins": Preset(TrajectoryConfig(T=4, shift=None), replace(_IMAGE_TRANSPORTER_SPLINE, spline_bins=4),
                                 _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN,
                                 "the mnist-spline preset with 4-bin splines (a cheaper step)"),
    "mnist-t0": Preset(TrajectoryConfig(T=4, shift=None, t_min_high=0.0, sample_t_min=0.0), _IMAGE_TRANSPORTER,
                       _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN,
                       "the mnist-affine preset with the last level at t_0 = 0 in training and sampling (the bound's grid)"),
    "mnist-multi-t": Preset(TrajectoryConfig(T=4, shift=None, train_Ts=(4, 8, 16), t_min_high=0.0, sample_t_min=0.0),
                            _IMAGE_TRANSPORTER, _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN,
                            "the mnist-t0 preset trained over T in {4, 8, 16} (bounds and samples at each from one checkpoint)"),
    "mnist-spline-multi-t": Preset(_IMAGE_TRAJECTORY, _IMAGE_TRANSPORTER_SPLINE, _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN,
                                   "the mnist-multi-t preset with spline transporter blocks (the mnist-coupled preset)"),
    "mnist-t-by-steps": Preset(_IMAGE_TRAJECTORY, _IMAGE_TRANSPORTER_SPLINE, _IMAGE_PREDICTOR_DATA,
                               replace(_IMAGE_TRAIN, T_weights=(4.0, 8.0, 16.0)),
                               "the mnist-coupled preset with T drawn in proportion to its steps (4 : 8 : 16): every step "
                               "of every grid gets the same share of the batches"),
    "mnist-t16": Preset(TrajectoryConfig(T=16, shift=None, t_min_high=0.0, sample_t_min=0.0), _IMAGE_TRANSPORTER_SPLINE,
                        _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN,
                        "the mnist-coupled preset trained at T = 16 only (a transporter for the fine grid alone)"),
    "mnist-coupling-low": Preset(_IMAGE_TRAJECTORY, _IMAGE_TRANSPORTER_LOW, _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN,
                                 "mnist-lr1x under the name of the run that made coupling_t_max the default (identical; "
                                 "element-wise blocks at every level t >= 0.1)"),
    "mnist-coupling-mid": Preset(_IMAGE_TRAJECTORY, replace(_IMAGE_TRANSPORTER_SPLINE, coupling_t_max=0.3),
                                 _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN,
                                 "the mnist-lr1x preset coupling pixels at levels t < 0.3 instead of 0.1: T = 16's levels "
                                 "0.185 and 0.269 are coupled too (T = 4's levels are unchanged)"),
    "mnist-coupling-data": Preset(_IMAGE_TRAJECTORY, replace(_IMAGE_TRANSPORTER_SPLINE, coupling_t_max=0.05),
                                  _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN,
                                  "the mnist-lr1x preset coupling pixels only at the data's level t = 0 (coupling_t_max "
                                  "0.05): T = 16's first noisy level (0.096) becomes element-wise too"),
    "mnist-wide-low": Preset(_IMAGE_TRAJECTORY, replace(_IMAGE_TRANSPORTER_LOW, layers=2, width=64, heads=4),
                             _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN,
                             "the mnist-lr1x preset with a 2 blocks x 2 layers, width-64 transporter (a lever for "
                             "the T = 16 bound near the data; measured in docs/objectives.md, not the default)"),
    "mnist-low-t-by-steps": Preset(_IMAGE_TRAJECTORY, _IMAGE_TRANSPORTER_LOW, _IMAGE_PREDICTOR_DATA,
                                   replace(_IMAGE_TRAIN, T_weights=(4.0, 8.0, 16.0)),
                                   "the mnist-lr1x preset with T drawn in proportion to its steps (4 : 8 : 16), "
                                   "mnist-t-by-steps without the coupling at noisy levels"),
    "mnist-gate": Preset(_IMAGE_TRAJECTORY, replace(_IMAGE_TRANSPORTER_SPLINE, coupling_gate=True),
                         _IMAGE_PREDICTOR_DATA, _IMAGE_TRAIN,
                         "the mnist-coupled preset with the transporter's coupling gated by the level and T (element-wise "
                         "where the gate closes)"),
    "tiny": Preset(
        TrajectoryConfig(T=4, shift=-1.0),
        TransporterConfig(blocks=2, layers=1, width=16, heads=2),
        PredictorConfig(layers=1, width=32, heads=2),
        TrainConfig(steps=40, batch_size=64, warmup=5, checkpoint_every=20, log_every=5),
        "a few-second smoke-test preset",
    ),
}

# the distillation of the denoiser: no warmup, cosine to lr / 100, no weight decay, no averaging
DISTILL_TRAIN = TrainConfig(steps=2000, batch_size=64, lr=5e-4, min_lr=5e-6, warmup=0, weight_decay=0.0, betas=(0.9, 0.999),
                            ema_decay=0.0, class_dropout=0.0, checkpoint_every=250)
# the fresh parts of a finetune (transporter, scale head) train at this multiple of the pretrained weights' rate
FRESH_LR_FACTOR = 4.0


def default_preset(data: DataSpec | str) -> str:
    """The preset used when none is named: ``mnist`` for images, ``toy`` for everything else."""
    kind = data.kind if isinstance(data, DataSpec) else data
    return "mnist" if kind == "image" else "toy"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    return PRESETS[name]


# ------------------------------------------------------------------------------ JSON round trip
def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def dumps(obj: Any) -> str:
    return json.dumps(to_dict(obj), indent=2, sort_keys=True)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field's hint names (also inside ``X | None``), else None."""
    if is_dataclass(hint):
        return hint
    if get_origin(hint) in (Union, types.UnionType):
        return next((h for h in get_args(hint) if is_dataclass(h)), None)
    return None


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Validate one JSON value against a dataclass field's type hint; returns the converted value."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(h for h in options if h is not type(None))
        origin = get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"field '{name}' must be a list, got {type(value).__name__}")
        args = get_args(hint)
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if item is None and len(args) != len(value):
            raise ValueError(f"field '{name}' must have {len(args)} entries, got {len(value)}")
        return tuple(_check_type(name, v, item if item is not None else a)
                     for v, a in zip(value, [item] * len(value) if item is not None else args))
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ValueError(f"field '{name}' has an invalid value {value!r}")
    return value


def from_dict(cls: type, data: Any) -> Any:
    """Rebuild a (nested) config dataclass from its JSON dict, refusing unknown fields and bad types."""
    if not isinstance(data, dict):
        raise ValueError(f"expected an object for {cls.__name__}, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_in(hints[name])
        kwargs[name] = from_dict(sub, value) if sub is not None and value is not None else _check_type(name, value, hints[name])
    cfg = cls(**kwargs)
    if isinstance(cfg, (NTMConfig, FMConfig)):
        validate_model_config(cfg)
    return cfg


def validate_model_config(cfg: NTMConfig | FMConfig) -> None:
    """Raise ValueError for sizes no network can be built from."""
    d = cfg.data
    if d.kind not in ("vector", "image") or not d.shape or min(d.shape) < 1 or d.patch < 1:
        raise ValueError(f"invalid data layout {d.kind} {d.shape} (patch {d.patch})")
    if d.kind == "vector" and (len(d.mean) != d.shape[0] or len(d.std) != d.shape[0] or min(d.std) <= 0):
        raise ValueError("data mean/std do not match the data shape")
    if d.kind == "image" and (len(d.shape) != 3 or d.shape[1] % d.patch or d.shape[2] % d.patch):
        raise ValueError(f"image shape {d.shape} does not fit patch {d.patch}")
    if d.text_attention not in TEXT_ATTENTION:
        raise ValueError(f"unknown text attention '{d.text_attention}' (use {' or '.join(TEXT_ATTENTION)})")
    if d.num_classes < 0:
        raise ValueError("invalid class count")
    nets = (("velocity", cfg.velocity),) if isinstance(cfg, FMConfig) else \
        (("transporter", cfg.transporter), ("predictor", cfg.predictor))
    for name, net in nets:
        if net.width < 1 or net.heads < 1 or net.width % net.heads or net.layers < 0:
            raise ValueError(f"invalid {name} size: width {net.width}, heads {net.heads}, layers {net.layers}")
        if getattr(net, "conditioning", "add") not in CONDITIONING:
            raise ValueError(f"unknown {name} conditioning '{net.conditioning}' (use {' or '.join(CONDITIONING)})")
        if getattr(net, "position", "learned") not in POSITION:
            raise ValueError(f"unknown {name} position embedding '{net.position}' (use {' or '.join(POSITION)})")
        if getattr(net, "position", "learned") == "sincos" and net.width % 4:
            raise ValueError(f"{name} sin-cos positions need a width divisible by 4, got {net.width}")
        if not getattr(net, "condition_std", 1.0) > 0:
            raise ValueError(f"{name} condition_std must be > 0, got {net.condition_std}")
    if isinstance(cfg, FMConfig):
        return
    pr, tr, tj = cfg.predictor, cfg.transporter, cfg.trajectory
    if pr.precondition not in ("unit", "data"):
        raise ValueError(f"unknown preconditioning '{pr.precondition}' (use 'unit' or 'data')")
    n = d.num_tokens * d.token_dim
    if (d.token_mean or d.token_var) and (len(d.token_mean) != n or len(d.token_var) != n or min(d.token_var) <= 0):
        raise ValueError(f"token_mean / token_var need {n} values each (variances > 0)")
    if pr.kind not in ("gaussian", "velocity") or pr.s0_std_floor <= 0 or pr.velocity_scale not in ("floor", "x0"):
        raise ValueError(f"invalid predictor kind '{pr.kind}', floor {pr.s0_std_floor} or velocity scale "
                         f"'{pr.velocity_scale}'")
    if tr.transform not in ("affine", "spline") or not 2 <= tr.spline_bins <= 100 or tr.spline_bound <= 0:
        raise ValueError(f"invalid transform '{tr.transform}' ({tr.spline_bins} bins, bound {tr.spline_bound})")
    if tr.spline_blocks is not None and not 0 <= tr.spline_blocks <= tr.blocks:
        raise ValueError(f"spline_blocks must be between 0 and the {tr.blocks} blocks, got {tr.spline_blocks}")
    if not 0 < tr.coupling_t_max <= 1:
        raise ValueError(f"coupling_t_max must be in (0, 1], got {tr.coupling_t_max}")
    if tr.blocks < 0 or tj.T < 1 or any(t < 1 for t in tj.train_Ts):
        raise ValueError("invalid block count or trajectory length")
    if tj.train_Ts and tj.T not in tj.train_Ts:
        raise ValueError(f"the default T = {tj.T} is not one of the trained lengths {list(tj.train_Ts)}")
    if not 0 <= tj.t_min_low <= tj.t_min_high < 1 or not 0 <= tj.sample_t_min < 1:
        raise ValueError(f"the last level needs 0 <= t_min_low <= t_min_high < 1 and 0 <= sample_t_min < 1, got "
                         f"{tj.t_min_low}, {tj.t_min_high}, {tj.sample_t_min}")


def validate_train_config(cfg: TrainConfig) -> None:
    """Raise ConfigError for optimisation settings no run can use."""
    if cfg.mode not in MODES:
        raise ConfigError(f"unknown training mode '{cfg.mode}' (use 'e2e' or 'pairwise')")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.warmup < 0 or not 0.0 <= cfg.class_dropout < 1.0 \
            or cfg.checkpoint_every < 1 or cfg.log_every < 1:
        raise ConfigError("steps, batch size, checkpoint and log intervals must be >= 1, warmup >= 0 and class "
                          "dropout in [0, 1)")
    if not (0.0 < cfg.lr < math.inf and 0.0 <= cfg.min_lr <= cfg.lr):
        raise ConfigError(f"the learning rate must be a finite number > 0 and >= min_lr ({cfg.min_lr:g}), got {cfg.lr:g}")
    if not 0.0 < cfg.warmup_start_factor <= 1.0 or cfg.ema_warmup < 1:
        raise ConfigError("the warmup start factor must be in (0, 1] and the EMA warmup >= 1")
    if cfg.stratified and cfg.mode != "pairwise":
        raise ConfigError("stratified steps apply to pair-wise training (mode 'pairwise')")
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{cfg.objective}' (use {' or '.join(OBJECTIVES)})")
    if cfg.hybrid_schedule not in HYBRID_SCHEDULES:
        raise ConfigError(f"unknown hybrid schedule '{cfg.hybrid_schedule}' (use {' or '.join(HYBRID_SCHEDULES)})")
    if not (0.0 <= cfg.hybrid_weight < math.inf) or any(not (0.0 <= w < math.inf) for w in cfg.step_weights):
        raise ConfigError("the hybrid weight and the step weights must be finite numbers >= 0")
    if any(not (0.0 < w < math.inf) for w in cfg.T_weights):
        raise ConfigError("the T weights must be finite numbers > 0")
    ft = cfg.finetune
    if ft is not None:
        if not ft.teacher:
            raise ConfigError("a finetune needs a teacher run")
        if not (0.0 <= ft.pretrained_lr_scale < math.inf):
            raise ConfigError(f"pretrained_lr_scale must be a finite number >= 0, got {ft.pretrained_lr_scale}")
        if not (0.0 <= ft.aux_weight < math.inf):
            raise ConfigError(f"the mean-alignment weight must be a finite number >= 0, got {ft.aux_weight}")


MODEL_CONFIGS: dict[str, type] = {"ntm": NTMConfig, "ntm-fm": FMConfig, "ntm-denoiser": DenoiserConfig}


def upgrade_v1(meta: dict) -> dict:
    """Rewrite the meta of a version-1 checkpoint (one ModelConfig for both kinds, finetune options
    and label dropout on the model or flat in the train config) as version 2."""
    model = dict(meta.get("model") or {})
    kind = model.pop("kind", "ntm")
    dropout = model.pop("class_dropout", 0.1)
    if kind == "fm":
        pr = model.get("predictor", {})
        model = {"data": model.get("data", {}), "shift": model.get("trajectory", {}).get("shift"),
                 "velocity": {k: pr[k] for k in ("layers", "width", "heads") if k in pr}}
    train = meta.get("train")
    if isinstance(train, dict):
        train = dict(train)
        teacher = train.pop("teacher", None)
        aux = train.pop("aux_weight", 0.0)
        scale = train.pop("pretrained_lr_scale", 1.0)
        train["class_dropout"] = dropout
        train["finetune"] = {"teacher": teacher, "aux_weight": aux, "pretrained_lr_scale": scale} if teacher else None
    return {**{k: v for k, v in meta.items() if k != "model"}, "format": "ntm-fm" if kind == "fm" else "ntm",
            "version": 2, "config": model, "train": train}


__all__ = ["DataSpec", "TrajectoryConfig", "TransporterConfig", "PredictorConfig", "BackboneConfig", "NTMConfig",
           "FMConfig", "DenoiserConfig", "FinetuneConfig", "TrainConfig", "Preset", "PRESETS", "DISTILL_TRAIN",
           "FRESH_LR_FACTOR", "AUX_WEIGHT", "default_preset", "get_preset", "to_dict", "dumps", "from_dict",
           "validate_model_config", "validate_train_config", "MODEL_CONFIGS", "upgrade_v1"]
