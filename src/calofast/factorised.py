"""Energy/shape factorisation (CaloScore v2, CaloDREAM, iCaloFlow): two stages behind one transform.

* Stage "energy", [B, L]: how the shower's energy splits over the L layers, as sequential fractions
  u_tot = E_tot / (MAX_RESPONSE E_inc) and u_i = E_i / (E_i + ... + E_{L-1}) for i < L - 1 (the last
  layer takes the rest), each mapped by logit(alpha + (1 - 2 alpha) u) and standardised per entry.
  Its condition is the incident-energy condition [B, 1]. Any code decodes to layer energies >= 0 that
  sum to at most MAX_RESPONSE E_inc: the bound holds by construction.
* Stage "shape", [B, 1, L, A, R]: every voxel divided by its layer's energy, the same logit, standardised
  per voxel (or globally). Its condition [B, 1 + L] is the incident-energy condition followed by the
  standardised log10(E_l / E_inc + 1e-8) of each layer, taken from the energy stage.

Decoding a shape code: fractions sigmoid(y) - alpha (a layer whose voxels all sit at the floor shares
its energy by sigmoid(y) instead), normalised per layer; voxels under the threshold are dropped, the
layer's largest voxel is always kept, and the layer is renormalised, so every layer keeps exactly the
energy the energy stage gave it (layers under one threshold's worth are empty, as in the data).

With `dequantise`, training replaces the code of every empty voxel of a non-empty layer by a value drawn
uniformly between the empty code, logit(alpha), and the code of a voxel at the threshold, logit(thr / E_l):
the spike at logit(alpha) becomes a continuous density that meets the real voxels' at their lower edge.
Decoding then drops a voxel when its un-normalised energy E_l (sigmoid(y) - alpha) is under the threshold,
so every code in that band decodes to an empty voxel.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from .geometry import Geometry
from .transforms import MAX_RESPONSE, Moments, ShowerTransform, drop_below, logit

__all__ = ["FactorisedTransform", "fit_factorised"]

LAYER_FLOOR = 1e-8          # log10(E_l / E_inc + LAYER_FLOOR) in the shape condition: empty layers at -8
VOXEL_MIN_STD = 1.0         # per-voxel std floor (logit units): a rarely hit voxel must not blow up to 1e3


def _unlogit(y: torch.Tensor, alpha: float) -> torch.Tensor:
    return ((torch.sigmoid(y) - alpha) / (1 - 2 * alpha)).clamp(0, 1)


def energy_fractions(layer_e: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
    """[B, L] layer energies, [B] E_inc -> [B, L] (u_tot, u_0 ... u_{L-2}) in [0, 1]."""
    rest = torch.flip(torch.cumsum(torch.flip(layer_e, [1]), 1), [1])           # rest_i = E_i + ... + E_{L-1}
    u = torch.where(rest[:, :-1] > 0, layer_e[:, :-1] / rest[:, :-1].clamp_min(1e-300), torch.zeros_like(rest[:, :-1]))
    u_tot = rest[:, 0] / (MAX_RESPONSE * energies.reshape(-1))
    return torch.cat([u_tot[:, None], u], 1).clamp(0, 1)


def layer_energies(u: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
    """Inverse of `energy_fractions`: E_i = E_tot prod_{j<i} (1 - u_j) u_i, the last layer takes the rest."""
    total = u[:, 0] * MAX_RESPONSE * energies.reshape(-1).to(u.dtype)
    f = u[:, 1:]
    # prod as exp(cumsum(log)): ONNX has CumSum but no CumProd. log(0) = -inf only makes later layers 0.
    kept = torch.exp(torch.cumsum(torch.log((1 - f).clamp_min(1e-30)), 1))
    rest = total[:, None] * torch.cat([torch.ones_like(total)[:, None], kept], 1)
    return rest * torch.cat([f, torch.ones_like(total)[:, None]], 1)


class FactorisedTransform(ShowerTransform):
    """Two stages (energy [B, L], shape [B, 1, L, A, R]); buffers e_*, c_*, v_* and the energy range."""

    stages = ("energy", "shape")

    def __init__(self, geometry: Geometry, alpha: float, e_mean, e_std, c_mean, c_std, v_mean, v_std,
                 e_min: float, e_max: float, dequantise: bool = False):
        super().__init__(geometry, e_min, e_max)
        L, A, R = geometry.grid_shape
        if not 0 < alpha < 0.5:
            raise ValueError(f"logit alpha {alpha} must be in (0, 0.5)")
        self.alpha, self.dequantise = float(alpha), bool(dequantise)
        for name, value, shapes in (("e_mean", e_mean, [(L,)]), ("e_std", e_std, [(L,)]), ("c_mean", c_mean, [(L,)]),
                                    ("c_std", c_std, [(L,)]), ("v_mean", v_mean, [(), (L * A * R,)]),
                                    ("v_std", v_std, [(), (L * A * R,)])):
            t = torch.as_tensor(value, dtype=torch.float64).clone()
            if tuple(t.shape) not in shapes or not bool(torch.isfinite(t).all()) or \
                    (name.endswith("std") and not bool((t > 0).all())):
                raise ValueError(f"transform constant {name} has the wrong shape or values")
            self.register_buffer(name, t)

    def spec(self) -> dict:
        return {"kind": "layer", "alpha": self.alpha, "geometry": self.geometry.name, "dequantise": self.dequantise}

    @classmethod
    def from_constants(cls, geometry: Geometry, spec: dict, c: dict) -> "FactorisedTransform":
        return cls(geometry, spec["alpha"], *(c[k] for k in ("e_mean", "e_std", "c_mean", "c_std", "v_mean", "v_std")),
                   math.exp(float(c["log_e_min"])), math.exp(float(c["log_e_max"])), bool(spec.get("dequantise", False)))

    @property
    def stage_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        L = self.geometry.grid_shape[0]
        return (L,), (1, *self.geometry.grid_shape)

    @property
    def cond_dims(self) -> tuple[int, int]:
        return 1, 1 + self.geometry.grid_shape[0]

    def _layers(self, showers: torch.Tensor) -> torch.Tensor:
        """[B, V] -> thresholded [B, L, A*R] float64."""
        L = self.geometry.grid_shape[0]
        e = showers.double().clamp_min(0)
        return drop_below(e, self.geometry.threshold_mev).reshape(e.shape[0], L, -1)

    def _layer_cond(self, layer_e: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        dtype = layer_e.dtype
        rel = layer_e / energies.to(dtype).reshape(-1, 1)
        return (torch.log10(rel + LAYER_FLOOR) - self.c_mean.to(dtype)) / self.c_std.to(dtype)

    def _code_to_layers(self, x_e: torch.Tensor, energies: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Energy code [B, L] -> layer energies [B, L] MeV; layers under the threshold are empty."""
        y = torch.nan_to_num(x_e.to(dtype), 0.0, 0.0, 0.0) * self.e_std.to(dtype) + self.e_mean.to(dtype)
        layer_e = layer_energies(_unlogit(y, self.alpha), energies.to(dtype))
        return drop_below(layer_e, self.geometry.threshold_mev)

    def _raw_codes(self, showers: torch.Tensor, energies: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Unstandardised codes: (energy logits [B, L], layer log-energies [B, L], voxel logits [B, V])."""
        g = self._layers(showers)
        layer_e = g.sum(-1)
        y_e = logit(energy_fractions(layer_e, energies.double()), self.alpha)
        frac = torch.where(layer_e[..., None] > 0, g / layer_e[..., None].clamp_min(1e-300), torch.zeros_like(g))
        return y_e, self._layer_cond(layer_e, energies), logit(frac, self.alpha).reshape(g.shape[0], -1)

    def encode(self, showers: torch.Tensor, energies: torch.Tensor) -> list[torch.Tensor]:
        """[B, V] MeV -> [energy code [B, L], shape code [B, 1, L, A, R]], float32."""
        y_e, _, y_s = self._raw_codes(showers, energies)
        x_e = (y_e - self.e_mean) / self.e_std
        return [x_e.float(), self.geometry.to_grid(((y_s - self.v_mean) / self.v_std).float())]

    def dequantised(self, x: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training codes of the shape stage with its empty voxels dequantised (see the module notes).

        x [B, 1, L, A, R] and cond [B, 1 + L] as `encode` and `conditions` make them; the layer energies are
        read back from cond. Without `dequantise` (or for the energy stage's [B, L] codes) x is returned."""
        if not self.dequantise or x.dim() != 5:
            return x
        L, thr = self.geometry.grid_shape[0], self.geometry.threshold_mev
        rel = 10 ** (cond[:, 1:].double() * self.c_std + self.c_mean) - LAYER_FLOOR           # E_l / E_inc
        layer_e = rel * self.energies(cond[:, :1])[:, None]
        top = logit((thr / layer_e.clamp_min(thr)).clamp(max=1.0), self.alpha)                # [B, L]
        low = logit(torch.zeros((), dtype=torch.float64, device=x.device), self.alpha)
        mean, std, flat = self.v_mean.double(), self.v_std.double(), self.geometry.to_flat(x).double()
        per_layer = flat.shape[1] // L
        # An empty voxel's stored code is (low - mean) / std in float32; real voxels sit >= 0.01 above it.
        empty = ((flat - (low - mean) / std).abs() < 1e-4) & (layer_e >= thr).repeat_interleave(per_layer, 1)
        u = torch.rand(flat.shape, generator=generator, device=x.device, dtype=torch.float64)
        y = low + u * (top.repeat_interleave(per_layer, 1) - low)
        return self.geometry.to_grid(torch.where(empty, (y - mean) / std, flat).to(x.dtype))

    def stage_condition(self, k: int, energies: torch.Tensor, previous: list[torch.Tensor],
                        dtype: torch.dtype = torch.float64) -> torch.Tensor:
        if k != 1:
            return super().stage_condition(k, energies, previous, dtype)
        layer_e = self._code_to_layers(previous[0], energies, dtype)
        return torch.cat([self.condition(energies, dtype), self._layer_cond(layer_e, energies).float()], 1)

    def decode(self, xs: list[torch.Tensor], energies: torch.Tensor,
               dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """[energy code, shape code] -> (showers [B, V] MeV float32, clipped [B]: a non-finite code value)."""
        x_e, x_s = xs
        flat = self.geometry.to_flat(x_s)
        clipped = ~(torch.isfinite(x_e).all(1) & torch.isfinite(flat).all(1))
        thr = self.geometry.threshold_mev
        layer_e = self._code_to_layers(x_e, energies, dtype)[..., None]                    # [B, L, 1]
        y = torch.nan_to_num(flat.to(dtype), 0.0, 0.0, 0.0) * self.v_std.to(dtype) + self.v_mean.to(dtype)
        s = torch.sigmoid(y.clamp(-60, 60).reshape(layer_e.shape[0], layer_e.shape[1], -1))
        p = ((s - self.alpha) / (1 - 2 * self.alpha)).clamp_min(0)
        p = torch.where(p.sum(-1, keepdim=True) > 0, p, s)
        e = layer_e * (p if self.dequantise else p / p.sum(-1, keepdim=True))
        p = p * ((e >= thr) | (e == e.amax(-1, keepdim=True)))
        e = layer_e * p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        return drop_below(e, thr).reshape(e.shape[0], -1).float(), clipped


def fit_factorised(geometry: Geometry, stream: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   e_range: Callable[[], tuple[float, float]], alpha: float, standardise: str,
                   dequantise: bool = False) -> FactorisedTransform:
    """Fit the three standardisations (energy code, layer condition, shape code) in one pass."""
    L = geometry.grid_shape[0]
    zeros, ones = torch.zeros(L, dtype=torch.float64), torch.ones(L, dtype=torch.float64)
    probe = FactorisedTransform(geometry, alpha, zeros, ones, zeros, ones, 0.0, 1.0, 1.0, 2.0)   # identity scalings
    m_e, m_c, m_v = Moments(), Moments(), Moments()
    for energies, showers in stream:
        y_e, y_c, y_s = probe._raw_codes(showers, energies)
        m_e.add(y_e, True)
        m_c.add(y_c, True)
        m_v.add(y_s, standardise == "voxel")
    e_mean, e_std = m_e.result()
    c_mean, c_std = m_c.result()
    v_mean, v_std = m_v.result(VOXEL_MIN_STD if standardise == "voxel" else 1e-6)
    return FactorisedTransform(geometry, alpha, e_mean, e_std, c_mean, c_std, v_mean, v_std, *e_range(), dequantise)
