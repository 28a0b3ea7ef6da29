"""CaloChallenge HDF5 files: validated, streaming reads and atomic, chunked writes.

Layout (CaloChallenge README; `evaluate.py: check_file`): two datasets, gzip-compressed,
``incident_energies`` [N, 1] and ``showers`` [N, n_voxels], both in MeV, voxels in the flat
CaloChallenge order of `geometry.py`. Readers accept float32 and float64; calofast writes float32.

Every problem is reported as a `ShowerFileError` (a ValueError) naming the file and what is wrong.
Writes go to a temporary file beside the target and are renamed on success, so an interrupted
write never leaves a half file under the final name; an existing file is kept unless `force`.
"""
from __future__ import annotations

import glob
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from .geometry import Geometry, geometry_for_voxels

__all__ = ["claim_output", "ShowerFileError", "ShowerFileInfo", "inspect_file", "iter_showers", "read_showers", "read_energies",
           "ShowerWriter", "write_showers", "check_values", "file_attrs", "hdf5_unusable"]

ENERGIES, SHOWERS = "incident_energies", "showers"
# Free space a write keeps in hand for HDF5's metadata, chunk index and final flush: HDF5 cannot close a file whose
# write failed (its close raises, and the interpreter then crashes in HDF5's clean-up at exit), so a ShowerWriter
# stops before the disk is full instead of letting HDF5 find out.
SPACE_MARGIN = 16 * 2**20
_HDF5_BROKEN = False


def hdf5_unusable() -> bool:
    """True once an HDF5 write has failed in this process: HDF5's state is then damaged, and the process should end
    with os._exit (the command line does) rather than run HDF5's clean-up, which crashes."""
    return _HDF5_BROKEN


def claim_output(path: Path, force: bool, error: type[Exception] = ValueError) -> None:
    """Refuse, before any work, an output that exists and is not a regular file (even with force), or that
    exists at all (without force)."""
    if path.is_symlink() or (path.exists() and not path.is_file()):   # a link, even a dangling one, is not replaced
        raise error(f"{path}: exists and is not a regular file; refusing to replace it "
                    "(--force only overwrites regular files)")
    if path.exists() and not force:
        raise error(f"{path}: exists already; refusing to overwrite (use --force)")


def claim_folder(path: Path) -> None:
    """Refuse, before any work, an output folder whose path is taken by something else (a file, a link to one)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a folder; choose another output folder")


def temporary_for(path: Path) -> Path:
    """The temporary a write to `path` goes through (`.NAME.PID.tmp` beside it, renamed at the end). Temporaries of
    `path` that a killed calofast left behind (their process no longer runs on this machine) are removed first, so
    that a SIGKILL or a power cut strands nothing for longer than the next run."""
    for old in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = old.name[len(path.name) + 2:-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            old.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # another user's process: alive
        return True
    return True


class ShowerFileError(ValueError):
    """A CaloChallenge file that cannot be used, with the file named in the message."""


@dataclass(frozen=True)
class ShowerFileInfo:
    path: Path
    n_events: int
    n_voxels: int
    dtype: np.dtype

    def geometry(self) -> Geometry:
        try:
            return geometry_for_voxels(self.n_voxels)
        except ValueError as err:
            raise ShowerFileError(f"{self.path}: {err}") from None


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise ShowerFileError(f"{path}: no such file")
    if path.is_dir():
        raise ShowerFileError(f"{path}: is a directory, not an HDF5 file")
    if not h5py.is_hdf5(path):
        raise ShowerFileError(f"{path}: not an HDF5 file (no HDF5 signature)")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ShowerFileError(f"{path}: cannot open HDF5 file, truncated or corrupt ({err})") from None


def inspect_file(path: "str | Path", geometry: Geometry | None = None) -> ShowerFileInfo:
    """Check the structure of a CaloChallenge file (datasets, shapes, counts) without reading data."""
    path = Path(path)
    with _open(path) as f:
        for name in (ENERGIES, SHOWERS):
            if name not in f:
                raise ShowerFileError(f"{path}: missing dataset '{name}' (found: {', '.join(f.keys()) or 'nothing'})")
            if not isinstance(f[name], h5py.Dataset):
                raise ShowerFileError(f"{path}: '{name}' is a group, not a dataset")
        e, s = f[ENERGIES], f[SHOWERS]
        if s.ndim != 2:
            raise ShowerFileError(f"{path}: 'showers' must be 2-D [N, voxels], has shape {s.shape}")
        if e.ndim not in (1, 2) or (e.ndim == 2 and e.shape[1] != 1):
            raise ShowerFileError(f"{path}: 'incident_energies' must be [N, 1], has shape {e.shape}")
        if e.shape[0] != s.shape[0]:
            raise ShowerFileError(f"{path}: {e.shape[0]} incident energies but {s.shape[0]} showers")
        for name, ds in ((ENERGIES, e), (SHOWERS, s)):
            if ds.dtype.kind != "f":
                raise ShowerFileError(f"{path}: '{name}' has dtype {ds.dtype}, expected floating point")
        for name, ds in ((ENERGIES, e), (SHOWERS, s)):
            if gap := _unwritten(ds):
                raise ShowerFileError(f"{path}: '{name}' declares {ds.shape[0]:,} events but {gap} (an unfinished "
                                      "or forged file: its missing values would read as fill values)")
        info = ShowerFileInfo(path, int(s.shape[0]), int(s.shape[1]), s.dtype)
    if info.n_events == 0:
        raise ShowerFileError(f"{path}: holds no events")
    if geometry is not None and info.n_voxels != geometry.n_voxels:
        raise ShowerFileError(f"{path}: {info.n_voxels} voxels per shower, but geometry "
                              f"{geometry.name} has {geometry.n_voxels}")
    return info


def _unwritten(ds: h5py.Dataset) -> str | None:
    """What part of a dataset was never written (HDF5 allocates storage only for what is written), or None: every
    chunk of a chunked dataset is stored, and a contiguous one has its whole size on disk."""
    if ds.size == 0:
        return None
    if ds.chunks is None:
        stored, full = ds.id.get_storage_size(), ds.size * ds.dtype.itemsize
        return None if stored >= full else f"stores {stored:,} of its {full:,} bytes"
    chunks = math.prod(-(-n // c) for n, c in zip(ds.shape, ds.chunks))
    stored = ds.id.get_num_chunks()
    return None if stored >= chunks else f"stores {stored:,} of its {chunks:,} chunks"


def _plain(value):
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


def file_attrs(path: "str | Path") -> dict:
    """The file's attributes (calofast writes model, sampler, steps, seed, nfe, clipped_showers) as plain values."""
    with _open(Path(path)) as f:
        return {k: _plain(v) for k, v in f.attrs.items()}


