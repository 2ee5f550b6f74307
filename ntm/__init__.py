"""ntm: Normalizing Trajectory Models in PyTorch (Gu et al., arXiv 2605.08078).

    from ntm import NTM, FlowMatching
    model = NTM.from_pretrained("runs/checkerboard")
    x = model.sample(1000)                # 4 predictor steps + one transporter inverse
    nll = model.nll_bound(x)              # upper bound on -log p(x_0), nats per sample
    fm = FlowMatching.from_pretrained("runs/fm")   # the flow-matching baseline: fm.sample(1000, steps=50)

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
