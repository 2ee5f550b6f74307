import hashlib

import pytest
import torch
from torch import nn

from ntm import FlowMatching
from ntm.cli import main
from ntm.config import BackboneConfig, DataSpec, FMConfig, NTMConfig, PredictorConfig, TrajectoryConfig, TransporterConfig
from ntm.model import NTM
from ntm.text import Prompts


def randomize(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Perturb every parameter so zero-initialised layers become non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def small_config() -> NTMConfig:
    return NTMConfig(
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


class GaussianVelocity(nn.Module):
    """E[eps - x_0 | x_t] when x_0 ~ N(m, s^2) per coordinate, under x_t = (1 - t) x_0 + t eps."""

    def __init__(self, m: float, s: float):
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x, t, y=None):
        tt = t.double().reshape(-1, 1, 1)
        var = (1 - tt) ** 2 * self.s**2 + tt**2
        r = x.double() - (1 - tt) * self.m
        e_x0 = self.m + (1 - tt) * self.s**2 / var * r
        e_eps = tt / var * r
        return (e_eps - e_x0).float()


def gaussian_flow(m=0.7, s=0.4, dim=3, shift=0.0):
    cfg = FMConfig(data=DataSpec(shape=(dim,), mean=(0.0,) * dim, std=(1.0,) * dim), shift=shift)
    return FlowMatching(cfg, velocity=GaussianVelocity(m, s)).eval()


def fm_and_ntm(seed=0, velocity_scale="floor"):
    """A randomised FM model and the NTM that starts from it (identity transporter, the FM velocity
    network read in u-space), built with the core API only."""
    spec = DataSpec(shape=(3,), mean=(0.0,) * 3, std=(1.0,) * 3, num_classes=2)
    fm_cfg = FMConfig(data=spec, velocity=BackboneConfig(layers=2, width=16, heads=2), shift=-1.0)
    torch.manual_seed(seed)
    fm = FlowMatching(fm_cfg)
    randomize(fm, 0.3, seed)
    ntm = NTM(NTMConfig(data=spec, trajectory=TrajectoryConfig(T=4, shift=-1.0),
                        transporter=TransporterConfig(blocks=2, layers=1, width=16, heads=2),
                        predictor=PredictorConfig(layers=2, width=16, heads=2, kind="velocity",
                                                  velocity_scale=velocity_scale)))
    ntm.predictor.velocity.load_state_dict(fm.velocity.state_dict())
    return fm.eval(), ntm.eval()


class StubEncoder:
    """Deterministic token vectors from a hash of each word; pooled = mean of the real tokens."""

    def __init__(self, dim=8, max_tokens=6):
        self.dim, self.max_tokens, self.identity = dim, max_tokens, f"stub/{dim}/{max_tokens}"
        self.calls = 0

    def word(self, w):
        seed = int(hashlib.sha1(w.encode()).hexdigest()[:8], 16)
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def encode(self, captions):
        self.calls += len(captions)
        B, L = len(captions), self.max_tokens
        tokens, mask = torch.zeros(B, L, self.dim), torch.zeros(B, L, dtype=torch.bool)
        for i, c in enumerate(captions):
            words = (["<s>"] + c.split())[:L]
            for j, w in enumerate(words):
                tokens[i, j], mask[i, j] = self.word(w), True
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return Prompts(tokens, mask, pooled)


def run_cli(capsys, *args):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code, err, fragment):
    """A non-zero exit with exactly one 'ntm: error:' line that mentions ``fragment``."""
    lines = [line for line in err.splitlines() if line.strip()]
    return code != 0 and len(lines) == 1 and lines[0].startswith("ntm: error:") and fragment in lines[0]
