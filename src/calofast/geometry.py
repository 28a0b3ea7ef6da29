"""Calorimeter geometries: the layered cylindrical voxelisation of the CaloChallenge.

One `Geometry` describes, per layer, the radial bin edges (mm) and the number of angular (alpha)
bins, plus what the GFlash generator needs (layer depth, absorber/active materials) and the
evaluation voxel threshold. It defines the tensor layout once:

* flat CaloChallenge order: layer (slowest), alpha bin, radial bin (fastest), layers in XML order;
* grid tensor ``[B, 1, L, A, R]`` for regular geometries (DS2, DS3);
* Par04 cell order (r, phi, z; z fastest), a pure axis transpose of the grid.

The four built-in presets carry the official bin edges as our own data (CaloChallenge
arXiv:2410.21611, binning XMLs of CaloChallenge/homepage commit 9b41df7); `parse_binning_xml` reads
the official XML files with a hardened parser.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

__all__ = ["Layer", "SamplingMaterial", "Geometry", "PRESETS", "get_geometry", "parse_binning_xml",
           "geometry_for_voxels", "check_layers"]

MAX_BINS = 10_000          # layers, angular bins or radial edges of one layer: more is a damaged file, not a detector
MAX_VOXELS = 2_000_000     # DS3 has 40,500


@dataclass(frozen=True)
class Layer:
    """One readout layer. `r_edges` in mm; an empty tuple means the layer has no voxels."""

    id: int
    r_edges: tuple[float, ...]
    n_alpha: int

    @property
    def n_r(self) -> int:
        return max(len(self.r_edges) - 1, 0)

    @property
    def n_voxels(self) -> int:
        return self.n_r * self.n_alpha


def check_layers(layers: "tuple[Layer, ...]", where: str) -> None:
    """Refuse bins that are not a detector (one line naming `where`): 1..MAX_BINS layers, angular bins and radial
    edges per layer, edges finite, >= 0 and increasing, 1..MAX_VOXELS voxels in all."""
    if not 1 <= len(layers) <= MAX_BINS:
        raise ValueError(f"{where}: {len(layers)} layers; expected 1 to {MAX_BINS}")
    for l in layers:
        e = l.r_edges
        ok = (isinstance(l.n_alpha, int) and 1 <= l.n_alpha <= MAX_BINS and len(e) <= MAX_BINS + 1
              and all(isinstance(v, (int, float)) and math.isfinite(v) for v in e)
              and (not e or e[0] >= 0) and all(b > a for a, b in zip(e, e[1:])))
        if not ok:
            shown = ", ".join(str(v) for v in e[:6]) + (", ..." if len(e) > 6 else "")
            raise ValueError(f"{where}: layer {l.id} has invalid bins (n_bin_alpha={l.n_alpha}, r_edges [{shown}]; "
                             f"expected 1 to {MAX_BINS} angular bins and finite, non-negative, increasing edges)")
    n = sum(l.n_voxels for l in layers)
    if not 1 <= n <= MAX_VOXELS:
        raise ValueError(f"{where}: {n} voxels; expected 1 to {MAX_VOXELS:,}")


@dataclass(frozen=True)
class SamplingMaterial:
    """A sampling calorimeter layer structure: absorber then active slab, repeated per readout layer."""

    absorber: str = "W"          # key of gflash.MATERIALS
    absorber_mm: float = 1.4
    active: str = "Si"
    active_mm: float = 0.3
    pairs_per_layer: int = 2     # physical absorber/active pairs per readout layer


@dataclass(frozen=True)
class Geometry:
    """A layered cylindrical voxelisation (CaloChallenge binning) plus its physical description."""

    name: str
    particle: str                               # 'photon', 'pion' or 'electron' (the XML Bin name)
    layers: tuple[Layer, ...]                   # every listed layer, empty ones included
    threshold_mev: float                        # evaluation voxel threshold
    layer_thickness_mm: float | None = None     # None: no physical depth known (DS1)
    material: SamplingMaterial | None = None    # None: GFlash cannot simulate it

    # ---------------------------------------------------------------- sizes and offsets
    @property
    def n_voxels(self) -> int:
        return sum(layer.n_voxels for layer in self.layers)

    @cached_property
    def layer_offsets(self) -> np.ndarray:
        """Flat start index of every listed layer, plus the total at the end."""
        return np.concatenate([[0], np.cumsum([layer.n_voxels for layer in self.layers])]).astype(np.int64)

    @property
    def relevant_layers(self) -> list[int]:
        """Positions (in `layers`) of the layers that hold voxels."""
        return [i for i, layer in enumerate(self.layers) if layer.n_r > 0]

    @property
    def alpha_layers(self) -> list[int]:
        """Positions of the layers with more than one angular bin (they get eta/phi features)."""
        return [i for i, layer in enumerate(self.layers) if layer.n_r > 0 and layer.n_alpha > 1]

    @property
    def is_regular(self) -> bool:
        first = self.layers[0]
        return first.n_r > 0 and all(l.r_edges == first.r_edges and l.n_alpha == first.n_alpha
                                     for l in self.layers)

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """(L, A, R) of a regular geometry."""
        self._require_regular("a grid tensor")
        return (len(self.layers), self.layers[0].n_alpha, self.layers[0].n_r)

    def _require_regular(self, what: str) -> None:
        if not self.is_regular:
            raise ValueError(f"geometry {self.name!r} has irregular layers (different radial or angular "
                             f"binning per layer); {what} needs a regular geometry such as ds2 or ds3")

    # ---------------------------------------------------------------- per-voxel coordinates
    @cached_property
    def voxel_index(self) -> np.ndarray:
        """[V, 3] int array: (layer position, alpha bin, radial bin) of every flat voxel."""
        rows = []
        for pos, layer in enumerate(self.layers):
            if layer.n_voxels == 0:
                continue
            j, i = np.divmod(np.arange(layer.n_voxels), layer.n_r)
            rows.append(np.stack([np.full_like(i, pos), j, i], axis=1))
        return np.concatenate(rows).astype(np.int64)

    def flat_index(self, layer: np.ndarray, alpha: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Flat voxel index of (layer position, alpha bin, radial bin); the inverse of `voxel_index`."""
        layer, alpha, r = (np.asarray(a, dtype=np.int64) for a in (layer, alpha, r))
        n_r = np.array([l.n_r for l in self.layers])[layer]
        n_a = np.array([l.n_alpha for l in self.layers])[layer]
        if np.any((r < 0) | (r >= n_r) | (alpha < 0) | (alpha >= n_a)):
            raise ValueError("voxel coordinates out of range for geometry " + self.name)
        return self.layer_offsets[layer] + alpha * n_r + r

    @cached_property
    def voxel_r(self) -> np.ndarray:
        """[V] radial bin centre in mm."""
        return self._per_voxel(lambda layer, j, i: 0.5 * (np.asarray(layer.r_edges)[i] + np.asarray(layer.r_edges)[i + 1]))

    @cached_property
    def voxel_alpha(self) -> np.ndarray:
        """[V] angular bin centre in rad: midpoints of linspace(-pi, pi, n_alpha + 1)."""
        def centre(layer: Layer, j: np.ndarray, i: np.ndarray) -> np.ndarray:
            edges = np.linspace(-math.pi, math.pi, layer.n_alpha + 1)
            return 0.5 * (edges[j] + edges[j + 1])
        return self._per_voxel(centre)

    @property
    def voxel_x(self) -> np.ndarray:
        """[V] x = r cos(alpha), mm: the CaloChallenge code's "eta" coordinate."""
        return self.voxel_r * np.cos(self.voxel_alpha)

    @property
    def voxel_y(self) -> np.ndarray:
        """[V] y = r sin(alpha), mm: the CaloChallenge code's "phi" coordinate."""
        return self.voxel_r * np.sin(self.voxel_alpha)

    def _per_voxel(self, fn) -> np.ndarray:
        out = np.empty(self.n_voxels)
        for pos, layer in enumerate(self.layers):
            if layer.n_voxels == 0:
                continue
            j, i = np.divmod(np.arange(layer.n_voxels), layer.n_r)
            lo, hi = self.layer_offsets[pos], self.layer_offsets[pos + 1]
            out[lo:hi] = fn(layer, j, i)
        return out

    @property
    def layer_z_mm(self) -> np.ndarray:
        """[L] depth of each layer's centre (regular Par04 geometries)."""
        if self.layer_thickness_mm is None:
            raise ValueError(f"geometry {self.name!r} has no layer thickness")
        return (np.arange(len(self.layers)) + 0.5) * self.layer_thickness_mm

    # ---------------------------------------------------------------- layouts
    def to_grid(self, flat: torch.Tensor) -> torch.Tensor:
        """[B, V] -> [B, 1, L, A, R]."""
        L, A, R = self.grid_shape
        if flat.shape[-1] != self.n_voxels:
            raise ValueError(f"expected {self.n_voxels} voxels for {self.name}, got {flat.shape[-1]}")
        return flat.reshape(flat.shape[0], 1, L, A, R)

    def to_flat(self, grid: torch.Tensor) -> torch.Tensor:
        """[B, 1, L, A, R] -> [B, V]."""
        self._require_regular("a grid tensor")
        return grid.reshape(grid.shape[0], self.n_voxels)

    def to_par04(self, flat):
        """CaloChallenge order (z, alpha, r; r fastest) -> Par04 order (r, phi, z; z fastest).

        Works on numpy arrays and torch tensors of shape [B, V]; a pure transpose, no energy scale.
        """
        L, A, R = self.grid_shape
        grid = flat.reshape(flat.shape[0], L, A, R)
        out = grid.transpose(0, 3, 2, 1) if isinstance(grid, np.ndarray) else grid.permute(0, 3, 2, 1)
        return out.reshape(flat.shape[0], -1)

    def from_par04(self, flat):
        """Par04 order (r, phi, z; z fastest) -> CaloChallenge order (z, alpha, r; r fastest)."""
        L, A, R = self.grid_shape
        grid = flat.reshape(flat.shape[0], R, A, L)
        out = grid.transpose(0, 3, 2, 1) if isinstance(grid, np.ndarray) else grid.permute(0, 3, 2, 1)
        return out.reshape(flat.shape[0], -1)

    def same_binning(self, other: "Geometry") -> bool:
        return self.layers == other.layers


