"""Build or load any generator by what its config or artifact says it is."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import FMConfig, NTMConfig
from .flow_matching import FlowMatching
from .io import read_meta, resolve
from .model import NTM

MODEL_CLASSES = {cls.FORMAT: cls for cls in (NTM, FlowMatching)}


def build_model(config: NTMConfig | FMConfig) -> NTM | FlowMatching:
    """A freshly initialised generator of the kind the config describes."""
    if isinstance(config, FMConfig):
        return FlowMatching(config)
    if isinstance(config, NTMConfig):
        return NTM(config)
    raise TypeError(f"not a model config: {type(config).__name__}")


def load_model(path: str | Path, map_location: str | torch.device | None = None,
               weights: str = "model") -> NTM | FlowMatching:
    """Load the generator (NTM or FlowMatching) of a run directory or checkpoint folder: its EMA
    weights (``weights`` "model") or the raw training weights ("train")."""
    meta = read_meta(resolve(path), tuple(MODEL_CLASSES))
    return MODEL_CLASSES[meta["format"]].from_pretrained(path, map_location=map_location, weights=weights)
