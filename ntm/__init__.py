"""ntm: Normalizing Trajectory Models in PyTorch (Gu et al., arXiv 2605.08078).

``NTM.from_pretrained(run)`` loads a trained run; ``model.sample(n)`` draws n samples in 4 predictor
steps and one transporter inverse; ``model.nll_bound(x)`` is an upper bound on -log p(x_0) in nats per
sample. ``FlowMatching`` is the flow-matching baseline (``fm.sample(n, steps=50)``), and
``load_model`` loads either kind.

This package is the core (networks, density, likelihood, sampling, data); training is in
``ntm.train`` and the command line, benchmarks and plots in ``ntm.cli``, ``ntm.bench``, ``ntm.tools``.
"""
from .config import (PRESETS, DataSpec, DenoiserConfig, FinetuneConfig, FMConfig, NTMConfig, PredictorConfig,
                     TrainConfig, TrajectoryConfig, TransporterConfig)
from .flow_matching import FlowMatching
from .hub import build_model, load_model
from .model import NTM

__all__ = ["NTM", "FlowMatching", "load_model", "build_model", "NTMConfig", "FMConfig", "TrainConfig",
           "FinetuneConfig", "DenoiserConfig", "TrajectoryConfig", "TransporterConfig", "PredictorConfig",
           "DataSpec", "PRESETS"]
__version__ = "0.2.0"
