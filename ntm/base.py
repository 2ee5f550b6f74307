"""What every generator here shares (:class:`NTM`, :class:`ntm.flow_matching.FlowMatching`): a
frozen config, a data layout, token conversion, label checks and one-call loading."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from . import data as data_mod
from .config import DataSpec, from_dict
from .errors import CheckpointError
from .io import load_into, read_meta, resolve
from .trajectory import shift_for_length


class TokenModel(nn.Module):
    """Base of the generators. Subclasses set ``FORMAT`` (the artifact tag), ``CONFIG`` (the config
    class) and ``shift_setting`` (their time shift, None: from the sequence length)."""

    FORMAT: ClassVar[str]
    CONFIG: ClassVar[type]
    config: object

    @property
    def spec(self) -> DataSpec:
        return self.config.data

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def shift_setting(self) -> float | None:
        raise NotImplementedError

    @property
    def time_shift(self) -> float:
        shift = self.shift_setting
        return shift if shift is not None else shift_for_length(self.spec.num_tokens)

    def to_tokens(self, x: Tensor) -> Tensor:
        """Raw samples (B, *shape) -> standardised tokens (B, N, D) on the model's device."""
        return data_mod.to_tokens(x.to(self.device), self.spec)

    def from_tokens(self, z: Tensor) -> Tensor:
        """Standardised tokens (B, N, D) -> raw samples (B, *shape)."""
        return data_mod.from_tokens(z, self.spec)

    def check_labels(self, y: Tensor | None) -> Tensor | None:
        if y is None:
            return None
        n = self.spec.num_classes
        if n == 0:
            raise ValueError("this model is unconditional; it takes no class label")
        y = y.to(self.device).long()
        if ((y < 0) | (y >= n)).any():
            raise ValueError(f"class labels must lie in [0, {n - 1}]")
        return y

    def after_load(self, path: Path, meta: dict) -> None:
        """Hook for what a checkpoint's run folder holds beside the weights (NTM: its denoiser)."""

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device | None = None,
                        weights: str = "model"):
        """Load a run directory (its latest checkpoint) or a checkpoint folder written by training:
        the EMA weights (``weights`` "model") or the raw training weights ("train")."""
        ckpt = resolve(path)
        meta = read_meta(ckpt)
        if meta["format"] != cls.FORMAT:
            raise CheckpointError(f"{path} holds a '{meta['format']}' artifact, not {cls.__name__} "
                                  "(ntm.load_model loads any model kind)")
        try:
            config = from_dict(cls.CONFIG, meta["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{ckpt}: invalid model config ({exc})") from None
        try:
            model = cls(config)
        except (ValueError, TypeError, RuntimeError, ZeroDivisionError, AssertionError, IndexError) as exc:
            raise CheckpointError(f"{ckpt}: cannot build the model from its config ({exc})") from None
        load_into(model, ckpt / f"{weights}.safetensors")
        model.after_load(Path(path), meta)
        model.eval()
        if map_location is not None:
            model.to(map_location)
        return model
