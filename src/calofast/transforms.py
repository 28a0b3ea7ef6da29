"""Fitted, invertible preprocessing in torch; its constants travel inside the model bundle.

A transform maps physical showers [B, V] (MeV) and incident energies [B] (MeV) to the network space of
each of its stages and back. Two kinds share one interface (`ShowerTransform`):

* `Transform`, one stage ("shower", [B, 1, L, A, R]), with the steps (inverted in reverse)
  - `log1p`: y = ln(1 + E / scale), scale = the geometry's voxel threshold by default, so that empty
    voxels sit at 0 and every voxel above threshold at >= ln 2, a fixed gap for any E_inc;
  - `logit`: CaloDiffusion's choice: u = E / E_inc, y = logit(alpha + (1 - 2 alpha) u);
  then standardisation by one global mean and std, or one per voxel (fitted on the training data).
* `FactorisedTransform` (`factorised.py`), two stages: layer energies, then layer-normalised voxels.

The condition of the first stage is ln(E_inc) mapped linearly from the fitted range [E_min, E_max] to
[-1, 1]. Every decoded shower is finite, non-negative, thresholded, and holds at most
MAX_RESPONSE x E_inc in total; `decode` also returns which showers had to be clipped to get there.
"""
from __future__ import annotations

import math
from typing import Iterable, Literal

import numpy as np
import torch
from torch import nn

from .geometry import Geometry

__all__ = ["ShowerTransform", "Transform", "fit_transform", "transform_from_spec", "TransformKind",
           "MAX_RESPONSE", "bound_showers", "logit", "drop_below", "Moments"]

TransformKind = Literal["log1p", "logit", "layer"]
Standardise = Literal["global", "voxel"]
# The most energy a shower may hold, in units of its incident energy (GFlash DS2: E_tot/E_inc <= 1.31 in
# 300,000 showers). A generated shower above it is scaled down to it and counted as clipped.
MAX_RESPONSE = 2.0


