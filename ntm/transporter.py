"""The transporter f_T: a shallow stack of causal autoregressive flow blocks (paper §3.1, A.1).

Each block maps one trajectory level x (B, N, D) to u (B, N, D), token by token in its scan order:

    u_n = g_n((x_n - mu_n(x_{<n}, t)) * exp(-a_n(x_{<n}, t))),    log|det J| = sum_{n, c} (-a_n,c + log g_n,c')

with g the identity ("affine" transform) or an element-wise monotone rational-quadratic spline whose
knots also come from the network ("spline", ``ntm.splines``).

The parameters of token n come from a causal transformer whose input at position n is token n - 1
(position 0 holds a learned start token), so every token is transformed and the Jacobian is
triangular. Blocks alternate scan direction. The output layer is zero-initialised, so a new
transporter is the identity; at t = 1 the transporter is skipped (identity) by definition.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import TransporterConfig
from .nn import TimeEmbedding, Transformer, soft_clip
from .splines import num_params, spline_forward, spline_inverse


class AffineARBlock(nn.Module):
    """One causal block over N tokens of D channels, conditioned on the level time t: an affine map
    of each token given the previous ones, followed by a spline when ``cfg.transform`` is "spline"."""

    def __init__(self, cfg: TransporterConfig, num_tokens: int, token_dim: int, flip: bool, multi_T: bool = False,
                 spline: bool | None = None):
        super().__init__()
        W = cfg.width
        self.flip = flip
        self.clip = cfg.log_scale_clip
        self.token_dim = token_dim
        self.spline = cfg.transform == "spline" if spline is None else spline
        self.bins, self.bound = cfg.spline_bins, cfg.spline_bound
        per_channel = 2 + (num_params(cfg.spline_bins) if self.spline else 0)
        self.proj_in = nn.Linear(token_dim, W)
        self.start = nn.Parameter(torch.randn(1, 1, W) * 0.02)
        self.pos = nn.Parameter(torch.randn(num_tokens, W) * 0.02)
        self.time = TimeEmbedding(W)
        self.steps = TimeEmbedding(W) if multi_T else None  # embeds 1/T when trained over several T
        self.net = Transformer(W, cfg.layers, cfg.heads, causal=True)
        # 1 + tanh(gate(level embedding)) scales what the block reads of the previous tokens;
        # zero-initialised: the ungated block at the start
        self.gate = nn.Linear(W, 1) if cfg.coupling_gate else None
        self.coupling_t_max = cfg.coupling_t_max  # levels at or above it: element-wise
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        self.proj_out = nn.Linear(W, per_channel * token_dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def _cond(self, t: Tensor, T: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The level embedding (B, W) and the scale (B,) of what the block reads of the previous tokens:
        the coupling gate's 1 + tanh(a(t, T)) times 0 at levels at or above ``coupling_t_max`` (None when
        neither applies). Computed once per call, not once per decoded token."""
        emb = self.time(t)
        if self.steps is not None:
            if T is None:
                raise ValueError("this transporter was trained over several T; pass T")
            emb = emb + self.steps(1.0 / T.float())
        reach = None
        if self.gate is not None:
            reach = 1 + torch.tanh(self.gate(emb))[:, 0]
        if self.coupling_t_max < 1:
            below = (t < self.coupling_t_max).to(emb.dtype)
            reach = below if reach is None else reach * below
        return emb, reach

    def _order(self, x: Tensor) -> Tensor:
        return x.flip(1) if self.flip else x

    def _head(self, h: Tensor) -> Tensor:
        """Network features (B, n, W) -> the fp32 output layer (B, n, P)."""
        return self.proj_out(h).float()

    def _params(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """The output layer (B, n, P) from :meth:`_head` -> fp32 (log_scale, shift) (B, n, D) and the
        spline's raw parameters (B, n, D, 3K - 1) or None."""
        D = self.token_dim
        # split, not slices: its backward concatenates the parts' gradients instead of zero-filling
        # a full-size buffer per part
        log_scale, shift, rest = out.split([D, D, out.shape[-1] - 2 * D], dim=-1)
        raw = rest.reshape(out.shape[:-1] + (D, -1)) if self.spline else None
        return soft_clip(log_scale, self.clip), shift, raw

    def _transform(self, x: Tensor, params, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Element-wise x -> u and log|du/dx| per element, (B, n, D).

        With ``rows`` (B,), params hold R rows of parameters, (R, n, D[, 3K - 1]), and row b of x uses
        params row rows[b] (see :meth:`_projected`)."""
        log_scale, shift, raw = params
        if rows is not None:
            log_scale, shift = log_scale.index_select(0, rows), shift.index_select(0, rows)
        y = (x - shift) * torch.exp(-log_scale)
        if raw is None:
            return y, -log_scale
        if rows is None:
            u, logd = spline_forward(y, raw, self.bins, self.bound)
        else:  # the spline tables stay one per parameter row: (R n D, 3K - 1), element -> its table
            per_row = raw.shape[1] * raw.shape[2]
            index = (rows[:, None] * per_row + torch.arange(per_row, device=rows.device)).reshape(-1)
            u, logd = spline_forward(y, raw.reshape(-1, raw.shape[-1]), self.bins, self.bound, index=index)
        return u, logd - log_scale

    def _untransform(self, u: Tensor, params) -> Tensor:
        """Element-wise u -> x, the inverse of :meth:`_transform`."""
        log_scale, shift, raw = params
        y = u if raw is None else spline_inverse(u, raw, self.bins, self.bound)
        return y * torch.exp(log_scale) + shift

    def _read_previous(self, prev: Tensor, reach: Tensor | None) -> Tensor:
        """Features (B, n, W) of previous tokens prev (B, n, D), scaled by ``reach`` (B,) from
        :meth:`_cond` if any (0: the block reads nothing of the other tokens, element-wise)."""
        h = self.proj_in(prev.to(self.proj_in.weight.dtype))
        return h if reach is None else h * reach[:, None, None].to(h.dtype)

    def _embed_inputs(self, prev: Tensor, temb: Tensor, start: int, reach: Tensor | None = None) -> Tensor:
        """Input features for positions [start, start + n): token n - 1 (or the start token at 0)."""
        h = self._read_previous(prev, reach)
        if start == 0:
            h = torch.cat([self.start.expand(prev.shape[0], 1, -1).to(h.dtype), h[:, :-1]], dim=1)
        n = h.shape[1]
        return h + self.pos[start:start + n] + temb[:, None]

    def forward(self, x: Tensor, t: Tensor, T: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: (B, N, D), t: (B,), T: (B,) or None -> u: (B, N, D) fp32, log|det J|: (B,) fp32."""
        xs = self._order(x.float())
        temb, reach = self._cond(t, T)
        out, rows = self._projected(xs, t, T, temb, reach)
        u, logd = self._transform(xs, self._params(out), rows)
        return self._order(u), logd.flatten(1).sum(1)

    def _projected(self, xs: Tensor, t: Tensor, T: Tensor | None, temb: Tensor,
                   reach: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The network's fp32 output for ordered tokens xs (B, N, D): (out (B, N, P), None), or
        (out (R, N, P), rows (B,)) where row b's output is out[rows[b]].

        At levels t >= ``coupling_t_max`` the block reads nothing of x, so its output there depends
        only on the level (t, T): it is computed once per distinct level in the batch and shared by
        every row at that level, and so are the spline's softmax and knots (the same values as a
        per-row pass; the mixed-T training batches hold a few dozen distinct levels against
        hundreds of rows).
        """
        free = t >= self.coupling_t_max if self.coupling_t_max < 1 else None
        if free is None or not bool(free.any()):
            return self._head(self.net(self._embed_inputs(xs, temb, 0, reach))), None
        B, N, D = xs.shape
        tied = free.nonzero().squeeze(1)
        level = t[tied, None] if T is None else torch.stack([t[tied], T[tied].float()], 1)
        _, which = torch.unique(level, dim=0, return_inverse=True)  # (n_free,) distinct level of each row
        U = int(which.max()) + 1
        first = which.new_full((U,), B).scatter_reduce(0, which, tied, "amin")  # a row of each level
        shared = self._embed_inputs(xs.new_zeros(U, N, D), temb[first], 0, temb.new_zeros(U))
        parts, rows = [self._head(self.net(shared))], torch.empty(B, dtype=torch.long, device=xs.device)
        rows[tied] = which
        coupled = (~free).nonzero().squeeze(1)
        if coupled.numel():
            parts.append(self._head(self.net(self._embed_inputs(
                xs[coupled], temb[coupled], 0, None if reach is None else reach[coupled]))))
            rows[coupled] = U + torch.arange(coupled.numel(), device=xs.device)
        return torch.cat(parts), rows

    def inverse(self, u: Tensor, t: Tensor, T: Tensor | None = None, use_cache: bool = True) -> Tensor:
        """Decode x from u token by token. u: (B, N, D), t: (B,) -> x: (B, N, D) fp32.

        With ``use_cache`` a preallocated KV cache is created here and passed explicitly to the
        transformer at every step; without it each step recomputes the whole prefix (reference path).
        """
        us = self._order(u.float())
        B, N, _ = us.shape
        temb, reach = self._cond(t, T)
        xs = torch.zeros_like(us)
        cache = self.net.new_cache(B, N, us.device) if use_cache else None
        for n in range(N):
            if cache is not None:
                self._decode_cached(us, xs, n, temb, cache, reach)
                continue
            h = self.net(self._embed_inputs(xs[:, :n + 1], temb, 0, reach))[:, n:n + 1]
            xs[:, n:n + 1] = self._untransform(us[:, n:n + 1], self._params(self._head(h)))
        return self._order(xs)

    def _decode_cached(self, us: Tensor, xs: Tensor, n: int, temb: Tensor, cache, reach: Tensor | None = None) -> None:
        """Decode token n of ``xs`` in place from the cached prefix (advances the cache by one)."""
        prev = self.start.expand(us.shape[0], 1, -1) if n == 0 else self._read_previous(xs[:, n - 1:n], reach)
        h = self.net.forward_cached(prev + self.pos[n:n + 1] + temb[:, None], cache)
        xs[:, n:n + 1] = self._untransform(us[:, n:n + 1], self._params(self._head(h)))

    def inverse_jacobi(self, u: Tensor, t: Tensor, T: Tensor | None = None, chunk: int = 0,
                       tol: float = 1e-5, max_iters: int = 0) -> tuple[Tensor, int]:
        """Decode x from u by block-Jacobi fixed-point iteration. -> (x (B, N, D) fp32, network sweeps).

        Tokens are split into chunks of ``chunk`` positions (0: one chunk of all N), decoded in order
        with a preallocated KV cache holding the finished prefix. Within a chunk every position is
        updated in parallel from the current guess, x <- g^{-1}(u) exp(a(x_<n)) + mu(x_<n), until the largest
        change is below ``tol`` (the iteration is exact after at most chunk-length sweeps, since the
        map is triangular). A chunk still moving after ``max_iters`` sweeps (0: the chunk length) is
        finished by the sequential decoder, so the result never depends on convergence.
        """
        us = self._order(u.float())
        B, N, _ = us.shape
        chunk = N if chunk <= 0 else min(chunk, N)
        temb, reach = self._cond(t, T)
        xs = torch.zeros_like(us)
        cache = self.net.new_cache(B, N, us.device)
        iters = 0
        for a in range(0, N, chunk):
            b = min(N, a + chunk)
            cap = (b - a) if max_iters <= 0 else min(max_iters, b - a)
            converged = False
            for sweep in range(cap):
                cache.length = a
                prev = self._read_previous(xs[:, max(a - 1, 0):b - 1], reach)
                if a == 0:
                    prev = torch.cat([self.start.expand(B, 1, -1).to(prev.dtype), prev], dim=1)
                h = self.net.forward_cached(prev + self.pos[a:b] + temb[:, None], cache)
                new = self._untransform(us[:, a:b], self._params(self._head(h)))
                delta = float((new - xs[:, a:b]).abs().max())
                xs[:, a:b] = new
                iters += 1
                # after k sweeps the first k positions are exact, so b - a sweeps are exact for all
                if delta < tol or sweep + 1 == b - a:
                    converged = True
                    break
            if not converged:  # sequential fallback for this chunk; the prefix cache stays valid
                cache.length = a
                for n in range(a, b):
                    self._decode_cached(us, xs, n, temb, cache, reach)
                iters += b - a
                continue
            if b == N:
                break
            cache.length = a
            prev = self._read_previous(xs[:, max(a - 1, 0):b - 1], reach)  # refill the cache with the final chunk
            if a == 0:
                prev = torch.cat([self.start.expand(B, 1, -1).to(prev.dtype), prev], dim=1)
            self.net.forward_cached(prev + self.pos[a:b] + temb[:, None], cache)
        return self._order(xs), iters


class Transporter(nn.Module):
    """f_T(x, t): L alternating-direction affine blocks shared across levels; identity at t = 1.

    With ``cfg.enabled`` False it is the identity everywhere (log-det 0).
    """

    def __init__(self, cfg: TransporterConfig, num_tokens: int, token_dim: int, multi_T: bool = False):
        super().__init__()
        self.enabled = cfg.enabled
        n_blocks = cfg.blocks if cfg.enabled else 0
        splines = n_blocks if cfg.spline_blocks is None else cfg.spline_blocks
        self.blocks = nn.ModuleList(
            AffineARBlock(cfg, num_tokens, token_dim, flip=bool(i % 2), multi_T=multi_T,
                          spline=cfg.transform == "spline" and i < splines) for i in range(n_blocks)
        )

    def forward(self, x: Tensor, t: Tensor, T: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """u = f_T(x, t). x: (B, N, D), t: (B,), T: (B,) trajectory length (multi-T models only)
        -> (u (B, N, D), log|det df_T/dx| (B,)), both fp32."""
        x = x.float()
        logdet = torch.zeros(x.shape[0], device=x.device)
        skip = t >= 1
        if not self.blocks or bool(skip.all()):
            return x, logdet
        # rows at t = 1 are the identity: the blocks run only on the others
        keep = (~skip).nonzero().squeeze(1) if bool(skip.any()) else None
        u, tk, Tk = (x, t, T) if keep is None else (x[keep], t[keep], None if T is None else T[keep])
        ld = torch.zeros_like(tk)
        for block in self.blocks:
            u, ld_block = block(u, tk, Tk)
            ld = ld + ld_block
        if keep is None:
            return u, ld
        return x.index_put((keep,), u), logdet.index_put((keep,), ld)

    def inverse(self, u: Tensor, t: Tensor, T: Tensor | None = None, use_cache: bool = True,
                method: str = "sequential", **jacobi) -> Tensor:
        """x = f_T^{-1}(u, t), decoding each block in reverse block order. u: (B, N, D), t: (B,).

        ``method`` "sequential": token by token (with or without the KV cache); "jacobi": block-Jacobi
        iteration (keyword options ``chunk``, ``tol``, ``max_iters``: see ``AffineARBlock.inverse_jacobi``).
        """
        x, _ = self.inverse_with_stats(u, t, T, use_cache=use_cache, method=method, **jacobi)
        return x

    def inverse_with_stats(self, u: Tensor, t: Tensor, T: Tensor | None = None, use_cache: bool = True,
                           method: str = "sequential", **jacobi) -> tuple[Tensor, int]:
        """As :meth:`inverse`, also returning the number of network sweeps (Jacobi iterations, or N
        per block when sequential)."""
        if method not in ("sequential", "jacobi"):
            raise ValueError(f"unknown inverse method '{method}' (use 'sequential' or 'jacobi')")
        u = u.float()
        x = u
        sweeps = 0
        for block in reversed(self.blocks):
            if method == "jacobi":
                x, n = block.inverse_jacobi(x, t, T, **jacobi)
            else:
                x, n = block.inverse(x, t, T, use_cache=use_cache), x.shape[1]
            sweeps += n
        skip = t >= 1
        if skip.any():
            x = torch.where(skip[:, None, None], u, x)
        return x, sweeps
