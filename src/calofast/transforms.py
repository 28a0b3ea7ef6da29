"""Fitted, invertible preprocessing in torch; its constants travel inside the model bundle.

A `Transform` maps physical showers [B, V] (MeV) and incident energies [B] (MeV) to the network's
space [B, 1, L, A, R] and back. Steps (applied in order, inverted in reverse):

* `log1p`:  y = ln(1 + E / scale), scale = the geometry's voxel threshold by default, so that empty
            voxels sit at 0 and every voxel above threshold at >= ln 2, a fixed gap for any E_inc;
* `logit`:  CaloDiffusion's choice: u = E / E_inc, y = logit(alpha + (1 - 2 alpha) u);
* standardisation by one global mean and std (fitted on the training data).

The inverse returns non-negative energies with the geometry's threshold applied. The condition is
ln(E_inc) mapped linearly from the fitted range [E_min, E_max] to [-1, 1].
"""
from __future__ import annotations

import math
from typing import Iterable, Literal

import numpy as np
import torch
from torch import nn

from .geometry import Geometry

__all__ = ["Transform", "fit_transform", "TransformKind"]

TransformKind = Literal["log1p", "logit"]


class Transform(nn.Module):
    """Physical <-> network space for one geometry. Buffers: scale, mean, std, log_e_min, log_e_max."""

    def __init__(self, geometry: Geometry, kind: TransformKind = "log1p", scale: float = 1.0,
                 alpha: float = 1e-6, mean: float = 0.0, std: float = 1.0,
                 e_min: float = 1e3, e_max: float = 1e6):
        super().__init__()
        if kind not in ("log1p", "logit"):
            raise ValueError(f"unknown transform {kind!r} (log1p, logit)")
        if not (std > 0 and scale > 0 and e_max > e_min > 0):
            raise ValueError("transform constants out of range")
        self.geometry, self.kind, self.alpha = geometry, kind, float(alpha)
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float64))
        self.register_buffer("mean", torch.tensor(float(mean), dtype=torch.float64))
        self.register_buffer("std", torch.tensor(float(std), dtype=torch.float64))
        self.register_buffer("log_e_min", torch.tensor(math.log(e_min), dtype=torch.float64))
        self.register_buffer("log_e_max", torch.tensor(math.log(e_max), dtype=torch.float64))

    # ---------------------------------------------------------------- serialisation
    def spec(self) -> dict:
        return {"kind": self.kind, "alpha": self.alpha, "geometry": self.geometry.name}

    def constants(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in ("scale", "mean", "std", "log_e_min", "log_e_max")}

    @classmethod
    def from_constants(cls, geometry: Geometry, spec: dict, c: dict) -> "Transform":
        return cls(geometry, spec["kind"], c["scale"], spec["alpha"], c["mean"], c["std"],
                   math.exp(c["log_e_min"]), math.exp(c["log_e_max"]))

    @property
    def event_shape(self) -> tuple[int, int, int, int]:
        return (1, *self.geometry.grid_shape)

    @property
    def energy_range(self) -> tuple[float, float]:
        return math.exp(float(self.log_e_min)), math.exp(float(self.log_e_max))

    # ---------------------------------------------------------------- maps
    def condition(self, energies: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Incident energies [B] MeV -> cond [B, 1] in [-1, 1] over the fitted range (computed in dtype)."""
        le = torch.log(energies.to(dtype).reshape(-1))
        lo, hi = self.log_e_min.to(dtype), self.log_e_max.to(dtype)
        c = 2 * (le - lo) / (hi - lo) - 1
        return c.float()[:, None]

    def energies(self, cond: torch.Tensor) -> torch.Tensor:
        """Inverse of `condition`: cond [B, 1] -> incident energies [B] MeV."""
        le = (cond.double().reshape(-1) + 1) / 2 * (self.log_e_max - self.log_e_min) + self.log_e_min
        return torch.exp(le)

    def _pre(self, showers: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        e = showers.double().clamp_min(0)
        if self.kind == "log1p":
            return torch.log1p(e / self.scale)
        u = (e / energies.double().reshape(-1, 1)).clamp(0, 1)
        p = self.alpha + (1 - 2 * self.alpha) * u
        return torch.log(p) - torch.log1p(-p)

    def forward(self, showers: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """[B, V] MeV -> [B, 1, L, A, R] float32 network input."""
        y = (self._pre(showers, energies) - self.mean) / self.std
        return self.geometry.to_grid(y.float())

    def inverse(self, x: torch.Tensor, energies: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """[B, 1, L, A, R] -> [B, V] MeV, non-negative, voxels below the threshold set to 0.

        Computed in `dtype` (float64 by default; the ONNX export uses float32)."""
        y = self.geometry.to_flat(x).to(dtype) * self.std.to(dtype) + self.mean.to(dtype)
        if self.kind == "log1p":
            # exp - 1 rather than expm1 (no ONNX op): exact enough, values that lose digits sit below the
            # threshold (y < ln 2) and become 0. The clamp keeps a diverged sample finite.
            e = (torch.exp(y.clamp(max=60.0)) - 1) * self.scale.to(dtype)
        else:
            u = (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)
            e = u * energies.to(dtype).reshape(-1, 1)
        e = e.clamp_min(0)
        return torch.where(e < self.geometry.threshold_mev, torch.zeros_like(e), e).float()


def fit_transform(geometry: Geometry, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                  kind: TransformKind = "log1p", scale: float | None = None, alpha: float = 1e-6) -> Transform:
    """Fit mean/std of the pre-standardisation values and the incident-energy range on data batches."""
    t = Transform(geometry, kind, scale or geometry.threshold_mev or 1.0, alpha)
    n, s1, s2, e_lo, e_hi = 0, 0.0, 0.0, math.inf, 0.0
    for energies, showers in batches:
        y = t._pre(torch.as_tensor(showers), torch.as_tensor(energies))
        n += y.numel()
        s1 += float(y.sum())
        s2 += float((y * y).sum())
        e_lo, e_hi = min(e_lo, float(np.min(energies))), max(e_hi, float(np.max(energies)))
    if n == 0:
        raise ValueError("cannot fit a transform on no data")
    mean = s1 / n
    std = math.sqrt(max(s2 / n - mean ** 2, 1e-12))
    if e_hi <= e_lo:
        e_lo, e_hi = e_lo / 1.01, e_hi * 1.01      # a single energy: a small range around it
    return Transform(geometry, kind, t.scale.item(), alpha, mean, std, e_lo, e_hi)