# ---------------------------------------------------------------------- built-in presets
# Bin edges as published in the CaloChallenge binning files (our own copy of the numbers).
_EMPTY: tuple[float, ...] = ()
_DS1_PHOTON_BINS = {
    0: ((0, 5, 10, 30, 50, 100, 200, 400, 600), 1),
    1: ((0, 2, 4, 6, 8, 10, 12, 15, 20, 30, 40, 50, 70, 90, 120, 150, 200), 10),
    2: ((0, 2, 5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 130, 160, 200, 250, 300, 350, 400), 10),
    3: ((0, 50, 100, 200, 400, 600), 1),
    12: ((0, 100, 200, 400, 1000, 2000), 1),
}
_DS1_PION_BINS = {
    0: ((0, 5, 10, 30, 50, 100, 200, 400, 600), 1),
    1: ((0, 1, 4, 7, 10, 15, 30, 50, 90, 150, 200), 10),
    2: ((0, 5, 10, 20, 30, 50, 80, 130, 200, 300, 400), 10),
    3: ((0, 50, 100, 200, 400, 600), 1),
    12: ((0, 10, 20, 30, 50, 80, 100, 130, 160, 200, 250, 300, 350, 400, 1000, 2000), 10),
    13: ((0, 10, 20, 30, 50, 80, 100, 130, 160, 200, 250, 300, 350, 400, 600, 1000, 2000), 10),
    14: ((0, 50, 100, 150, 200, 250, 300, 400, 600, 1000, 2000), 1),
}
_DS2_R = (0.0, 4.65, 9.3, 13.95, 18.6, 23.25, 27.9, 32.55, 37.2, 41.85)
_DS3_R = (0.0, 2.325, 4.65, 6.975, 9.3, 11.625, 13.95, 16.275, 18.6, 20.925, 23.25, 25.575, 27.9,
          30.225, 32.55, 34.875, 37.2, 39.525, 41.85)
