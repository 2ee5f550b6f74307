"""What every generator here shares (:class:`NTM`, :class:`ntm.flow_matching.FlowMatching`): a
frozen config, a data layout, token conversion, label checks and one-call loading."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from . import data as data_mod
from .config import DataSpec, from_dict
from .errors import CheckpointError, ConfigError
from .io import load_into, read_meta, resolve
from .nn import ConditionedTransformer
from .text import CachedEncoder, Prompts, check_prompts
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

    def check_labels(self, y):
        """A condition batch checked against the model and moved to its device: int labels (B,) for
        class-conditional models, ``Prompts`` for text-conditioned ones, or None (the null condition)."""
        if y is None:
            return None
        if self.spec.is_text:
            if not isinstance(y, Prompts):
                raise ValueError("this model is conditioned on prompts, not class labels")
            check_prompts(y, self.spec.text_dim, self.spec.text_tokens)
            return y.to(self.device)
        if isinstance(y, Prompts):
            raise ValueError("this model takes class labels, not prompts")
        n = self.spec.num_classes
        if n == 0:
            raise ValueError("this model is unconditional; it takes no class label")
        y = y.to(self.device).long()
        if ((y < 0) | (y >= n)).any():
            raise ValueError(f"class labels must lie in [0, {n - 1}]")
        return y

    # ------------------------------------------------------------------------------- prompts
    def attach_text_encoder(self, encoder) -> None:
        """The (frozen, never saved) encoder that turns prompt strings into ``Prompts``; its identity
        must be the one this model was trained with."""
        if not self.spec.is_text:
            raise ValueError("this model is not conditioned on text")
        if encoder.identity != self.spec.text_encoder:
            raise ConfigError(f"this model needs the text encoder '{self.spec.text_encoder}', got '{encoder.identity}'")
        self.text_encoder = encoder if isinstance(encoder, CachedEncoder) else CachedEncoder(encoder)

    def encode_prompts(self, prompts) -> Prompts:
        """Prompt strings (a list, or one string) -> ``Prompts``; already encoded prompts pass through."""
        if isinstance(prompts, Prompts):
            return prompts
        if not self.spec.is_text:
            raise ValueError("this model is not conditioned on text; it takes no prompt")
        if getattr(self, "text_encoder", None) is None:
            raise ConfigError(f"this model needs the text encoder '{self.spec.text_encoder}'; attach it with "
                              "model.attach_text_encoder(ntm.tools.text_encoders.load_encoder(model.spec.text_encoder))")
        return self.text_encoder.encode([prompts] if isinstance(prompts, str) else list(prompts))

    def prompt_batch(self, prompt, n: int) -> Prompts:
        """``Prompts`` for n samples from one prompt (repeated) or n of them."""
        p = self.encode_prompts(prompt)
        if len(p) == 1 and n > 1:
            p = p.repeat_interleave(n)
        if len(p) != n:
            raise ValueError(f"got {len(p)} prompts for {n} samples")
        return p

    def set_null_prompt(self, null: Prompts) -> None:
        """Store the encoding of the empty prompt (one row) in every text-conditioned network."""
        for module in self.modules():
            if isinstance(module, ConditionedTransformer) and module.text_dim:
                module.set_null_prompt(null.tokens[0], null.mask[0], null.pooled[0])

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
        if weights == "model":  # what the run folder holds was made from the averaged weights (NTM: its denoiser)
            model.after_load(Path(path), meta)
        model.eval()
        if map_location is not None:
            model.to(map_location)
        return model
