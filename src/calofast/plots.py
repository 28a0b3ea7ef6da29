"""Figures from feature arrays and metrics only (matplotlib, Agg backend, no LaTeX).

Every function writes one PNG and returns its path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .geometry import Geometry
from .metrics.features import FileFeatures

__all__ = ["plot_summary", "plot_histograms", "plot_mean_showers", "plot_response", "plot_quality_vs_nfe"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _profiles(ff: FileFeatures, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Mean longitudinal [L] and radial [R] energy fractions from the features / mean showers."""
    f = ff.features
    longi = (f["E_layer"] / f["E_inc"][:, None]).mean(axis=0)
    radial = None
    if geometry.is_regular and ff.mean_shower:
        L, A, R = geometry.grid_shape
        mean = sum(ff.mean_shower.values()) / len(ff.mean_shower)
        radial = mean.reshape(L, A, R).sum(axis=(0, 1))
        radial = radial / radial.sum()
    return longi, radial


def plot_summary(ff: FileFeatures, geometry: Geometry, out: "str | Path") -> Path:
    """Incident-energy spectrum, response, longitudinal and radial profiles of one file."""
    plt = _plt()
    f = ff.features
    fig, ax = plt.subplots(2, 2, figsize=(10, 7.5))
    e = f["E_inc"] / 1e3
    ax[0, 0].hist(e, bins=np.geomspace(e.min(), e.max() * 1.0001, 50), histtype="step", color="k")
    ax[0, 0].set(xscale="log", xlabel="incident energy [GeV]", ylabel="showers", title="spectrum")
    resp = f["E_tot"] / f["E_inc"]
    ax[0, 1].hist(resp, bins=np.linspace(0.5, 1.5, 101), histtype="step", color="k")
    ax[0, 1].set(xlabel="E_tot / E_inc", ylabel="showers",
                 title=f"response: mean {resp.mean():.4f}, rms {resp.std():.4f}")
    longi, radial = _profiles(ff, geometry)
    ax[1, 0].step(np.arange(len(longi)), longi, where="mid", color="k")
    ax[1, 0].set(yscale="log", xlabel="layer", ylabel="<E_layer / E_inc>", title="longitudinal profile")
    if radial is not None:
        ax[1, 1].step(np.arange(len(radial)), radial, where="mid", color="k")
        ax[1, 1].set(yscale="log", xlabel="radial bin", ylabel="energy fraction", title="radial profile")
    else:
        ax[1, 1].axis("off")
    fig.suptitle(f"{ff.path.name}: {ff.n} showers, geometry {geometry.name}")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
