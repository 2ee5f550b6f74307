import pytest
import torch

from ntm.config import DataSpec, ModelConfig, PredictorConfig, TrajectoryConfig, TransporterConfig
from ntm.model import NTM


def randomize(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Perturb every parameter so zero-initialised layers become non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def small_config() -> ModelConfig:
    return ModelConfig(
        data=DataSpec(name="data", shape=(2,), mean=(0.0, 0.0), std=(1.0, 1.0)),
        trajectory=TrajectoryConfig(T=4, shift=-1.0),
        transporter=TransporterConfig(blocks=2, layers=2, width=16, heads=2),
        predictor=PredictorConfig(layers=2, width=16, heads=2),
    )


@pytest.fixture
def random_model(small_config) -> NTM:
    torch.manual_seed(0)
    model = NTM(small_config)
    randomize(model, 0.2)
    return model.eval()
