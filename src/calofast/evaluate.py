"""The CaloChallenge evaluation of a generated file against a reference: metrics.json, plots, report.html.

Steps (definitions pinned to CaloChallenge/homepage commit 9b41df7, spec `calochallenge.md`):
features of both files in one streaming pass each (threshold applied first), the voxel-energy
spectra in a second pass, separation powers per feature and layer, the low- and high-level classifier
tests, FPD/KPD on the high-level features, plots and a self-contained HTML report.
"""
from __future__ import annotations

import datetime
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import __version__
from .checkpoint import atomic_write_bytes
from .data import ShowerFileError, file_attrs, inspect_file, iter_showers
from .geometry import Geometry
from .memory import peak_memory
from .metrics.classifier import FAST, FULL, classifier_test, energy_groups, group_names, low_level_inputs
from .metrics.compare import separation_powers, voxel_bins
from .metrics.features import FileFeatures, apply_threshold, file_features, high_level_vector
from .metrics.fpd import fpd, kpd

__all__ = ["evaluate_files", "prepare_reference", "Reference", "PROTOCOL_EVENTS"]

log = logging.getLogger("calofast.evaluate")
REFERENCE_COMMIT = "CaloChallenge/homepage@9b41df7"
# Events per class the official classifier splits need (train + test + val, spec 6.4).
PROTOCOL_EVENTS = {"ds1-photons": 121_000, "ds1-pions": 120_800, "ds2": 100_000, "ds3": 100_000}
MAX_CLASSIFIER_SEEDS = 100  # each seed retrains both classifiers; more is a typo


