"""Raw networks F(x_in, c_noise, cond) -> tensor over [B, 1, L, A, R]. They know nothing of sigma or losses.

`UNet3D`: a conditional 3-D U-Net on the cylinder grid: circular angular padding, FiLM conditioning on
(noise level, incident energy), stride-2 downsampling, optional self-attention at coarse levels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import AttentionBlock, CylindricalConv3d, PositionalEmbedding, ResBlock, norm, timestep_mlp

__all__ = ["UNet3D", "Embedding"]


class Embedding(nn.Module):
    """Noise-level and condition embedding shared by the backbones: emb = MLP(pos(c_noise)) + MLP(cond)."""

    def __init__(self, emb_dim: int, cond_dim: int):
        super().__init__()
        self.pos = PositionalEmbedding(emb_dim)
        self.noise_mlp = timestep_mlp(emb_dim)
        self.cond_mlp = nn.Sequential(nn.Linear(cond_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, c_noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return F.silu(self.noise_mlp(self.pos(c_noise)) + self.cond_mlp(cond.float()))


class UNet3D(nn.Module):
    """Conditional U-Net.

    Args:
        channels: feature channels per resolution level (level i+1 halves L, A, R, rounding up).
        blocks: residual blocks per level (down path; the up path has the same).
        attention_levels: levels (0 = full resolution) that get self-attention after each block (the
            middle block too if the deepest level is listed).
        heads: attention heads.
        emb_dim: width of the noise/condition embedding.
        cond_dim: length of the condition vector.
        dropout: dropout inside residual blocks.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), blocks: int = 1,
                 attention_levels: tuple[int, ...] = (2,), heads: int = 4, emb_dim: int = 128,
                 cond_dim: int = 1, dropout: float = 0.0):
        super().__init__()
        self.emb = Embedding(emb_dim, cond_dim)
        self.inp = CylindricalConv3d(1, channels[0])
        self.down = nn.ModuleList()
        for i, ch in enumerate(channels):
            level = nn.ModuleList()
            c_in = channels[i - 1] if i else channels[0]
            if i:
                level.append(CylindricalConv3d(c_in, ch, stride=2))
            for _ in range(blocks):
                level.append(ResBlock(ch, ch, emb_dim, dropout))
                if i in attention_levels:
                    level.append(AttentionBlock(ch, heads))
            self.down.append(level)
        top = channels[-1]
        mid_attention = [AttentionBlock(top, heads)] if len(channels) - 1 in attention_levels else []
        self.mid = nn.ModuleList([ResBlock(top, top, emb_dim, dropout), *mid_attention,
                                  ResBlock(top, top, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for i in reversed(range(len(channels) - 1)):
            level = nn.ModuleList([nn.Conv3d(channels[i + 1], channels[i], 1)])
            for b in range(blocks):
                level.append(ResBlock(2 * channels[i] if b == 0 else channels[i], channels[i], emb_dim, dropout))
                if i in attention_levels:
                    level.append(AttentionBlock(channels[i], heads))
            self.up.append(level)
        self.out_norm = norm(channels[0])
        self.out = CylindricalConv3d(channels[0], 1)
        nn.init.zeros_(self.out.conv.weight)
        nn.init.zeros_(self.out.conv.bias)

    @staticmethod
    def _run(layers, h, emb):
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb = self.emb(c_noise, cond)
        h = self.inp(x)
        skips = []
        for level in self.down:
            h = self._run(level, h, emb)
            skips.append(h)
        skips.pop()                      # the deepest level feeds the middle block directly
        h = self._run(self.mid, h, emb)
        for level in self.up:
            skip = skips.pop()
            h = F.interpolate(level[0](h), size=skip.shape[2:], mode="nearest")
            h = self._run(level[1:], torch.cat([h, skip], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))
