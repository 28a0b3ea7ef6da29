"""Raw networks F(x_in, c_noise, cond): the U-Net and the patch transformer."""
from __future__ import annotations

from torch import nn

from ..config import NetworkConfig
from ..geometry import Geometry
from .transformer import Transformer3D
from .unet import UNet3D

__all__ = ["build_network", "UNet3D", "Transformer3D"]


def build_network(cfg: NetworkConfig, geometry: Geometry, cond_dim: int = 1) -> nn.Module:
    if cfg.arch == "unet":
        return UNet3D(cfg.channels, cfg.blocks, cfg.attention_levels, cfg.heads, cfg.emb_dim, cond_dim, cfg.dropout)
    if cfg.arch == "transformer":
        return Transformer3D(geometry.grid_shape, cfg.patch, cfg.width, cfg.depth, cfg.heads, cfg.emb_dim, cond_dim)
    raise ValueError(f"unknown network architecture {cfg.arch!r}")
