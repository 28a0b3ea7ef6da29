"""Transformer backbone F(x_in, c_noise, cond) over patches of the cylinder grid (DiT-style, adaLN-Zero).

Patches of (pl, pa, pr) cells become tokens (the grid is zero-padded up to a multiple of the patch).
Positions are a learned 3-D embedding, the sum of one table per axis (layer, angle, radius). Each block
modulates LayerNorm by the noise/condition embedding (Peebles & Xie, arXiv:2212.09748) and attends through
`scaled_dot_product_attention` (FlashAttention / cuDNN kernels on GPU in bf16).

With `layer_cond`, the last L entries of `cond` are per-layer values (the factorised shape stage's layer
energies): each token also gets a linear embedding of the values of its own pl layers, so a token knows
how much energy its layers hold; the whole vector still enters the global embedding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Embedding

__all__ = ["Transformer3D"]


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, emb_dim: int, mlp_hidden: int = 0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = mlp_hidden or 4 * width
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Linear(emb_dim, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def _attention(self, h: torch.Tensor) -> torch.Tensor:
        B, N, C = h.shape
        q, k, v = self.qkv(h).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, tome: float = 0.0) -> torch.Tensor:
        """`tome` > 0: token merging (`calofast.tome`) of that fraction of the tokens around attention and MLP."""
        s1, b1, g1, s2, b2, g2 = self.ada(emb)[:, None, :].chunk(6, dim=2)
        h = self.norm1(x) * (1 + s1) + b1
        if tome > 0:
            from ..tome import bipartite_merge
            merge, unmerge = bipartite_merge(h, int(tome * h.shape[1]))
            x = x + g1 * unmerge(self._attention(merge(h)))
            return x + g2 * unmerge(self.mlp(merge(self.norm2(x) * (1 + s2) + b2)))
        x = x + g1 * self._attention(h)
        return x + g2 * self.mlp(self.norm2(x) * (1 + s2) + b2)


class Transformer3D(nn.Module):
    """Patch transformer.

    Args:
        grid: (L, A, R) of the geometry.
        patch: cells per token along (L, A, R).
        width: token width.
        depth: number of transformer blocks.
        heads: attention heads.
        emb_dim: width of the noise/condition embedding.
        cond_dim: length of the condition vector.
        layer_cond: each token also embeds the per-layer values (the last L entries of cond) of its layers.
        mlp_hidden: hidden width of each block's MLP (0: 4 x width; a pruned network has fewer).
    """

    def __init__(self, grid: tuple[int, int, int], patch: tuple[int, int, int] = (3, 4, 3), width: int = 192,
                 depth: int = 6, heads: int = 6, emb_dim: int = 192, cond_dim: int = 1, layer_cond: bool = False,
                 mlp_hidden: int = 0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} does not split into {heads} heads")
        if layer_cond and cond_dim < grid[0]:
            raise ValueError(f"layer conditioning needs {grid[0]} per-layer condition entries, cond has {cond_dim}")
        self.grid, self.patch, self.layer_cond = tuple(grid), tuple(patch), layer_cond
        self.padded = tuple(math.ceil(g / p) * p for g, p in zip(grid, patch))
        self.tokens = tuple(g // p for g, p in zip(self.padded, patch))
        p_vol = math.prod(patch)
        self.emb = Embedding(emb_dim, cond_dim)
        self.embed = nn.Linear(p_vol, width)
        self.pos = nn.ParameterList([nn.Parameter(torch.randn(n, width) * 0.02) for n in self.tokens])
        self.layer_embed = nn.Linear(patch[0], width) if layer_cond else None
        self.blocks = nn.ModuleList([_Block(width, heads, emb_dim, mlp_hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(emb_dim, 2 * width)
        self.head = nn.Linear(width, p_vol)
        self.tome = 0.0                 # token-merging ratio at inference (`calofast.tome`); not part of the weights
        for layer in (self.ada, self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        (L, A, R), (pl, pa, pr), (tl, ta, tr) = self.padded, self.patch, self.tokens
        x = F.pad(x, (0, R - self.grid[2], 0, A - self.grid[1], 0, L - self.grid[0]))
        x = x.reshape(x.shape[0], tl, pl, ta, pa, tr, pr).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(x.shape[0], tl * ta * tr, pl * pa * pr)

    def _unpatchify(self, t: torch.Tensor) -> torch.Tensor:
        (pl, pa, pr), (tl, ta, tr) = self.patch, self.tokens
        x = t.reshape(t.shape[0], tl, ta, tr, pl, pa, pr).permute(0, 1, 4, 2, 5, 3, 6)
        x = x.reshape(t.shape[0], 1, tl * pl, ta * pa, tr * pr)
        return x[:, :, : self.grid[0], : self.grid[1], : self.grid[2]]

    def _positions(self) -> torch.Tensor:
        pl, pa, pr = self.pos
        return (pl[:, None, None] + pa[None, :, None] + pr[None, None, :]).reshape(-1, pl.shape[1])

    def _layer_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """[B, N, width]: each token's embedding of the per-layer values of its layers."""
        L, (tl, ta, tr) = self.grid[0], self.tokens
        values = F.pad(cond[:, -L:].float(), (0, self.padded[0] - L)).reshape(-1, tl, self.patch[0])
        h = self.layer_embed(values)                                          # [B, tl, width]
        return h[:, :, None, None].expand(-1, tl, ta, tr, -1).reshape(h.shape[0], tl * ta * tr, -1)

    def stem(self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, N, width], embedding [B, emb_dim]) before the first block."""
        emb = self.emb(c_noise, cond)
        h = self.embed(self._patchify(x)) + self._positions()
        if self.layer_embed is not None:
            h = h + self._layer_tokens(cond)
        return h, emb

    def blocks_range(self, h: torch.Tensor, emb: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for block in self.blocks[start:stop]:
            h = block(h, emb, self.tome)
        return h

    def output(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block -> F [B, 1, L, A, R]."""
        shift, scale = self.ada(emb)[:, None, :].chunk(2, dim=2)
        return self._unpatchify(self.head(self.norm(h) * (1 + scale) + shift))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h, emb = self.stem(x, c_noise, cond)
        return self.output(self.blocks_range(h, emb, 0, len(self.blocks)), emb)
