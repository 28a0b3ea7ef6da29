"""Figures from feature arrays and metrics only (matplotlib, Agg backend, no LaTeX).

Every function writes one PNG and returns its path.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .geometry import Geometry
from .metrics.features import FileFeatures

__all__ = ["plot_summary", "plot_histograms", "plot_mean_showers", "plot_response", "plot_pareto",
           "plot_training"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: "str | Path", dpi: int, tight: bool = True) -> Path:
    """Write the figure (tight_layout, or a tight bounding box where the layout is a gridspec) atomically, as
    every output of calofast (never over anything but a regular file), and close it."""
    from .checkpoint import atomic_write_bytes
    out = Path(out)
    if tight:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format=out.suffix.lstrip(".").lower() or "png", **({} if tight else {"bbox_inches": "tight"}))
    _plt().close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


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
    return _save(fig, out, dpi=110)


def _hist_panel(ax_main, ax_ratio, ref, gen, edges, label, logx=False):
    h_r = np.histogram(ref, bins=edges)[0].astype(float)
    h_g = np.histogram(gen, bins=edges)[0].astype(float)
    _step_pair(ax_main, ax_ratio, h_r, h_g, edges, label, logx)


def _step_pair(ax_main, ax_ratio, h_r, h_g, edges, label, logx=False):
    w = np.diff(edges)
    n_r, n_g = max(h_r.sum(), 1e-300), max(h_g.sum(), 1e-300)
    d_r, d_g = h_r / n_r / w, h_g / n_g / w
    ax_main.stairs(d_r, edges, color="k", label="reference")
    ax_main.stairs(d_g, edges, color="tab:red", label="generated")
    ax_main.set_yscale("log")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(d_r > 0, d_g / d_r, np.nan)
    ax_ratio.stairs(ratio, edges, color="tab:red")
    ax_ratio.axhline(1, color="k", lw=0.8)
    ax_ratio.set_ylim(0.5, 1.5)                # ratios outside are cut off (the report says so)
    ax_ratio.set_xlabel(label, fontsize=12)
    ax_main.set_ylabel("norm. entries", fontsize=11)
    ax_ratio.set_ylabel("gen / ref", fontsize=11)
    ax_main.tick_params(which="both", labelbottom=False, labelsize=10)
    ax_ratio.tick_params(labelsize=10)
    if logx:
        ax_main.set_xscale("log")
        ax_ratio.set_xscale("log")


def plot_histograms(ref: FileFeatures, gen: FileFeatures, geometry: Geometry, voxel_hists, voxel_edges,
                    out: "str | Path", title: str = "") -> Path:
    """Feature histograms, reference vs generated, each with a generated/reference ratio panel; three panels a
    row, so that the labels stay legible where a page is 800 pixels wide."""
    from .metrics.compare import feature_bins
    plt = _plt()
    fr, fg = ref.features, gen.features
    rel = geometry.relevant_layers
    mid = rel[len(rel) // 4]                     # a layer near the shower maximum
    pick_a = geometry.alpha_layers.index(mid) if mid in geometry.alpha_layers else None
    j = rel.index(mid)
    lid = geometry.layers[mid].id
    panels = [("E_tot / E_inc", fr["E_tot"] / fr["E_inc"], fg["E_tot"] / fg["E_inc"], feature_bins("response", geometry, 0), False)]
    for layer in (rel[1], mid, rel[min(len(rel) - 1, 2 * len(rel) // 3)]):
        jj = rel.index(layer)
        panels.append((f"E layer {geometry.layers[layer].id} [MeV]", fr["E_layer"][:, jj], fg["E_layer"][:, jj],
                       feature_bins("E_layer", geometry, 0, fr["E_layer"][:, jj]), True))
    if pick_a is not None:
        for name in ("EC_eta", "EC_phi", "width_eta", "width_phi"):
            panels.append((f"{name} layer {lid} [mm]", fr[name][:, pick_a], fg[name][:, pick_a],
                           feature_bins(name, geometry, lid), False))
    for name, unit in (("EC_r", " [mm]"), ("width_r", " [mm]"), ("sparsity", "")):
        panels.append((f"{name} layer {lid}{unit}", fr[name][:, j], fg[name][:, j], feature_bins(name, geometry, lid), False))
    cols = 3
    rows = -(-(len(panels) + 1) // cols)
    fig = plt.figure(figsize=(4.2 * cols, 3.6 * rows))
    outer = fig.add_gridspec(rows, cols, hspace=0.4, wspace=0.38, top=0.95)
    for k, (label, a, b, edges, logx) in enumerate(panels + [("voxel energy [MeV]", None, None, voxel_edges, True)]):
        inner = outer[divmod(k, cols)].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05)
        ax, axr = fig.add_subplot(inner[0]), fig.add_subplot(inner[1])
        if a is None:
            _step_pair(ax, axr, voxel_hists[0], voxel_hists[1], edges, label, True)
        else:
            _hist_panel(ax, axr, a, b, edges, label, logx)
        if k == 0:
            ax.legend(fontsize=10)
    fig.suptitle(f"{title or gen.path.name} (red) vs {ref.path.name} (black)", y=0.995, fontsize=13)
    return _save(fig, out, dpi=90, tight=False)


def plot_mean_showers(ref: FileFeatures, gen: FileFeatures, geometry: Geometry, out: "str | Path") -> Path:
    """Average shower per incident-energy range: energy per (layer, radius), reference | generated | ratio."""
    plt = _plt()
    L, A, R = geometry.grid_shape
    labels = [k for k in ref.mean_shower if k in gen.mean_shower]
    fig, axes = plt.subplots(len(labels), 3, figsize=(12, 3.2 * len(labels)), squeeze=False)
    for row, label in enumerate(labels):
        a = ref.mean_shower[label].reshape(L, A, R).sum(axis=1)
        b = gen.mean_shower[label].reshape(L, A, R).sum(axis=1)
        vmax = max(a.max(), b.max())
        vmin = vmax * 1e-5
        for col, (img, title) in enumerate(((a, "reference"), (b, "generated"))):
            im = axes[row, col].imshow(np.clip(img.T, vmin, None), aspect="auto", origin="lower", cmap="viridis",
                                       norm=_lognorm(vmin, vmax))
            axes[row, col].set(title=f"{title}, {label}", xlabel="layer", ylabel="radial bin")
        fig.colorbar(im, ax=axes[row, 1], label="mean energy [MeV]")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(a > vmin, b / a, np.nan)
        im = axes[row, 2].imshow(ratio.T, aspect="auto", origin="lower", cmap="RdBu_r", vmin=0.5, vmax=1.5)
        axes[row, 2].set(title="generated / reference", xlabel="layer", ylabel="radial bin")
        fig.colorbar(im, ax=axes[row, 2], label="ratio (colours saturate at 0.5 and 1.5)")
    return _save(fig, out, dpi=90)


def _lognorm(vmin, vmax):
    import matplotlib.colors
    return matplotlib.colors.LogNorm(vmin=vmin, vmax=vmax)


def plot_response(ref: FileFeatures, gen: FileFeatures, out: "str | Path", bins: int = 12) -> Path:
    """Mean and spread of E_tot/E_inc in incident-energy bins, reference vs generated."""
    plt = _plt()
    e_all = np.concatenate([ref.features["E_inc"], gen.features["E_inc"]])
    edges = np.geomspace(e_all.min(), e_all.max() * 1.0001, bins + 1)
    centres = np.sqrt(edges[1:] * edges[:-1]) / 1e3
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for ff, color, name in ((ref, "k", "reference"), (gen, "tab:red", "generated")):
        f = ff.features
        resp = f["E_tot"] / f["E_inc"]
        idx = np.digitize(f["E_inc"], edges) - 1
        mean = np.array([resp[idx == i].mean() if np.any(idx == i) else np.nan for i in range(bins)])
        rms = np.array([resp[idx == i].std() if np.any(idx == i) else np.nan for i in range(bins)])
        ax[0].plot(centres, mean, "o-", color=color, label=name)
        ax[1].plot(centres, rms, "o-", color=color, label=name)
    ax[0].set(xscale="log", xlabel="incident energy [GeV]", ylabel="mean E_tot / E_inc", title="response")
    ax[1].set(xscale="log", yscale="log", xlabel="incident energy [GeV]", ylabel="rms E_tot / E_inc", title="resolution")
    ax[0].legend()
    return _save(fig, out, dpi=100)


def plot_pareto(rows: list[dict], out: "str | Path", floor: dict | None = None, title: str = "") -> Path:
    """Quality against cost for every row of a study: AUC low, AUC high and FPD (columns) against NFE and
    against ms per shower (rows), one marker per row, coloured by family, the GFlash-vs-GFlash floor dashed.

    rows: dicts with 'label', 'family', 'nfe', 'auc_low', 'auc_high', 'fpd_x1e3' and optionally 'ms_per_shower'."""
    plt = _plt()
    xs = [("nfe", "NFE (main stage)")] + ([("ms_per_shower", "ms per shower")] if any(r.get("ms_per_shower") for r in rows) else [])
    metrics = [("auc_low", "AUC (voxels)"), ("auc_high", "AUC (high-level)"), ("fpd_x1e3", "FPD x 1e3")]
    fig, axes = plt.subplots(len(xs), 3, figsize=(15, 4.2 * len(xs)), squeeze=False)
    families = sorted({r.get("family") or "" for r in rows})
    colors = dict(zip(families, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    for i, (xkey, xlabel) in enumerate(xs):
        for j, (mkey, mlabel) in enumerate(metrics):
            ax = axes[i, j]
            for fam in families:
                pts = sorted((r[xkey], r[mkey], r["label"]) for r in rows if (r.get("family") or "") == fam
                             and r.get(xkey) and r.get(mkey) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[fam], label=fam or None, ms=4)
                    for x, y, label in pts:
                        ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            if floor is not None and floor.get(mkey) is not None:
                ax.axhline(floor[mkey], color="k", ls="--", lw=0.9, label="GFlash vs GFlash")
            ax.set(xscale="log", xlabel=xlabel, ylabel=mlabel, yscale="log" if mkey == "fpd_x1e3" else "linear")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, out, dpi=100)


def plot_training(stats_jsonl: "str | Path", out: "str | Path") -> Path:
    """Loss and throughput against showers seen, from a run's stats.jsonl."""
    import json
    plt = _plt()
    rows = [json.loads(line) for line in Path(stats_jsonl).read_text().splitlines() if line.strip()]
    shown = np.array([r["showers"] for r in rows]) / 1e6
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(shown, [r["loss"] for r in rows], "k.-")
    ax[0].set(xlabel="showers seen [M]", ylabel="training loss", yscale="log", title=Path(stats_jsonl).parent.name)
    ax[1].plot(shown, [r["showers_per_s"] for r in rows], "k.-")
    ax[1].set(xlabel="showers seen [M]", ylabel="showers / s")
    return _save(fig, out, dpi=100)