_PAR04_THRESHOLD_MEV = 0.5e-3 / 0.033   # 0.5 keV in silicon, on the 1/0.033 scale of DS2/DS3
_PAR04_LAYER_MM = 3.4                    # two W(1.4 mm)/Si(0.3 mm) pairs


def _ds1(name: str, particle: str, bins: dict[int, tuple[tuple[float, ...], int]]) -> Geometry:
    layers = tuple(Layer(i, tuple(float(e) for e in bins[i][0]), bins[i][1]) if i in bins
                   else Layer(i, _EMPTY, 1) for i in range(24))
    return Geometry(name, particle, layers, threshold_mev=1.0)


def _par04(name: str, r_edges: tuple[float, ...], n_alpha: int) -> Geometry:
    return Geometry(name, "electron", tuple(Layer(i, r_edges, n_alpha) for i in range(45)),
                    threshold_mev=_PAR04_THRESHOLD_MEV, layer_thickness_mm=_PAR04_LAYER_MM,
                    material=SamplingMaterial())


PRESETS: dict[str, Geometry] = {
    "ds1-photons": _ds1("ds1-photons", "photon", _DS1_PHOTON_BINS),
    "ds1-pions": _ds1("ds1-pions", "pion", _DS1_PION_BINS),
    "ds2": _par04("ds2", _DS2_R, 16),
    "ds3": _par04("ds3", _DS3_R, 50),
}