def logit(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """logit(alpha + (1 - 2 alpha) u): u in [0, 1] to a finite code (0 -> logit(alpha))."""
    p = alpha + (1 - 2 * alpha) * u
    return torch.log(p) - torch.log1p(-p)


def drop_below(e: torch.Tensor, threshold: float) -> torch.Tensor:
    """Energies under the threshold set to 0 (the CaloChallenge voxel cut)."""
    return torch.where(e < threshold, torch.zeros_like(e), e)


def bound_showers(e: torch.Tensor, energies: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip showers [B, V] to finite, non-negative values with E_tot <= MAX_RESPONSE E_inc, then threshold.

    Returns (showers, clipped [B] bool): clipped marks showers with a non-finite voxel or too much energy."""
    finite = torch.isfinite(e)
    e = torch.where(finite, e, torch.zeros_like(e)).clamp_min(0)
    bound = MAX_RESPONSE * energies.to(e.dtype).reshape(-1)
    total = e.sum(dim=1)
    clipped = ~finite.all(dim=1) | (total > bound)
    e = e * torch.where(total > bound, bound / total.clamp_min(1e-30), torch.ones_like(total))[:, None]
    return drop_below(e, threshold), clipped


class ShowerTransform(nn.Module):
    """What every transform shares: the geometry, the incident-energy condition and the stage interface.

    Subclasses define `stages` (names in sampling order), `stage_shapes`, `cond_dims`, `encode`,
    `stage_condition` (k > 0) and `decode`, and register their fitted constants as float64 buffers."""

    stages: tuple[str, ...] = ()

    def __init__(self, geometry: Geometry, e_min: float, e_max: float):
        super().__init__()
        if not (math.isfinite(e_min) and math.isfinite(e_max) and e_max > e_min > 0):
            raise ValueError(f"incident-energy range {e_min}-{e_max} MeV is not a valid range")
        self.geometry = geometry
        self.register_buffer("log_e_min", torch.tensor(math.log(e_min), dtype=torch.float64))
        self.register_buffer("log_e_max", torch.tensor(math.log(e_max), dtype=torch.float64))

    def constants(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.named_buffers()}

    @property
    def energy_range(self) -> tuple[float, float]:
        return math.exp(float(self.log_e_min)), math.exp(float(self.log_e_max))

    @property
    def event_shape(self) -> tuple[int, ...]:
        """Event shape of the last (main) stage."""
        return self.stage_shapes[-1]

    def condition(self, energies: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Incident energies [B] MeV -> cond [B, 1] in [-1, 1] over the fitted range (computed in dtype)."""
        le = torch.log(energies.to(dtype).reshape(-1))
        lo, hi = self.log_e_min.to(dtype), self.log_e_max.to(dtype)
        c = 2 * (le - lo) / (hi - lo) - 1
        return c.float()[:, None]

    def energies(self, cond: torch.Tensor) -> torch.Tensor:
        """Inverse of `condition`: cond [B, 1] -> incident energies [B] MeV."""
        le = (cond.double()[:, 0] + 1) / 2 * (self.log_e_max - self.log_e_min) + self.log_e_min
        return torch.exp(le)

    def conditions(self, energies: torch.Tensor, xs: list[torch.Tensor],
                   dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
        """The condition of every stage, stage k from the stages before it (training: the encoded data)."""
        return [self.stage_condition(k, energies, xs[:k], dtype) for k in range(len(self.stages))]

    def dequantised(self, x: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The training codes of a stage with the transform's data noise (none here; see `FactorisedTransform`)."""
        return x

    def stage_condition(self, k: int, energies: torch.Tensor, previous: list[torch.Tensor],
                        dtype: torch.dtype = torch.float64) -> torch.Tensor:
        if k == 0:
            return self.condition(energies, dtype)
        raise ValueError(f"{type(self).__name__} has no stage {k}")


class Transform(ShowerTransform):
    """One stage: physical showers <-> [B, 1, L, A, R]. Buffers: scale, mean, std ([] or [V]), energy range."""

    stages = ("shower",)

    def __init__(self, geometry: Geometry, kind: TransformKind = "log1p", scale: float = 1.0,
                 alpha: float = 1e-6, mean: "float | torch.Tensor" = 0.0, std: "float | torch.Tensor" = 1.0,
                 e_min: float = 1e3, e_max: float = 1e6):
        super().__init__(geometry, e_min, e_max)
        if kind not in ("log1p", "logit"):
            raise ValueError(f"unknown transform {kind!r} (log1p, logit, layer)")
        mean, std = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64)
        if not (scale > 0 and 0 < alpha < 0.5 and bool(torch.all(std > 0)) and bool(torch.isfinite(mean).all())
                and mean.shape == std.shape and (mean.ndim == 0 or tuple(mean.shape) == (geometry.n_voxels,))):
            raise ValueError("transform constants out of range")
        self.kind, self.alpha = kind, float(alpha)
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float64))
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def spec(self) -> dict:
        return {"kind": self.kind, "alpha": self.alpha, "geometry": self.geometry.name}

    @classmethod
    def from_constants(cls, geometry: Geometry, spec: dict, c: dict) -> "Transform":
        return cls(geometry, spec["kind"], float(c["scale"]), spec["alpha"], c["mean"], c["std"],
                   math.exp(float(c["log_e_min"])), math.exp(float(c["log_e_max"])))

    @property
    def stage_shapes(self) -> tuple[tuple[int, ...]]:
        return ((1, *self.geometry.grid_shape),)

    @property
    def cond_dims(self) -> tuple[int]:
        return (1,)

    def _pre(self, showers: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        e = showers.double().clamp_min(0)
        if self.kind == "log1p":
            return torch.log1p(e / self.scale)
        return logit((e / energies.double().reshape(-1, 1)).clamp(0, 1), self.alpha)

    def encode(self, showers: torch.Tensor, energies: torch.Tensor) -> list[torch.Tensor]:
        """[B, V] MeV -> [[B, 1, L, A, R]] float32 network input."""
        y = (self._pre(showers, energies) - self.mean) / self.std
        return [self.geometry.to_grid(y.float())]

    def decode(self, xs: list[torch.Tensor], energies: torch.Tensor,
               dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """[[B, 1, L, A, R]] -> (showers [B, V] MeV float32, clipped [B] bool); see `bound_showers`.

        Computed in `dtype` (float64 by default; the ONNX export uses float32)."""
        y = self.geometry.to_flat(xs[0]).to(dtype) * self.std.to(dtype) + self.mean.to(dtype)
        energies = energies.to(dtype).reshape(-1, 1)
        if self.kind == "log1p":
            # exp - 1 rather than expm1 (no ONNX op): exact enough, values that lose digits sit below the
            # threshold (y < ln 2) and become 0. The clamp keeps exp finite; bound_showers does the rest.
            e = (torch.exp(y.clamp(max=60.0)) - 1) * self.scale.to(dtype)
        else:
            u = (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)
            e = u * energies
        e, clipped = bound_showers(e, energies, self.geometry.threshold_mev)
        return e.float(), clipped


class Moments:
    """Running sums for means and standard deviations per position (float64)."""

    def __init__(self):
        self.n, self.s1, self.s2 = 0, 0.0, 0.0

    def add(self, y: torch.Tensor, per_position: bool) -> None:
        y = y.double()
        if per_position:
            self.n += y.shape[0]
            self.s1, self.s2 = self.s1 + y.sum(0), self.s2 + (y * y).sum(0)
        else:
            self.n += y.numel()
            self.s1, self.s2 = self.s1 + y.sum(), self.s2 + (y * y).sum()

    def result(self, min_std: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n == 0:
            raise ValueError("cannot fit a transform on no data")
        mean = torch.as_tensor(self.s1 / self.n, dtype=torch.float64)
        var = torch.as_tensor(self.s2 / self.n, dtype=torch.float64) - mean ** 2
        return mean, var.clamp_min(0).sqrt().clamp_min(min_std)


def _energy_range(batches: Iterable[tuple[np.ndarray, np.ndarray]]):
    """Pass the batches through while recording the incident-energy range."""
    lo, hi = [math.inf], [0.0]

    def gen():
        for energies, showers in batches:
            lo[0], hi[0] = min(lo[0], float(np.min(energies))), max(hi[0], float(np.max(energies)))
            yield torch.as_tensor(energies, dtype=torch.float64), torch.as_tensor(showers, dtype=torch.float64)

    def result() -> tuple[float, float]:
        if hi[0] <= lo[0]:
            return lo[0] / 1.01, hi[0] * 1.01      # a single energy: a small range around it
        return lo[0], hi[0]
    return gen(), result


def fit_transform(geometry: Geometry, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                  kind: TransformKind = "log1p", scale: float | None = None, alpha: float = 1e-6,
                  standardise: Standardise = "global", dequantise: bool = False) -> ShowerTransform:
    """Fit the standardisation and the incident-energy range on (energies [b], showers [b, V]) batches;
    `dequantise` (layer kind only) is recorded in the factorised transform (`FactorisedTransform.dequantised`)."""
    if standardise not in ("global", "voxel"):
        raise ValueError(f"unknown standardisation {standardise!r} (global, voxel)")
    stream, e_range = _energy_range(batches)
    if kind == "layer":
        from .factorised import fit_factorised
        return fit_factorised(geometry, stream, e_range, alpha, standardise, dequantise)
    if dequantise:
        raise ValueError("dequantise needs the layer (factorised) transform")
    t = Transform(geometry, kind, scale or geometry.threshold_mev or 1.0, alpha)
    moments = Moments()
    for energies, showers in stream:
        moments.add(t._pre(showers, energies), standardise == "voxel")
    mean, std = moments.result()
    return Transform(geometry, kind, t.scale.item(), alpha, mean, std, *e_range())


def transform_from_spec(geometry: Geometry, spec: dict, constants: dict[str, torch.Tensor]) -> ShowerTransform:
    """Rebuild a fitted transform from its spec (bundle metadata) and constants (bundle tensors)."""
    if spec.get("kind") == "layer":
        from .factorised import FactorisedTransform
        return FactorisedTransform.from_constants(geometry, spec, constants)
    return Transform.from_constants(geometry, spec, constants)
