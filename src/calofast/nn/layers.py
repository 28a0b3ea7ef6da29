"""Geometry-aware building blocks for networks over [B, C, L, A, R] cylinder grids.

The angular axis A closes on itself, so convolutions pad it circularly (by concatenation, which
exports cleanly to ONNX); layer (L) and radial (R) axes are zero-padded. Attention goes through
`scaled_dot_product_attention` so FlashAttention / memory-efficient kernels run on GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CylindricalConv3d", "PositionalEmbedding", "ResBlock", "AttentionBlock", "norm", "timestep_mlp",
           "count_parameters"]


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, max(1, channels // 4)), channels, eps=1e-5)


class CylindricalConv3d(nn.Module):
    """3-D convolution, circular in the angular axis (dim 3), zero padding elsewhere ('same' size at stride 1)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel // 2
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=(self.pad, 0, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad
        if p:
            x = torch.cat([x[:, :, :, -p:], x, x[:, :, :, :p]], dim=3)
        return self.conv(x)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per event (EDM `PositionalEmbedding`)."""

    def __init__(self, dim: int, max_positions: int = 10_000):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", (1.0 / max_positions) ** (torch.arange(half) / half), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arg = x.float()[:, None] * self.freqs[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, FiLM from the embedding, GroupNorm-SiLU-dropout-conv, residual."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), CylindricalConv3d(c_in, c_out)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = norm(c_out), CylindricalConv3d(c_out, c_out)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.conv.weight)
        nn.init.zeros_(self.conv2.conv.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all cells of a (coarse) grid, through SDPA."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        tokens = self.norm(x).flatten(2).transpose(1, 2)                        # [B, N, C]
        q, k, v = self.qkv(tokens).reshape(B, -1, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)                             # [B, heads, N, C/heads]
        h = self.proj(h.transpose(1, 2).reshape(B, -1, C))
        return x + h.transpose(1, 2).reshape(x.shape)


def timestep_mlp(emb_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
