"""Raw networks F(x_in, c_noise, cond): the U-Net, the patch transformer and the residual MLP."""
from __future__ import annotations

from torch import nn

from ..config import NetworkConfig
from ..geometry import Geometry
from .mlp import ResMLP
from .transformer import Transformer3D
from .unet import UNet3D

__all__ = ["build_network", "UNet3D", "Transformer3D", "ResMLP"]


def build_network(cfg: NetworkConfig, geometry: Geometry, cond_dim: int = 1,
                  event_shape: tuple[int, ...] | None = None) -> nn.Module:
    """The raw network of one stage; `event_shape` defaults to the geometry's grid [1, L, A, R]."""
    if cfg.arch == "mlp":
        return ResMLP(event_shape or (geometry.n_voxels,), cfg.width, cfg.depth, cfg.emb_dim, cond_dim)
    if event_shape is not None and tuple(event_shape) != (1, *geometry.grid_shape):
        raise ValueError(f"a {cfg.arch} network needs the grid event shape, not {event_shape}")
    if cfg.arch == "unet":
        return UNet3D(cfg.channels, cfg.blocks, cfg.attention_levels, cfg.heads, cfg.emb_dim, cond_dim, cfg.dropout)
    if cfg.arch == "transformer":
        return Transformer3D(geometry.grid_shape, cfg.patch, cfg.width, cfg.depth, cfg.heads, cfg.emb_dim, cond_dim,
                             cfg.layer_cond, cfg.mlp_hidden)
    raise ValueError(f"unknown network architecture {cfg.arch!r}")
