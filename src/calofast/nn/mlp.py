"""Residual MLP backbone F(x_in, c_noise, cond) for vector data, e.g. the energy stage's [B, L] code.

Pre-norm residual blocks LayerNorm -> adaLN modulation (scale, shift, gate from the noise/condition
embedding, zero-initialised as in DiT's adaLN-Zero) -> Linear -> SiLU -> Linear.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Embedding

__all__ = ["ResMLP"]


class _Block(nn.Module):
    def __init__(self, width: int, hidden: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.ada = nn.Linear(emb_dim, 3 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift, gate = self.ada(emb).chunk(3, dim=1)
        return h + gate * self.fc2(F.silu(self.fc1(self.norm(h) * (1 + scale) + shift)))


class ResMLP(nn.Module):
    """Residual MLP.

    Args:
        shape: event shape (flattened to D = prod(shape) inputs and outputs).
        width: hidden width of the residual stream.
        depth: number of residual blocks.
        emb_dim: width of the noise/condition embedding.
        cond_dim: length of the condition vector.
        mlp_ratio: inner width of each block as a multiple of `width`.
    """

    def __init__(self, shape: tuple[int, ...], width: int = 256, depth: int = 4, emb_dim: int = 128,
                 cond_dim: int = 1, mlp_ratio: float = 2.0):
        super().__init__()
        self.shape = tuple(shape)
        dim = math.prod(self.shape)
        self.emb = Embedding(emb_dim, cond_dim)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList([_Block(width, int(width * mlp_ratio), emb_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb = self.emb(c_noise, cond)
        h = self.inp(x.reshape(x.shape[0], -1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(self.norm(h)).reshape(x.shape)
