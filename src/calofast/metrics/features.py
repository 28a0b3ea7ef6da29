"""High-level shower features of the CaloChallenge (`HighLevelFeatures.CalculateFeatures`), vectorised.

Definitions (spec `calochallenge.md` 5.1-5.2, CaloChallenge/homepage commit 9b41df7): voxels below the
geometry threshold are zeroed first; per relevant layer l, E_l, sparsity (fraction of empty voxels),
centre of energy and width in r; per alpha-binned layer also in x ("eta") and y ("phi"), with
eps = 1e-16 in the denominators, widths sqrt(max(0, <v^2> - <v>^2)), 0 for empty layers. mm, MeV.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..geometry import Geometry

__all__ = ["FEATURE_KEYS", "apply_threshold", "shower_features", "high_level_vector", "FileFeatures",
           "file_features", "radial_profile", "layer_profile"]

EPS = 1e-16
FEATURE_KEYS = ("E_inc", "E_tot", "E_layer", "sparsity", "EC_r", "width_r", "EC_eta", "EC_phi",
                "width_eta", "width_phi")


def apply_threshold(showers: np.ndarray, threshold: float) -> np.ndarray:
    """Copy of `showers` with every voxel below `threshold` (MeV) set to 0."""
    return np.where(showers < threshold, 0.0, showers).astype(showers.dtype, copy=False)


class _LayerSums:
    """Per-layer sums by np.add.reduceat over the contiguous voxel ranges of the relevant layers."""

    def __init__(self, geometry: Geometry, layers: list[int]):
        self.starts = geometry.layer_offsets[layers]
        self.ends = geometry.layer_offsets[np.asarray(layers) + 1]
        self.lo, self.hi = int(self.starts[0]), int(self.ends[-1])
        if not np.all(self.starts[1:] == self.ends[:-1]):
            raise ValueError("relevant layers must be contiguous in the flat order")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.add.reduceat(x[:, self.lo:self.hi], self.starts - self.lo, axis=1)


def _layer_moments(x: np.ndarray, geometry: Geometry, generic: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per relevant layer: sums of E, E r, E r^2, E x, E x^2, E y, E y^2 [N, L, 7] and hit counts [N, L].

    Regular geometries use one matrix product per batch; others sum contiguous voxel ranges."""
    r, px, py = geometry.voxel_r, geometry.voxel_x, geometry.voxel_y
    weights = np.stack([np.ones_like(r), r, r * r, px, px * px, py, py * py], axis=1)      # [V, 7]
    if geometry.is_regular and not generic:
        L, A, R = geometry.grid_shape
        xl = x.reshape(len(x), L, A * R)
        return xl @ weights[: A * R], (xl > 0).sum(axis=2)
    sums = _LayerSums(geometry, geometry.relevant_layers)
    moments = np.stack([sums(x * w) for w in weights.T], axis=2)
    return moments, sums((x > 0).astype(np.float64))


def shower_features(showers: np.ndarray, energies: np.ndarray, geometry: Geometry,
                    thresholded: bool = False, generic: bool = False) -> dict[str, np.ndarray]:
    """Features of a batch: showers [N, V] MeV, incident energies [N] MeV -> dict of [N] / [N, layers]."""
    x = np.asarray(showers, dtype=np.float64)
    if not thresholded:
        x = np.where(x < geometry.threshold_mev, 0.0, x)
    relevant, alpha = geometry.relevant_layers, geometry.alpha_layers
    m, hits = _layer_moments(x, geometry, generic)
    e_l = m[..., 0]
    n_vox = np.array([geometry.layers[i].n_voxels for i in relevant])
    out = {
        "E_inc": np.asarray(energies, np.float64).reshape(-1),
        "E_tot": e_l.sum(axis=1),
        "E_layer": e_l,
        "sparsity": 1.0 - hits / n_vox,
    }
    ec = m[..., 1] / (e_l + EPS)
    out["EC_r"] = ec
    out["width_r"] = np.sqrt(np.maximum(0.0, m[..., 2] / (e_l + EPS) - ec ** 2))
    # Eta/phi features on the alpha-binned layers only (a subset of the relevant ones).
    pick = [relevant.index(i) for i in alpha]
    e_a = e_l[:, pick]
    for name, k in (("eta", 3), ("phi", 5)):
        c = m[:, pick, k] / (e_a + EPS)
        out[f"EC_{name}"] = c
        out[f"width_{name}"] = np.sqrt(np.maximum(0.0, m[:, pick, k + 1] / (e_a + EPS) - c ** 2))
    return out


