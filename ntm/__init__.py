"""ntm: Normalizing Trajectory Models in PyTorch (Gu et al., arXiv 2605.08078).

    from ntm import NTM
    model = NTM.from_pretrained("runs/checkerboard")
    x = model.sample(1000)                # 4 predictor steps + one transporter inverse
    nll = model.nll_bound(x)              # upper bound on -log p(x_0), nats per sample
"""
from .config import DataSpec, ModelConfig, PredictorConfig, PRESETS, TrainConfig, TrajectoryConfig, TransporterConfig
from .model import NTM

__all__ = ["NTM", "ModelConfig", "TrainConfig", "TrajectoryConfig", "TransporterConfig", "PredictorConfig",
           "DataSpec", "PRESETS"]
__version__ = "0.1.0"
