"""Incident-energy spectra from a short text spec, drawn per event.

Specs (units eV, keV, MeV, GeV, TeV; a bare number is MeV):
  ``log-uniform:1GeV:1TeV``  log-uniform (DS2/DS3 spectrum)
  ``uniform:10GeV:100GeV``   uniform
  ``fixed:50GeV`` or ``50GeV``  one energy
  ``ds1-photons`` / ``ds1-pions``  the 15 discrete DS1 energies 2^8..2^22 MeV with the DS1 event counts
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .rng import ENERGY, numpy_streams

__all__ = ["EnergySpectrum", "parse_energy", "parse_spectrum"]

_UNITS = {"ev": 1e-6, "kev": 1e-3, "mev": 1.0, "gev": 1e3, "tev": 1e6}


def parse_energy(text: str) -> float:
    """'10GeV' -> 10000.0 (MeV)."""
    # The exponent needs digits, so '5eV' is 5 eV and '5e3MeV' is 5000 MeV.
    m = re.fullmatch(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m:
        raise ValueError(f"cannot read energy {text!r} (e.g. 10GeV, 500MeV, 1TeV)")
    unit = m.group(2).lower() or "mev"
    if unit not in _UNITS:
        raise ValueError(f"unknown energy unit {m.group(2)!r} in {text!r} (use eV, keV, MeV, GeV, TeV)")
    try:
        value = float(m.group(1)) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"cannot read energy {text!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"energy must be positive and finite, got {text!r}")
    return value


def _ds1_counts(particle: str) -> tuple[np.ndarray, np.ndarray]:
    energies = 2.0 ** np.arange(8, 23)
    counts = np.array([10_000] * 10 + [10_000 if particle == "photons" else 9_800, 5_000, 3_000, 2_000, 1_000], float)
    return energies, counts / counts.sum()


@dataclass(frozen=True)
class EnergySpectrum:
    kind: str            # 'log-uniform', 'uniform', 'fixed', 'discrete'
    low: float           # MeV
    high: float          # MeV
    values: tuple[float, ...] = ()
    probs: tuple[float, ...] = ()
    text: str = ""

    def sample(self, seed: int, events: range | np.ndarray) -> np.ndarray:
        """[N] float64 energies in MeV; event k's value depends only on (seed, k)."""
        u = np.array([g.random() for g in numpy_streams(seed, events, ENERGY)])
        if self.kind == "fixed":
            return np.full(len(u), self.low)
        if self.kind == "log-uniform":
            return np.exp(np.log(self.low) + u * (np.log(self.high) - np.log(self.low)))
        if self.kind == "uniform":
            return self.low + u * (self.high - self.low)
        cdf = np.cumsum(self.probs)
        return np.asarray(self.values)[np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)]


def parse_spectrum(text: str) -> EnergySpectrum:
    key = text.strip().lower()
    if key in ("ds1-photons", "ds1-pions"):
        values, probs = _ds1_counts(key.split("-")[1])
        return EnergySpectrum("discrete", values[0], values[-1], tuple(values), tuple(probs), text)
    parts = [p for p in key.split(":")]
    if len(parts) == 1:
        e = parse_energy(parts[0])
        return EnergySpectrum("fixed", e, e, text=text)
    if parts[0] == "fixed" and len(parts) == 2:
        e = parse_energy(parts[1])
        return EnergySpectrum("fixed", e, e, text=text)
    if parts[0] in ("log-uniform", "uniform") and len(parts) == 3:
        lo, hi = parse_energy(parts[1]), parse_energy(parts[2])
        if not hi > lo:
            raise ValueError(f"energy range {text!r}: the upper bound must exceed the lower")
        return EnergySpectrum(parts[0], lo, hi, text=text)
    raise ValueError(f"cannot read energy spectrum {text!r}: use log-uniform:1GeV:1TeV, uniform:A:B, "
                     "fixed:E (or just E), ds1-photons, ds1-pions")