def geometry_for_voxels(n_voxels: int) -> Geometry:
    """The preset whose voxel count is `n_voxels` (368, 533, 6480, 40500)."""
    for geo in PRESETS.values():
        if geo.n_voxels == n_voxels:
            return geo
    raise ValueError(f"no built-in geometry has {n_voxels} voxels (known: "
                     + ", ".join(f"{k}={g.n_voxels}" for k, g in PRESETS.items()) + ")")


def get_geometry(spec: "str | Path | Geometry", particle: str | None = None) -> Geometry:
    """A preset name (`ds2`), or the path of a CaloChallenge binning XML.

    An XML whose bins equal a preset's yields that preset (with its physical description);
    any other XML yields a binning-only geometry (no material, so GFlash cannot simulate it).
    """
    if isinstance(spec, Geometry):
        return spec
    key = str(spec).lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(spec)
    if path.suffix.lower() != ".xml":
        raise ValueError(f"unknown geometry {str(spec)!r}: use one of {', '.join(PRESETS)} or a binning .xml file")
    parsed = parse_binning_xml(path, particle)
    for geo in PRESETS.values():
        if geo.particle == parsed.particle and geo.same_binning(parsed):
            return geo
    return parsed


def parse_binning_xml(path: "str | Path", particle: str | None = None) -> Geometry:
    """Read an official CaloChallenge binning XML (`<Bins><Bin name=..><Layer id r_edges n_bin_alpha/>`).

    Uses defusedxml: DTDs, entity declarations and external references are refused, so a hostile
    file (billion laughs, external entities) raises instead of expanding.
    """
    import defusedxml.ElementTree as DET
    from defusedxml import DefusedXmlException
    from xml.etree.ElementTree import ParseError

    path = Path(path)
    try:
        root = DET.parse(path, forbid_dtd=True, forbid_entities=True, forbid_external=True).getroot()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such binning file") from None
    except DefusedXmlException as err:
        raise ValueError(f"{path}: refused unsafe XML ({type(err).__name__}: DTDs and entities are not allowed)") from None
    except ParseError as err:
        raise ValueError(f"{path}: not a well-formed XML file ({err})") from None
    if root.tag != "Bins":
        raise ValueError(f"{path}: root element is <{root.tag}>, expected <Bins>")
    bins = root.findall("Bin")
    if not bins:
        raise ValueError(f"{path}: no <Bin> element")
    if particle is None:
        if len(bins) > 1:
            raise ValueError(f"{path}: holds several particles ({', '.join(b.get('name', '?') for b in bins)}); choose one")
        chosen = bins[0]
    else:
        matches = [b for b in bins if b.get("name") == particle]
        if not matches:
            raise ValueError(f"{path}: no <Bin name=\"{particle}\">")
        chosen = matches[0]
    layers = []
    for el in chosen.findall("Layer"):
        try:
            lid = int(el.get("id"))
            edges = tuple(float(e) for e in el.get("r_edges").split(","))
            n_alpha = int(el.get("n_bin_alpha"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: malformed <Layer> {el.attrib}: {err}") from None
        if len(edges) < 2:
            edges = _EMPTY
        layers.append(Layer(lid, edges, n_alpha))
    if not layers:
        raise ValueError(f"{path}: <Bin name=\"{chosen.get('name')}\"> has no <Layer>")
    check_layers(tuple(layers), str(path))
    name = chosen.get("name", "unknown")
    return Geometry(f"{path.name}:{name}", name, tuple(layers),
                    threshold_mev=_PAR04_THRESHOLD_MEV if name == "electron" else 1.0)