def check_values(path: "str | Path", energies: np.ndarray, showers: np.ndarray, first: int = 0) -> None:
    """Raise a ShowerFileError for NaN/inf, negative voxel energies or non-positive incident energies."""
    def where(mask: np.ndarray) -> str:
        rows = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)) + first
        return f"event {rows[0]}" + (f" and {len(rows) - 1} more" if len(rows) > 1 else "")

    if not np.all(np.isfinite(energies)):
        raise ShowerFileError(f"{path}: non-finite incident energy at {where(~np.isfinite(energies))}")
    if np.any(energies <= 0):
        raise ShowerFileError(f"{path}: non-positive incident energy at {where(energies <= 0)}")
    finite = np.isfinite(showers)
    if not finite.all():
        raise ShowerFileError(f"{path}: NaN or inf voxel energy at {where(~finite)}")
    if np.any(showers < 0):
        raise ShowerFileError(f"{path}: negative voxel energy at {where(showers < 0)}")


def iter_showers(path: "str | Path", batch_size: int = 10_000, *, geometry: Geometry | None = None,
                 start: int = 0, stop: int | None = None, validate: bool = True
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (incident_energies [b] MeV, showers [b, V] MeV) float32 batches, never the whole file.

    Memory stays at about one batch (plus HDF5's chunk cache) whatever the file size.
    """
    path = Path(path)
    info = inspect_file(path, geometry)
    stop = info.n_events if stop is None else min(stop, info.n_events)
    with _open(path) as f:
        e_ds, s_ds = f[ENERGIES], f[SHOWERS]
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            try:
                energies = np.asarray(e_ds[lo:hi], dtype=np.float32).reshape(-1)
                showers = np.asarray(s_ds[lo:hi], dtype=np.float32)
            except (OSError, RuntimeError) as err:
                raise ShowerFileError(f"{path}: cannot read events {lo}-{hi}, file truncated or corrupt ({err})") from None
            if validate:
                check_values(path, energies, showers, first=lo)
            yield energies, showers


def read_energies(path: "str | Path", stop: int | None = None) -> np.ndarray:
    """The first `stop` incident energies [N] (MeV, float64) alone, checked finite and positive: what
    `--energies-from` needs, without reading a single shower."""
    path = Path(path)
    info = inspect_file(path)
    stop = info.n_events if stop is None else min(stop, info.n_events)
    with _open(path) as f:
        try:
            energies = np.asarray(f[ENERGIES][:stop], dtype=np.float64).reshape(-1)
        except (OSError, RuntimeError) as err:
            raise ShowerFileError(f"{path}: cannot read the incident energies, file truncated or corrupt ({err})") from None
    if not np.all(np.isfinite(energies)) or np.any(energies <= 0):
        bad = np.flatnonzero(~np.isfinite(energies) | (energies <= 0))
        raise ShowerFileError(f"{path}: incident energy {energies[bad[0]]} at event {bad[0]} is not a positive number")
    return energies


def read_showers(path: "str | Path", *, geometry: Geometry | None = None, start: int = 0,
                 stop: int | None = None, validate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read events [start, stop) into memory: (incident_energies [N], showers [N, V]), float32 MeV."""
    parts = list(iter_showers(path, 50_000, geometry=geometry, start=start, stop=stop, validate=validate))
    if not parts:
        raise ShowerFileError(f"{path}: no events in range [{start}, {stop})")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class ShowerWriter:
    """Append batches to a new CaloChallenge file; the file appears under its name only on `close()`.

    Use as a context manager: an exception inside the block removes the temporary file and leaves any
    existing file untouched.
    """

    def __init__(self, path: "str | Path", n_voxels: int, *, force: bool = False,
                 chunk_rows: int = 256, compression_level: int = 4, attrs: dict | None = None):
        self.path = Path(path)
        claim_output(self.path, force, ShowerFileError)
        self.n_voxels, self.n, self._done = n_voxels, 0, False
        self._check_space(0, "a new file needs")          # before its folder is made: a refused file leaves none
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_for(self.path)
        self._f = h5py.File(self.tmp, "w")
        # Level 0: no compression (scratch files; official files are gzip-compressed).
        gz = dict(compression="gzip", compression_opts=compression_level) if compression_level else {}
        self._e = self._f.create_dataset(ENERGIES, (0, 1), maxshape=(None, 1), dtype="f4", chunks=(4096, 1), **gz)
        self._s = self._f.create_dataset(SHOWERS, (0, n_voxels), maxshape=(None, n_voxels), dtype="f4",
                                         chunks=(max(1, min(chunk_rows, 2**20 // n_voxels)), n_voxels), **gz)
        self.attrs = self._f.attrs              # file attributes; may be updated until close()
        self.attrs.update(attrs or {})

    def write(self, energies: np.ndarray, showers: np.ndarray) -> None:
        energies = np.asarray(energies, dtype=np.float32).reshape(-1, 1)
        showers = np.asarray(showers, dtype=np.float32)
        if showers.ndim != 2 or showers.shape[1] != self.n_voxels or showers.shape[0] != energies.shape[0]:
            raise ValueError(f"{self.path}: batch shapes {energies.shape}, {showers.shape} do not fit "
                             f"[N, 1], [N, {self.n_voxels}]")
        check_values(self.path, energies, showers, first=self.n)
        nbytes = energies.nbytes + showers.nbytes
        self._check_space(nbytes, f"the next {energies.shape[0]} showers need up to {nbytes / 1e6:.1f} MB plus")
        lo, hi = self.n, self.n + energies.shape[0]
        try:
            self._e.resize(hi, axis=0)
            self._s.resize(hi, axis=0)
            self._e[lo:hi] = energies
            self._s[lo:hi] = showers
        except (OSError, RuntimeError) as err:
            raise self._failed(err) from None
        self.n = hi

    def _check_space(self, nbytes: int, what: str) -> None:
        """Refuse a batch that could fill the disk (its uncompressed size bounds what it adds), before HDF5 writes."""
        where = next(p for p in self.path.absolute().parents if p.is_dir())      # the folder, or what will hold it
        free = shutil.disk_usage(where).free
        if free < nbytes + SPACE_MARGIN:
            raise ShowerFileError(f"{self.path}: not enough disk space: {free / 1e6:.1f} MB free, {what} "
                                  f"{SPACE_MARGIN // 2**20} MiB in hand (nothing was written under this name)")

    def _failed(self, err: Exception) -> ShowerFileError:
        """A write HDF5 could not do, as one line naming the file (its temporary is removed)."""
        global _HDF5_BROKEN
        _HDF5_BROKEN = True
        found = re.search(r"error message = '([^']*)'", str(err))
        reason = os.strerror(err.errno) if getattr(err, "errno", None) else (
            found.group(1) if found else str(err).splitlines()[0][:200])
        self.abort()
        return ShowerFileError(f"{self.path}: cannot write it ({reason}); nothing was written under this name")

    def close(self) -> Path:
        """Finish the file and move it to its final name (atomic rename)."""
        try:
            self._f.flush()
            self._f.close()
        except (OSError, RuntimeError) as err:
            raise self._failed(err) from None
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        self._done = True
        return self.path

    def abort(self) -> None:
        global _HDF5_BROKEN
        if self._done:
            return
        self._done = True
        try:
            self._f.close()
        except (OSError, RuntimeError):     # a file whose write failed cannot be closed; it is removed all the same
            _HDF5_BROKEN = True
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShowerWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_showers(path: "str | Path", energies: np.ndarray, showers: np.ndarray, *, force: bool = False,
                  attrs: dict | None = None) -> Path:
    """Write one in-memory set of showers as a CaloChallenge file (atomically)."""
    with ShowerWriter(path, np.asarray(showers).shape[1], force=force, attrs=attrs) as w:
        w.write(energies, showers)
    return w.path
