"""Where does the voxel classifier see the difference? (fidelity issue diagnostic; not part of the protocol)

The protocol's low-level classifier (`calofast evaluate`) gives one AUC. This script trains the same classifier
(full protocol: DNN 2048 x 3, 50 epochs, 60/20/20 split, calibrated AUC) on parts and transforms of the
inputs, and reports each AUC overall and per incident-energy decade:

  voxels            the protocol's input [log10 E_inc, E_v / E_inc] (should reproduce `evaluate`)
  layer-energies    [log10 E_inc, E_l / E_inc]: what the energy stage decides
  shapes            [log10 E_inc, E_v / E_l]: what the shape stage decides, each layer normalised
  layers A-B        the protocol's input restricted to layers A..B
  radii A-B         the protocol's input restricted to radial bins A..B

With --floor (a second truth file, e.g. GFlash seed 2002), also truth against truth:

  floor             floor vs reference (the statistical floor, AUC ~0.5)
  floor-jitter S    the floor with each voxel multiplied by exp(S z), z ~ N(0, 1), renormalised per layer (layer
                    energies kept): how strongly the classifier reacts to voxel-level fluctuations of size S

and simple statistics per energy decade (generated / reference): mean count of non-empty voxels, and the
azimuthal coefficient of variation of the rings (std over the A angular bins / mean, energy-weighted over
layers and rings), a direct measure of how grainy the showers are.

    python scripts/classifier_probe.py --generated gen.h5 --reference ref.h5 [--floor floor.h5] -o probe.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from calofast.data import read_showers
from calofast.geometry import get_geometry
from calofast.metrics.classifier import FAST, FULL, classifier_test, energy_groups, group_names
from calofast.metrics.features import apply_threshold


def _load(path: str, geometry, n: int) -> tuple[np.ndarray, np.ndarray]:
    e, s = read_showers(path, geometry=geometry, stop=n)
    return e.astype(np.float64).reshape(-1), apply_threshold(s.astype(np.float64), geometry.threshold_mev)


def _views(e: np.ndarray, s: np.ndarray, grid: tuple[int, int, int], splits: dict) -> dict[str, np.ndarray]:
    L, A, R = grid
    g = s.reshape(len(s), L, A, R)
    layer = g.sum(axis=(2, 3))
    le = np.log10(e)[:, None]
    shapes = np.where(layer[..., None, None] > 0, g / np.maximum(layer, 1e-30)[..., None, None], 0.0)
    views = {"voxels": np.concatenate([le, s / e[:, None]], 1),
             "layer-energies": np.concatenate([le, layer / e[:, None]], 1),
             "shapes": np.concatenate([le, shapes.reshape(len(s), -1)], 1)}
    for a, b in splits["layers"]:
        views[f"layers {a}-{b}"] = np.concatenate([le, (g[:, a:b + 1] / e[:, None, None, None]).reshape(len(s), -1)], 1)
    for a, b in splits["radii"]:
        views[f"radii {a}-{b}"] = np.concatenate([le, (g[..., a:b + 1] / e[:, None, None, None]).reshape(len(s), -1)], 1)
    return views


def jitter(s: np.ndarray, grid: tuple[int, int, int], sigma: float, threshold: float, seed: int) -> np.ndarray:
    """Each voxel times exp(sigma z), renormalised so every layer keeps its energy, then thresholded."""
    L = grid[0]
    rng = np.random.default_rng(seed)
    g = s.reshape(len(s), L, -1)
    j = g * np.exp(sigma * rng.standard_normal(g.shape))
    j *= np.where(j.sum(-1, keepdims=True) > 0, g.sum(-1, keepdims=True) / np.maximum(j.sum(-1, keepdims=True), 1e-30), 0)
    return apply_threshold(j.reshape(len(s), -1), threshold)


def grain_stats(e: np.ndarray, s: np.ndarray, grid: tuple[int, int, int]) -> dict[str, dict[str, float]]:
    """Per energy decade: mean non-empty voxels, and the energy-weighted azimuthal CV of the rings."""
    L, A, R = grid
    g = s.reshape(len(s), L, A, R)
    ring = g.sum(axis=2)                                   # [N, L, R]
    cv = np.where(ring > 0, g.std(axis=2) / np.maximum(g.mean(axis=2), 1e-30), 0.0)
    w = ring / np.maximum(ring.sum(axis=(1, 2), keepdims=True), 1e-30)
    groups = energy_groups(e)
    out = {}
    for k, name in group_names(groups).items():
        m = groups == k
        out[name] = {"nonempty_voxels": float((s[m] > 0).sum(1).mean()), "ring_cv": float((cv[m] * w[m]).sum(axis=(1, 2)).mean())}
    return out


def _write(out: Path, result: dict) -> None:
    """The results so far, replaced whole (a killed probe leaves the last complete file)."""
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generated", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--floor", help="a second truth file: adds the truth-vs-truth probes")
    ap.add_argument("--geometry", default="ds2")
    ap.add_argument("--n", type=int, default=50_000, help="events per file (default 50,000)")
    ap.add_argument("--jitters", default="0.05,0.2", help="comma-separated S of the floor-jitter probes")
    ap.add_argument("--only", default="", help="comma-separated probe names (default: all)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--fast", action="store_true", help="the small classifier (smoke runs only)")
    ap.add_argument("-o", "--output", required=True, help="JSON file (written after every probe)")
    a = ap.parse_args(argv)
    out = Path(a.output)
    if out.exists():
        print(f"error: {out} exists", file=sys.stderr)
        return 2
    geo = get_geometry(a.geometry)
    grid = geo.grid_shape
    L, _, R = grid
    splits = {"layers": [(0, 5), (6, 14), (15, 24), (25, L - 1)], "radii": [(0, 1), (2, 4), (5, R - 1)]}
    e_r, s_r = _load(a.reference, geo, a.n)
    e_g, s_g = _load(a.generated, geo, a.n)
    cfg = FAST if a.fast else FULL
    only = set(filter(None, a.only.split(",")))
    result = {"generated": a.generated, "reference": a.reference, "floor": a.floor, "events": len(e_r),
              "classifier": "fast" if a.fast else "full", "grain": {"reference": grain_stats(e_r, s_r, grid),
                                                                  "generated": grain_stats(e_g, s_g, grid)}, "probes": {}}
    pairs = [(name, x_g, x_r, e_g) for (name, x_g), x_r in zip(_views(e_g, s_g, grid, splits).items(),
                                                                _views(e_r, s_r, grid, splits).values())]
    if a.floor:
        e_f, s_f = _load(a.floor, geo, a.n)
        result["grain"]["floor"] = grain_stats(e_f, s_f, grid)
        low_r = pairs[0][2]
        pairs.append(("floor", np.concatenate([np.log10(e_f)[:, None], s_f / e_f[:, None]], 1), low_r, e_f))
        for k, sig in enumerate(float(x) for x in a.jitters.split(",") if x):
            j = jitter(s_f, grid, sig, geo.threshold_mev, seed=k)
            result["grain"][f"floor-jitter {sig:g}"] = grain_stats(e_f, j, grid)
            pairs.append((f"floor-jitter {sig:g}", np.concatenate([np.log10(e_f)[:, None], j / e_f[:, None]], 1), low_r, e_f))
    for name, x_g, x_r, e0 in pairs:
        if only and name not in only:
            continue
        t = time.perf_counter()
        groups = (energy_groups(e0), energy_groups(e_r))
        res = classifier_test(x_g, x_r, cfg, a.device, name=name, groups=groups)
        names = group_names(groups[1])
        result["probes"][name] = {"auc": res["auc"], "dims": int(x_g.shape[1]), "seconds": round(time.perf_counter() - t, 1),
                                  "by_energy": {names[int(k)]: round(v["auc"], 4) for k, v in res["auc_by_group"].items()}}
        print(f"{name:18s} AUC {res['auc']:.4f}  " + "  ".join(f"{k}: {v}" for k, v in result["probes"][name]["by_energy"].items()),
              flush=True)
        _write(out, result)
    _write(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
