"""Noise schedules as pure sigma grids (VE / sigma-space, spec `samplers.md` section 4).

* `vp_sigmas(kind, T)`: the discrete VP tables of improved-diffusion (linear, cosine) as sigma_i =
  sqrt((1 - abar_i) / abar_i), increasing in i.
* `karras`, `exponential`: continuous grids from sigma_max down to sigma_min, with a final 0 appended.
* `table_grid`: a subset of a discrete table chosen by the diffusers spacing rules (leading, trailing,
  linspace), in decreasing order, followed by 0 (the step after the smallest kept t goes to abar = 1).

All grids are float64 tensors; samplers cast them where they run.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

__all__ = ["vp_betas", "vp_sigmas", "karras", "exponential", "table_indices", "table_grid",
           "karras_consistency", "Spacing", "SIGMA_MAX_CAP"]

Spacing = Literal["leading", "trailing", "linspace"]
# Continuous grids on a discrete VP model start at min(table max, SIGMA_MAX_CAP sigma_data): the cosine
# table's last entries (sigma up to 8116) would waste steps far above the data scale (spec 4.1).
SIGMA_MAX_CAP = 160.0


def vp_betas(kind: Literal["linear", "cosine"], T: int) -> np.ndarray:
    """beta_i, i = 0..T-1 (openai/improved-diffusion `get_named_beta_schedule`)."""
    if T < 2:
        raise ValueError(f"a discrete schedule needs T >= 2, got {T}")
    if kind == "linear":
        scale = 1000.0 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if kind == "cosine":
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=np.float64)
    raise ValueError(f"unknown VP schedule {kind!r} (linear, cosine)")


def vp_sigmas(kind: Literal["linear", "cosine"], T: int) -> np.ndarray:
    """sigma_i = sqrt((1 - abar_i)/abar_i) of the discrete table, increasing in i."""
    abar = np.cumprod(1.0 - vp_betas(kind, T))
    return np.sqrt((1.0 - abar) / abar)


def _append_zero(s: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.concatenate([s, [0.0]]), dtype=torch.float64)


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: n sigmas from sigma_max to sigma_min, then 0 (n steps)."""
    if n < 1:
        raise ValueError("need at least one step")
    ramp = np.linspace(0, 1, n) if n > 1 else np.zeros(1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def karras_consistency(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The n-point Karras grid without the final 0 (consistency models end at sigma_min)."""
    return karras(n, sigma_min, sigma_max, rho)[:-1]


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Log-uniform sigmas from sigma_max to sigma_min, then 0."""
    return _append_zero(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)))


def table_indices(T: int, n: int, spacing: Spacing = "trailing") -> np.ndarray:
    """n table indices in decreasing order (diffusers spacings; Lin et al. 2023, Table 2)."""
    if not 1 <= n <= T:
        raise ValueError(f"cannot take {n} steps from a table of {T}")
    if spacing == "leading":
        idx = np.arange(n) * (T // n)
    elif spacing == "trailing":
        idx = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    elif spacing == "linspace":
        idx = np.round(np.linspace(0, T - 1, n)).astype(np.int64)
    else:
        raise ValueError(f"unknown spacing {spacing!r} (leading, trailing, linspace)")
    idx = np.unique(idx)[::-1]
    if len(idx) != n:
        raise ValueError(f"{spacing} spacing gives repeated indices for {n} of {T} steps")
    return idx


def table_grid(table: np.ndarray, n: int, spacing: Spacing = "trailing") -> torch.Tensor:
    """Decreasing sigmas of n table entries, then 0: the grid of DDIM / strided DDPM on a VP table."""
    return _append_zero(np.asarray(table, np.float64)[table_indices(len(table), n, spacing)])
