"""Transformer pieces shared by the transporter and the predictor.

Activations may run in low precision (bf16 autocast on CUDA); LayerNorm and attention softmax run in
fp32. The key/value cache used for autoregressive decoding is an explicit object passed by the
caller; no module stores sampling state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CONDITIONING, POSITION, TEXT_ATTENTION


def sincos_positions(grid: tuple[int, int], width: int) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings (rows * cols, width) for tokens in row-major order:
    half of the channels encode the row, half the column, each as sines and cosines of
    geometrically spaced frequencies (``width`` must be divisible by 4)."""
    if width % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {width}")
    rows, cols = grid
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij")
    freqs = 1.0 / 10_000.0 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    parts = []
    for coord in (r.flatten(), c.flatten()):
        angle = coord[:, None] * freqs[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, 1).float()


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of times in [0, 1]. t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t followed by a two-layer MLP. (B,) -> (B, width)."""

    def __init__(self, width: int, freq_dim: int = 64):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


@dataclass
class KVCache:
    """Preallocated keys and values of every layer for token-by-token decoding.

    keys, values: (layers, B, heads, N_max, head_dim). ``length`` is the number of filled positions.
    Created by :meth:`Transformer.new_cache`; advanced by the caller, never by a module.
    """

    keys: Tensor
    values: Tensor
    length: int = 0


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """Softmax attention, q: (B, H, n, d), k, v: (B, H, m, d); ``mask`` (n, m) True = keep.

    Short sequences use an explicit fp32 softmax (much faster than the fused kernel on CPU for a
    handful of tokens); long ones use ``scaled_dot_product_attention``.
    """
    n, m = q.shape[-2], k.shape[-2]
    if causal and mask is None:
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(diagonal=m - n)
    if n * m > 1024:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    tiny = m <= 8  # broadcasting beats many tiny batched matmuls
    if tiny:
        scores = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1)
    else:
        scores = q @ k.transpose(-1, -2)
    scores = scores.float() * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1).to(v.dtype)
    if tiny:
        return (probs.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)
    return probs @ v


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        assert width % heads == 0, "width must be divisible by heads"
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, W = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: Tensor, causal: bool, keep: Tensor | None = None) -> Tensor:
        """Full-sequence attention. x: (B, N, W); ``keep`` (B, N) bool: the keys attended to (all if None)."""
        q, k, v = self._split(x)
        out = attend(q, k, v, mask=None if keep is None else keep[:, None, None, :], causal=causal)
        return self.proj(out.transpose(1, 2).reshape(x.shape))

    def forward_cached(self, x: Tensor, cache: KVCache, layer: int) -> Tensor:
        """Attention of new positions x: (B, n, W) to all cached positions plus themselves (causally).

        Writes the new keys/values into ``cache`` at positions [length, length + n).
        """
        q, k, v = self._split(x)
        start, n = cache.length, x.shape[1]
        cache.keys[layer, :, :, start:start + n] = k.to(cache.keys.dtype)
        cache.values[layer, :, :, start:start + n] = v.to(cache.values.dtype)
        keys = cache.keys[layer, :, :, :start + n].to(q.dtype)
        values = cache.values[layer, :, :, :start + n].to(q.dtype)
        out = attend(q, keys, values, causal=n > 1)
        return self.proj(out.transpose(1, 2).reshape(x.shape))


class CrossAttention(nn.Module):
    """Attention of a sequence x (B, N, W) to a context (B, L, W), e.g. a prompt's token states."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Tensor, keep: Tensor | None = None) -> Tensor:
        """``keep`` (B, L) bool: the context positions attended to (all if None)."""
        B, N, W = x.shape
        q = self.q(x).view(B, N, self.heads, W // self.heads).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        out = attend(q, k, v, mask=None if keep is None else keep[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(x.shape))


class Layer(nn.Module):
    """Pre-norm transformer layer: x + Attn(LN(x)), [x + CrossAttn(LN(x), context),] then x + MLP(LN(x)).

    With ``adaln`` a condition vector c (B, W) modulates the attention and MLP blocks (adaLN-Zero, DiT):
    x + g_a * Attn(LN(x) (1 + a_a) + b_a), then x + g_m * MLP(LN(x) (1 + a_m) + b_m), with (b, a, g) a
    linear map of SiLU(c), zero at initialisation (every block starts as the identity)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, cross: bool = False, adaln: bool = False):
        super().__init__()
        self.modulation = nn.Linear(width, 6 * width) if adaln else None
        if adaln:
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)
        self.norm1 = LayerNorm32(width)
        self.attn = Attention(width, heads)
        self.norm_c = LayerNorm32(width) if cross else None
        self.cross = CrossAttention(width, heads) if cross else None
        self.norm2 = LayerNorm32(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor, causal: bool, keep: Tensor | None = None, context: Tensor | None = None,
                context_keep: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Tokens x (B, N, W) -> (B, N, W). ``keep`` (B, N) masks padded keys; ``context`` (B, L, W) with
        ``context_keep`` (B, L) feeds the cross-attention; ``cond`` (B, W) the adaLN modulation."""
        if self.modulation is None:
            x = x + self.attn(self.norm1(x), causal, keep)
            if self.cross is not None:
                x = x + self.cross(self.norm_c(x), context, context_keep)
            return x + self.mlp(self.norm2(x))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(F.silu(cond))[:, None].chunk(6, dim=-1)
        x = x + gate_a * self.attn(self.norm1(x) * (1 + scale_a) + shift_a, causal, keep)
        if self.cross is not None:
            x = x + self.cross(self.norm_c(x), context, context_keep)
        return x + gate_m * self.mlp(self.norm2(x) * (1 + scale_m) + shift_m)

    def forward_cached(self, x: Tensor, cache: KVCache, layer: int) -> Tensor:
        """Causal decoding: the new tokens x (B, n, W) attend to the keys of ``cache`` at ``layer`` too."""
        x = x + self.attn.forward_cached(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of layers with a final norm. Causal or bidirectional over the token axis. With ``adaln``
    the layers and the final norm (shift and scale) are modulated by a condition vector."""

    def __init__(self, width: int, depth: int, heads: int, causal: bool, cross: bool = False, adaln: bool = False):
        super().__init__()
        self.causal = causal
        self.heads = heads
        self.width = width
        self.layers = nn.ModuleList(Layer(width, heads, cross=cross, adaln=adaln) for _ in range(depth))
        self.norm = LayerNorm32(width)
        self.final_modulation = nn.Linear(width, 2 * width) if adaln else None
        if adaln:
            nn.init.zeros_(self.final_modulation.weight)
            nn.init.zeros_(self.final_modulation.bias)

    def forward(self, h: Tensor, keep: Tensor | None = None, context: Tensor | None = None,
                context_keep: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """h: (B, N, W) -> (B, N, W); ``keep`` (B, N) bool masks keys (bidirectional use only);
        ``context`` (B, L, W) with ``context_keep`` (B, L): what cross-attention layers attend to;
        ``cond`` (B, W): the condition of adaLN layers (required with ``adaln``, ignored otherwise)."""
        if self.final_modulation is not None and cond is None:
            raise ValueError("an adaLN transformer needs its condition vector")
        for layer in self.layers:
            h = layer(h, self.causal, keep, context, context_keep, cond)
        if self.final_modulation is None:
            return self.norm(h)
        shift, scale = self.final_modulation(F.silu(cond))[:, None].chunk(2, dim=-1)
        return self.norm(h) * (1 + scale) + shift

    def new_cache(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype = torch.float32) -> KVCache:
        shape = (len(self.layers), batch, self.heads, max_len, self.width // self.heads)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def forward_cached(self, h: Tensor, cache: KVCache) -> Tensor:
        """Process the next positions h: (B, n, W) given ``cache``; advances ``cache.length`` by n."""
        assert self.causal, "cached decoding needs a causal transformer"
        for i, layer in enumerate(self.layers):
            h = layer.forward_cached(h, cache, i)
        cache.length += h.shape[1]
        return self.norm(h)


def soft_clip(x: Tensor, bound: float) -> Tensor:
    """Smoothly limit x to (-bound, bound): bound * tanh(x / bound)."""
    return bound * torch.tanh(x / bound)


class ConditionedTransformer(nn.Module):
    """A bidirectional transformer over tokens (B, N, D) conditioned on times, a label and optionally T.

    The backbone shared by the NTM predictor (conditioned on t and s) and the flow-matching velocity
    field (conditioned on t only). Time, label and 1/T embeddings sum to one condition vector (B, W);
    with ``conditioning`` "add" it is added to every token, with "adaln" it modulates every block
    (adaLN-Zero). ``condition_std`` is the initial standard deviation of each coordinate of the label
    embedding and of the pooled prompt's projection (the pooled vector has unit norm); the time
    embedding's norm is about 1-2.5, so at 0.02 a condition gets in only as fast as training grows it.
    ``proj_out`` is zero-initialised and maps to ``out_dim`` channels per token.
    ``position`` "learned" gives each token a learned embedding (std 0.02 at initialisation);
    "sincos" a fixed 2-D sine-cosine embedding over ``grid`` (rows, columns; default one row).
    Label ``num_classes`` is the null (unconditional) label.

    With ``text_dim`` > 0 the condition is a prompt (``ntm.text.Prompts``) instead of a label: its
    ``text_tokens`` token states are projected to the width and, with ``text_attention`` "concat",
    appended to the sequence (the paper's choice) or, with "cross", attended to by a cross-attention
    block in every layer; padding is masked out either way, and the trailing columns no prompt of the
    batch uses are dropped (the image tokens' outputs do not change, up to rounding). The pooled vector
    joins the additive conditioning.
    The null prompt (the encoder's encoding of "", stored in the buffers ``null_*``) stands in for
    a missing prompt and for the rows a prompt batch marks as dropped.
    """

    def __init__(self, width: int, layers: int, heads: int, num_tokens: int, token_dim: int, out_dim: int,
                 num_classes: int = 0, two_times: bool = True, multi_T: bool = False, text_dim: int = 0,
                 text_tokens: int = 0, text_attention: str = "concat", conditioning: str = "add",
                 condition_std: float = 0.02, position: str = "learned", grid: tuple[int, int] | None = None):
        super().__init__()
        self.token_dim = token_dim
        self.num_classes = num_classes
        self.proj_in = nn.Linear(token_dim, width)
        if position not in POSITION:
            raise ValueError(f"unknown position embedding '{position}' (use {' or '.join(POSITION)})")
        if position == "learned":
            self.pos = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        else:
            grid = grid or (1, num_tokens)
            if grid[0] * grid[1] != num_tokens:
                raise ValueError(f"a {grid[0]}x{grid[1]} grid does not hold {num_tokens} tokens")
            self.register_buffer("pos", sincos_positions(grid, width))
        self.time_t = TimeEmbedding(width)
        self.time_s = TimeEmbedding(width) if two_times else None
        self.steps = TimeEmbedding(width) if multi_T else None  # embeds 1/T when trained over several T
        self.label = nn.Embedding(num_classes + 1, width)
        nn.init.normal_(self.label.weight, std=condition_std)
        self.text_dim = text_dim
        if text_dim:
            self.text_in = nn.Linear(text_dim, width)
            self.text_pool = nn.Linear(text_dim, width)
            nn.init.normal_(self.text_pool.weight, std=condition_std)  # a unit-norm pooled vector -> that std
            nn.init.zeros_(self.text_pool.bias)
            self.text_pos = nn.Parameter(torch.randn(text_tokens, width) * 0.02)
            self.register_buffer("null_tokens", torch.zeros(text_tokens, text_dim))
            self.register_buffer("null_mask", torch.ones(text_tokens, dtype=torch.bool))
            self.register_buffer("null_pooled", torch.zeros(text_dim))
        if text_attention not in TEXT_ATTENTION:
            raise ValueError(f"unknown text attention '{text_attention}' (use {' or '.join(TEXT_ATTENTION)})")
        self.cross_text = bool(text_dim) and text_attention == "cross"
        if conditioning not in CONDITIONING:
            raise ValueError(f"unknown conditioning '{conditioning}' (use {' or '.join(CONDITIONING)})")
        self.adaln = conditioning == "adaln"
        self.net = Transformer(width, layers, heads, causal=False, cross=self.cross_text, adaln=self.adaln)
        self.proj_out = nn.Linear(width, out_dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def backbone(self, x: Tensor, t: Tensor, s: Tensor | None = None, y: Tensor | None = None,
                 T: Tensor | None = None) -> Tensor:
        """x: (B, N, D); t, s: (B,); y: (B,) labels or None (null); T: (B,) or None -> (B, N, out_dim) fp32."""
        return self.proj_out(self.hidden(x, t, s, y, T)).float()

    def hidden(self, x: Tensor, t: Tensor, s: Tensor | None = None, y: Tensor | None = None,
               T: Tensor | None = None) -> Tensor:
        """The final-norm features (B, N, width) that ``proj_out`` reads (extra heads may read them too)."""
        B = x.shape[0]
        text = None
        if self.text_dim:
            text, y = self.prompt_states(y, B), None
        if y is None:
            y = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
        cond = self.time_t(t) + self.label(y)
        if self.time_s is not None:
            cond = cond + self.time_s(s)
        if self.steps is not None:
            if T is None:
                raise ValueError("this network was trained over several T; pass T")
            cond = cond + self.steps(1.0 / T.float())
        h = self.proj_in(x.to(self.proj_in.weight.dtype)) + self.pos
        words = keep = mask = None
        if text is not None:
            tokens, mask, pooled = text
            cond = cond + self.text_pool(pooled)
            # drop the trailing columns no prompt of the batch uses: they are masked out of every
            # attention, so the image tokens' outputs are unchanged (up to rounding) and the sequence is
            # shorter; a compiled graph keeps the full, static length
            L = mask.shape[1]
            if not torch.compiler.is_compiling():
                used = mask.any(0).nonzero()
                L = int(used.max()) + 1 if len(used) else L
            tokens, mask = tokens[:, :L], mask[:, :L]
            words = self.text_in(tokens.to(self.text_in.weight.dtype)) + self.text_pos[:L]
        added = 0 if self.adaln else cond[:, None]  # adaLN: the condition modulates, it is not added
        modulation = cond if self.adaln else None
        if words is None:
            return self.net(h + added, cond=modulation)
        if self.cross_text:
            return self.net(h + added, context=words, context_keep=mask, cond=modulation)
        keep = torch.cat([torch.ones(B, h.shape[1], dtype=torch.bool, device=h.device), mask], 1)
        return self.net(torch.cat([h, words], 1) + added, keep, cond=modulation)[:, :h.shape[1]]

    def prompt_states(self, prompts, B: int) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens (B, L, E), mask (B, L), pooled (B, E)) of a prompt batch (None: all null), with the
        null prompt in the rows marked as dropped."""
        null = (self.null_tokens.expand(B, -1, -1), self.null_mask.expand(B, -1), self.null_pooled.expand(B, -1))
        if prompts is None:
            return null
        if not hasattr(prompts, "pooled"):
            raise ValueError("this network is conditioned on prompts, not class labels")
        if prompts.drop is None:
            return prompts.tokens, prompts.mask, prompts.pooled
        d = prompts.drop.to(self.null_tokens.device)
        return (torch.where(d[:, None, None], null[0], prompts.tokens), torch.where(d[:, None], null[1], prompts.mask),
                torch.where(d[:, None], null[2], prompts.pooled))

    def set_null_prompt(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> None:
        """Store the encoding of the empty prompt (tokens (L, E), mask (L,), pooled (E,))."""
        self.null_tokens.copy_(tokens)
        self.null_mask.copy_(mask)
        self.null_pooled.copy_(pooled)
