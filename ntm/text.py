"""Prompts as conditions: the text-encoder interface, a per-caption embedding cache, and the batch
of encoded prompts the networks read.

An encoder is any object with

* ``identity`` (str): names the encoder and its settings; checkpoints record it, and cached
  embeddings are keyed by it;
* ``dim`` (int) and ``max_tokens`` (int): the width of its token states and how many it returns;
* ``encode(captions: list[str]) -> Prompts``: token states (B, L, E), a mask (B, L) and a pooled
  vector (B, E), fp32, L = ``max_tokens`` (padded with zeros, mask False).

The encoder stays frozen and outside every checkpoint. The empty caption "" is the null prompt: its
encoding is what classifier-free training drops prompts to and what guidance contrasts with.
``ntm.tools.text_encoders`` holds the MiniLM encoder (an optional dependency); tests use a stub.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import ConfigError


@dataclass
class Prompts:
    """Encoded prompts: ``tokens`` (B, L, E), ``mask`` (B, L) bool (True: a real token), ``pooled``
    (B, E), and ``drop`` (B,) bool or None: rows the networks replace by the null prompt (dropped
    captions in training, the unconditional half of guidance).

    It indexes, slices, repeats and moves like the label tensor it replaces, so batches of prompts
    flow through the same code as batches of labels."""

    tokens: Tensor
    mask: Tensor
    pooled: Tensor
    drop: Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def shape(self) -> tuple[int]:
        return (self.tokens.shape[0],)

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def _map(self, fn) -> "Prompts":
        return Prompts(fn(self.tokens), fn(self.mask), fn(self.pooled), None if self.drop is None else fn(self.drop))

    def to(self, device: torch.device | str) -> "Prompts":
        return self._map(lambda v: v.to(device))

    def __getitem__(self, idx) -> "Prompts":
        if isinstance(idx, Tensor):
            idx = idx.to(self.tokens.device)
        return self._map(lambda v: v[idx])

    def repeat_interleave(self, n: int, dim: int = 0) -> "Prompts":
        return self._map(lambda v: v.repeat_interleave(n, 0))

    def dropped(self, drop: Tensor | None = None) -> "Prompts":
        """The same prompts with the rows ``drop`` (B,) (default: all) marked as null."""
        d = torch.ones(len(self), dtype=torch.bool, device=self.device) if drop is None else drop.to(self.device)
        if self.drop is not None:
            d = d | self.drop
        return Prompts(self.tokens, self.mask, self.pooled, d)

    @staticmethod
    def cat(parts: list["Prompts"]) -> "Prompts":
        drops = None
        if any(p.drop is not None for p in parts):
            drops = torch.cat([p.drop if p.drop is not None else torch.zeros(len(p), dtype=torch.bool, device=p.device)
                               for p in parts])
        return Prompts(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]),
                       torch.cat([p.pooled for p in parts]), drops)


def null_condition(y, num_classes: int):
    """The unconditional counterpart of a condition batch: the null label, or the prompts all dropped."""
    if isinstance(y, Prompts):
        return y.dropped()
    return torch.full_like(y, num_classes)


def cat_conditions(a, b):
    """Two condition batches (labels or prompts) one after the other."""
    if isinstance(a, Prompts):
        return Prompts.cat([a, b])
    return torch.cat([a, b])


def check_prompts(prompts: Prompts, dim: int, max_tokens: int) -> None:
    """One clear error when an encoder returns the wrong shapes."""
    B = len(prompts)
    want = {"tokens": (B, max_tokens, dim), "mask": (B, max_tokens), "pooled": (B, dim)}
    for name, shape in want.items():
        got = tuple(getattr(prompts, name).shape)
        if got != shape:
            raise ConfigError(f"the text encoder returned {name} of shape {got}, expected {shape}")


def caption_key(identity: str, caption: str) -> str:
    return hashlib.sha1(f"{identity}\x00{caption}".encode()).hexdigest()


class CachedEncoder:
    """An encoder whose embeddings are kept per distinct caption, in memory and (with ``cache_dir``)
    on disk under ``cache_dir/<hash of identity>/``: one safetensors shard per batch of new captions,
    which records the caption keys it holds. New captions are encoded ``batch_size`` at a time."""

    def __init__(self, encoder, cache_dir: str | Path | None = None, batch_size: int = 256):
        self.encoder = encoder
        self.batch_size = batch_size
        self.identity, self.dim, self.max_tokens = encoder.identity, int(encoder.dim), int(encoder.max_tokens)
        self.folder = None if cache_dir is None else Path(cache_dir) / caption_key(self.identity, "")[:16]
        self.memory: dict[str, Prompts] = {}
        self.disk: dict[str, Prompts] | None = None  # caption key -> embedding, read on first use

    def _read_disk(self) -> dict[str, Prompts]:
        if self.disk is None:
            self.disk = {}
            for file in sorted(self.folder.glob("*.safetensors")) if self.folder is not None else ():
                try:
                    with safe_open(str(file), "pt") as f:
                        keys = (f.metadata() or {}).get("keys")
                        t = {name: f.get_tensor(name) for name in ("tokens", "mask", "pooled")} if keys else {}
                except (OSError, RuntimeError, SafetensorError):  # unreadable: its captions are encoded again
                    continue
                keys = keys.split(",") if keys else []
                if not keys or len(keys) != t["tokens"].shape[0]:
                    continue
                for i, k in enumerate(keys):
                    self.disk[k] = Prompts(t["tokens"][i:i + 1], t["mask"][i:i + 1].bool(), t["pooled"][i:i + 1])
        return self.disk

    def _store(self, keys: list[str], p: Prompts) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        file = self.folder / f"{caption_key(self.identity, ','.join(keys))}.safetensors"
        tmp = file.with_suffix(".tmp")
        save_file({"tokens": p.tokens.contiguous(), "mask": p.mask.to(torch.uint8).contiguous(),
                   "pooled": p.pooled.contiguous()}, str(tmp), metadata={"keys": ",".join(keys)})
        tmp.replace(file)

    def encode(self, captions: list[str]) -> Prompts:
        """Prompts for ``captions`` (B,), from the cache where present; the rest encoded in batches."""
        fresh = []
        for c in dict.fromkeys(captions):
            if c not in self.memory:
                p = self._read_disk().get(caption_key(self.identity, c))
                if p is None:
                    fresh.append(c)
                else:
                    self.memory[c] = p
        for lo in range(0, len(fresh), self.batch_size):
            chunk = fresh[lo:lo + self.batch_size]
            p = self.encoder.encode(chunk)
            check_prompts(p, self.dim, self.max_tokens)
            p = Prompts(p.tokens.float().cpu(), p.mask.bool().cpu(), p.pooled.float().cpu())
            self._store([caption_key(self.identity, c) for c in chunk], p)
            for i, c in enumerate(chunk):
                self.memory[c] = p[i:i + 1]
        return Prompts.cat([self.memory[c] for c in captions])


__all__ = ["Prompts", "CachedEncoder", "check_prompts", "caption_key", "null_condition", "cat_conditions"]