def _voxels_pass(path: Path, geometry: Geometry, edges: np.ndarray, n: int,
                 low_level: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One more streaming pass: the normalised voxel-energy spectrum on `edges` and, if asked, the
    `cls-low` classifier inputs (both need every voxel, which the feature pass does not keep)."""
    counts, done = np.zeros(len(edges) - 1), 0
    # Filled in place: for 50,000 DS3 showers the float64 inputs are 16 GB, and a list joined at the end is twice that.
    low = np.empty((n, geometry.n_voxels + 1)) if low_level else None
    for e, s in iter_showers(path, 5000, geometry=geometry, stop=n):
        t = apply_threshold(s, geometry.threshold_mev)
        counts += np.histogram(t[t > 0], bins=edges)[0]
        if low_level:
            low[done:done + len(e)] = low_level_inputs(s, e, geometry.threshold_mev)    # applies the threshold itself
        done += len(e)
    hist = counts / counts.sum() if counts.sum() else counts
    return hist, (low[:done] if low_level else None)


@dataclass
class Reference:
    """Everything the evaluation needs from the reference file, computed once and reusable."""

    path: Path
    n: int
    features: FileFeatures
    voxel_edges: np.ndarray
    voxel_hist: np.ndarray
    high_level: np.ndarray
    low_level: np.ndarray | None = None


def prepare_reference(path: "str | Path", geometry: Geometry, n: int | None = None, *, low_level: bool = True,
                      progress: bool = False) -> Reference:
    path = Path(path)
    info = inspect_file(path, geometry)
    n = info.n_events if n is None else min(n, info.n_events)
    ff = file_features(path, geometry, max_events=n, progress=progress)
    edges = voxel_bins(geometry, ff.voxel_max)
    hist, low = _voxels_pass(path, geometry, edges, n, low_level)
    return Reference(path, n, ff, edges, hist, high_level_vector(ff.features), low)


def evaluate_files(generated: "str | Path", reference: "str | Path | Reference", geometry: Geometry,
                   out_dir: "str | Path", *, fast: bool = False, min_events: int | None = None,
                   classifiers: tuple[str, ...] = ("low", "high"), distances: bool = True, device: str | None = None,
                   label: str = "", plots: bool = True, progress: bool = True, baseline: dict | None = None,
                   classifier_seeds: int = 1, force: bool = False) -> dict:
    """Run the evaluation; write metrics.json (and plots, report.html) into out_dir; return the metrics.

    `baseline`: another evaluation's metrics (e.g. GFlash against GFlash) shown beside these in the report.
    `classifier_seeds` > 1 repeats each classifier test with seeds 1, 2, ... (another split and initialisation)
    and records the AUCs with their mean and standard deviation under `auc_seeds`: the classifier's own spread,
    for comparing rows whose AUCs are close. An out_dir that holds an evaluation already is refused unless `force`."""
    if not isinstance(classifier_seeds, int) or not 1 <= classifier_seeds <= MAX_CLASSIFIER_SEEDS:
        raise ValueError(f"--classifier-seeds {classifier_seeds}: must be an integer from 1 to {MAX_CLASSIFIER_SEEDS}")
    if min_events is not None and min_events < 2:
        raise ValueError(f"--min-events {min_events}: must be at least 2")
    generated, out_dir = Path(generated), Path(out_dir)
    ref_path = reference.path if isinstance(reference, Reference) else Path(reference)
    info_g, info_r = inspect_file(generated), inspect_file(ref_path)
    for info in (info_g, info_r):
        if info.n_voxels != geometry.n_voxels:
            raise ShowerFileError(f"{info.path}: {info.n_voxels} voxels per shower, but geometry {geometry.name} "
                                  f"has {geometry.n_voxels}")
    need = min_events if min_events is not None else (1000 if fast else PROTOCOL_EVENTS.get(geometry.name, 1000))
    n = min(info_g.n_events, info_r.n_events)
    problems = []                 # every requirement checked before any work, reported together
    if n < need:
        problems.append(f"{generated if info_g.n_events < need else ref_path} has {n} events and the protocol needs "
                        f"{need} (give --min-events {n} to evaluate smaller sets; the numbers are then not comparable "
                        "to published ones)")
    if classifiers and info_g.n_events != info_r.n_events and not (isinstance(reference, Reference) and reference.n == info_g.n_events):
        problems.append(f"{generated} has {info_g.n_events} events but the reference {info_r.n_events}: the classifier "
                        f"test needs equal counts (calofast generate --model MODEL --energies-from {ref_path} "
                        f"-o {generated}), or give --classifiers ''")
    if out_dir.exists() and not out_dir.is_dir():
        problems.append(f"{out_dir}: exists and is not a folder")
    elif not force and (old := [f for f in ("metrics.json", "report.html") if (out_dir / f).exists()]):
        problems.append(f"{out_dir}: holds an evaluation already ({', '.join(old)}); refusing to replace it "
                        "(use --force, or choose another folder)")
    if problems:
        raise ShowerFileError("; and ".join(problems))
    # out_dir is made by the first write (metrics.json): a failed or interrupted evaluation leaves no empty folder
    clock, seconds = time.perf_counter(), {}

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 2)
        clock = now

    if not isinstance(reference, Reference) or reference.n != n or \
            ("low" in classifiers and reference.low_level is None):
        reference = prepare_reference(ref_path, geometry, n, low_level="low" in classifiers, progress=progress)
    ff_r = reference.features
    ff_g = file_features(generated, geometry, max_events=n, progress=progress)
    edges = reference.voxel_edges
    gen_hist, low_g = _voxels_pass(generated, geometry, edges, n, "low" in classifiers)
    vh = (reference.voxel_hist, gen_hist)
    lap("features")
    metrics: dict = {
        "label": label, "generated": str(generated), "reference": str(ref_path), "geometry": geometry.name,
        "events": n, "protocol": REFERENCE_COMMIT, "calofast_version": __version__, "fast": fast,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "separation_power": separation_powers(ff_r.features, ff_g.features, geometry, vh),
        "response": {k: {"mean": float(np.mean(f["E_tot"] / f["E_inc"])), "std": float(np.std(f["E_tot"] / f["E_inc"]))}
                     for k, f in (("reference", ff_r.features), ("generated", ff_g.features))},
        # How the file was made (calofast files: model, sampler, steps, seed, NFE per stage, clipped showers).
        "generation": {k: v for k, v in file_attrs(generated).items()
                       if k in ("model", "sampler", "steps", "seed", "nfe", "clipped_showers", "early_sampler",
                                "ms_per_shower", "device")},
    }
    hl_r, hl_g = reference.high_level, high_level_vector(ff_g.features)
    cfg = FAST if fast else FULL
    # Each classifier's AUC is also reported within each incident-energy decade (same classifier, val events of it).
    groups = (energy_groups(ff_g.features["E_inc"]), energy_groups(ff_r.features["E_inc"]))
    names = group_names(np.concatenate(groups))
    for key, what, x_g, x_r in (("classifier_high", "high-level", hl_g, hl_r),
                                ("classifier_low", "low-level (voxels)", low_g, reference.low_level)):
        if key.split("_")[1] in classifiers:
            res = classifier_test(x_g, x_r, cfg, device, progress, name=what, groups=groups)
            res["auc_by_energy"] = {names[int(k)]: v for k, v in res.pop("auc_by_group").items()}
            if classifier_seeds > 1:
                aucs = [res["auc"]] + [classifier_test(x_g, x_r, replace(cfg, seed=cfg.seed + s), device, progress,
                                                       name=f"{what}, seed {cfg.seed + s}")["auc"]
                                       for s in range(1, classifier_seeds)]
                res["auc_seeds"] = {"seeds": [cfg.seed + s for s in range(classifier_seeds)], "values": aucs,
                                    "mean": float(np.mean(aucs)), "std": float(np.std(aucs, ddof=1))}
            metrics[key] = res
            lap(key)
    if distances:
        # Protocol: FPD over 10k-50k bootstrap samples (10 sizes x 20 draws), KPD 10 x 10k. Smaller files
        # use n-5n; fast mode also cuts the draws (5 sizes x 5 draws, KPD 5 x 2k) for smoke runs.
        on = device if device and str(device).startswith("cuda") else None
        lo = min(10_000, n)
        f_val, f_err = fpd(hl_r, hl_g, min_samples=lo, max_samples=min(50_000, 5 * lo), device=on, progress=progress,
                           **(dict(num_batches=5, num_points=5) if fast else {}))
        k_val, k_err = kpd(hl_r, hl_g, batch_size=min(2_000 if fast else 10_000, n), device=on, progress=progress,
                           **(dict(num_batches=5) if fast else {}))
        metrics["fpd"] = {"value": f_val, "error": f_err, "x1e3": f_val * 1e3}
        metrics["kpd"] = {"value": k_val, "error": k_err, "x1e3": k_val * 1e3}
        lap("fpd_kpd")
    metrics["seconds"] = seconds
    metrics["memory"] = peak_memory(device)    # the evaluating process's peaks so far
    # The numbers are safe before any plot is tried.
    atomic_write_bytes(out_dir / "metrics.json", json.dumps(metrics, indent=1).encode())
    if plots:
        from .plots import plot_histograms, plot_mean_showers, plot_response
        from .report import report_title
        makers = {"histograms": lambda p: plot_histograms(ff_r, ff_g, geometry, vh, edges, p, report_title(metrics)),
                  "response": lambda p: plot_response(ff_r, ff_g, p)}
        if geometry.is_regular:
            makers["mean_showers"] = lambda p: plot_mean_showers(ff_r, ff_g, geometry, p)
        metrics["plots"], metrics["plot_errors"] = {}, {}
        for name, make in makers.items():
            try:
                metrics["plots"][name] = make(out_dir / f"{name}.png").name
            except Exception as err:           # a plot that cannot be drawn is skipped and said so in the report
                log.warning("plot %s skipped: %s", name, err)
                metrics["plot_errors"][name] = f"{type(err).__name__}: {err}"
        lap("plots")
        atomic_write_bytes(out_dir / "metrics.json", json.dumps(metrics, indent=1).encode())
    if plots:
        from .report import write_report
        metrics["report"] = str(write_report(metrics, out_dir, baseline))
    return metrics