def high_level_vector(f: dict[str, np.ndarray]) -> np.ndarray:
    """The `cls-high` input of the CaloChallenge classifier (also the FPD/KPD features), [N, D]."""
    return np.concatenate([
        np.log10(f["E_inc"])[:, None], np.log10(f["E_layer"] + 1e-8),
        f["EC_eta"] / 100, f["EC_phi"] / 100, f["width_eta"] / 100, f["width_phi"] / 100,
        np.log10(f["E_tot"] + 1e-8)[:, None], f["sparsity"], f["EC_r"] / 100, f["width_r"] / 100,
    ], axis=1)


def radial_profile(showers: np.ndarray, geometry: Geometry) -> np.ndarray:
    """[N, n_r] energy per radial bin summed over layers (regular geometries)."""
    L, A, R = geometry.grid_shape
    return showers.reshape(len(showers), L, A, R).sum(axis=(1, 2))


def layer_profile(showers: np.ndarray, geometry: Geometry) -> np.ndarray:
    """[N, L] energy per layer (regular geometries)."""
    L, A, R = geometry.grid_shape
    return showers.reshape(len(showers), L, A * R).sum(axis=2)


@dataclass
class FileFeatures:
    """Everything the evaluation needs from one file, gathered in one streaming pass."""

    path: Path
    features: dict[str, np.ndarray]
    voxel_max: float                               # largest thresholded voxel energy
    mean_shower: dict[str, np.ndarray] = field(default_factory=dict)   # energy-bin label -> [V] mean

    @property
    def n(self) -> int:
        return len(self.features["E_inc"])


# Average-shower energy ranges for DS2/DS3 (CaloChallenge avg-E plots), MeV.
MEAN_SHOWER_BINS = (("1-10 GeV", 1e3, 1e4), ("10-100 GeV", 1e4, 1e5), ("100-1000 GeV", 1e5, 1e6))


def file_features(path: "str | Path", geometry: Geometry, *, batch_size: int | None = None,
                  max_events: int | None = None, progress: bool = False) -> FileFeatures:
    """Stream a CaloChallenge file once: features of every shower, max voxel and mean showers."""
    from tqdm import tqdm

    from ..data import inspect_file, iter_showers

    info = inspect_file(path, geometry)
    batch_size = batch_size or max(100, 2**24 // geometry.n_voxels)   # ~130 MB of float64 per batch
    n = info.n_events if max_events is None else min(max_events, info.n_events)
    parts, vmax = [], 0.0
    sums = {label: np.zeros(geometry.n_voxels) for label, _, _ in MEAN_SHOWER_BINS}
    counts = {label: 0 for label, _, _ in MEAN_SHOWER_BINS}
    with tqdm(total=n, unit="shower", desc=f"features {Path(path).name}", disable=not progress) as bar:
        for e, s in iter_showers(path, batch_size, geometry=geometry, stop=n):
            s = apply_threshold(s, geometry.threshold_mev)
            parts.append(shower_features(s, e, geometry, thresholded=True))
            vmax = max(vmax, float(s.max(initial=0.0)))
            for label, lo, hi in MEAN_SHOWER_BINS:
                sel = (e >= lo) & (e < hi)
                sums[label] += s[sel].sum(axis=0, dtype=np.float64)
                counts[label] += int(sel.sum())
            bar.update(len(e))
    feats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    means = {label: sums[label] / counts[label] for label in sums if counts[label] > 0}
    return FileFeatures(Path(path), feats, vmax, means)
