"""ntm: Normalizing Trajectory Models in PyTorch (Gu et al., arXiv 2605.08078).

    from ntm import NTM
    model = NTM.from_pretrained("runs/checkerboard")
    x = model.sample(1000)                # 4 predictor steps + one transporter inverse
    nll = model.nll_bound(x)              # upper bound on -log p(x_0), nats per sample
    fm = FlowMatching.from_pretrained("runs/fm")   # the flow-matching baseline: fm.sample(1000, steps=50)
"""
from .config import DataSpec, ModelConfig, PredictorConfig, PRESETS, TrainConfig, TrajectoryConfig, TransporterConfig
from .checkpoint import load_model
from .flow_matching import FlowMatching
from .model import NTM

__all__ = ["NTM", "FlowMatching", "load_model", "ModelConfig", "TrainConfig", "TrajectoryConfig", "TransporterConfig", "PredictorConfig",
           "DataSpec", "PRESETS"]
__version__ = "0.1.0"
