"""Histogram comparison with the CaloChallenge binnings and separation power.

Binnings: spec `calochallenge.md` 5.3 (`evaluate_plotting_helper.py`). Every histogram is a density
times the bin widths, so it sums to 1 over the entries inside its range; entries outside (zeros on
log axes included) are dropped. Separation power (eq. 15 of arXiv:2009.03796):
S = 1/2 sum_i (h1_i - h2_i)^2 / (h1_i + h2_i + 1e-16); 0 identical, 1 disjoint.
"""
from __future__ import annotations

import numpy as np

from ..geometry import Geometry

__all__ = ["normalised_histogram", "separation_power", "feature_bins", "voxel_bins", "separation_powers",
           "PER_LAYER"]

PER_LAYER = ("E_layer", "EC_eta", "EC_phi", "width_eta", "width_phi", "sparsity", "EC_r", "width_r")


def normalised_histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """density=True histogram times bin widths; all zeros when no entry falls inside the range."""
    counts, _ = np.histogram(values, bins=edges)
    total = counts.sum()
    return counts / total if total > 0 else np.zeros(len(edges) - 1)


def separation_power(h1: np.ndarray, h2: np.ndarray) -> float:
    return float(0.5 * np.sum((h1 - h2) ** 2 / (h1 + h2 + 1e-16)))


def _ds1(geometry: Geometry) -> bool:
    return geometry.name.startswith("ds1") or geometry.layer_thickness_mm is None


def feature_bins(name: str, geometry: Geometry, layer_id: int, reference: np.ndarray | None = None) -> np.ndarray:
    """Bin edges of one (per-layer) feature; `reference` values set the range where the spec says so."""
    ds1 = _ds1(geometry)
    if name == "response":
        return np.linspace(0.5, 1.5, 101)
    if name == "E_layer":
        top = float(np.max(reference)) if reference is not None and len(reference) else 1.0
        lo = geometry.threshold_mev
        return np.logspace(np.log10(lo), np.log10(max(top, lo * 10)), 40)
    if name in ("EC_eta", "EC_phi"):
        r = (500 if layer_id in (12, 13) else 100) if ds1 else 30
        return np.linspace(-r, r, 101)
    if name in ("width_eta", "width_phi"):
        r = (400 if layer_id in (12, 13) else 100) if ds1 else 30
        return np.linspace(0, r, 101)
    if name == "sparsity":
        return np.linspace(0, 1, 21)
    if name == "EC_r":
        r = (1500 if layer_id in (12, 13, 14) else 500) if ds1 else 42
        return np.linspace(0, r, 101)
    if name == "width_r":
        r = (1500 if layer_id in (12, 13, 14) else 500) if ds1 else 20
        return np.linspace(0, r, 101)
    raise ValueError(f"no binning for feature {name!r}")


def voxel_bins(geometry: Geometry, reference_max: float) -> np.ndarray:
    """50 log-spaced edges from the threshold to the reference's largest voxel."""
    lo = geometry.threshold_mev
    return np.logspace(np.log10(lo), np.log10(max(reference_max, lo * 10)), 50)


def _layer_ids(name: str, geometry: Geometry) -> list[int]:
    pos = geometry.alpha_layers if name in ("EC_eta", "EC_phi", "width_eta", "width_phi") else geometry.relevant_layers
    return [geometry.layers[i].id for i in pos]


def separation_powers(ref: dict[str, np.ndarray], gen: dict[str, np.ndarray], geometry: Geometry,
                      voxel_hists: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """{feature: {"per_layer": [...], "mean": float}} plus response and voxel spectrum (scalars)."""
    out: dict = {}
    r_ref, r_gen = ref["E_tot"] / ref["E_inc"], gen["E_tot"] / gen["E_inc"]
    edges = feature_bins("response", geometry, 0)
    out["response"] = separation_power(normalised_histogram(r_ref, edges), normalised_histogram(r_gen, edges))
    for name in PER_LAYER:
        per = []
        for j, lid in enumerate(_layer_ids(name, geometry)):
            edges = feature_bins(name, geometry, lid, ref[name][:, j])
            per.append(separation_power(normalised_histogram(ref[name][:, j], edges),
                                        normalised_histogram(gen[name][:, j], edges)))
        out[name] = {"per_layer": per, "mean": float(np.mean(per)) if per else float("nan")}
    if voxel_hists is not None:
        out["voxel_energy"] = separation_power(*voxel_hists)
    return out
