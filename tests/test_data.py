import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from calofast.data import ShowerFileError, ShowerWriter, inspect_file, iter_showers, read_showers, write_showers
from calofast.geometry import PRESETS

DS2 = PRESETS["ds2"]


def _sample(n=50, v=6480, seed=0):
    rng = np.random.default_rng(seed)
    showers = rng.exponential(1.0, (n, v)).astype(np.float32) * (rng.random((n, v)) < 0.2)
    return rng.uniform(1e3, 1e6, n).astype(np.float32), showers


def _raw_file(path, energies, showers):
    with h5py.File(path, "w") as f:
        f.create_dataset("incident_energies", data=energies)
        f.create_dataset("showers", data=showers)
    return path


def test_roundtrip_official_layout(tmp_path):
    e, s = _sample()
    p = write_showers(tmp_path / "a.h5", e, s)
    with h5py.File(p) as f:
        assert f["incident_energies"].shape == (50, 1) and f["showers"].shape == (50, 6480)
        assert f["showers"].compression == "gzip" and f["showers"].dtype == np.float32
    e2, s2 = read_showers(p, geometry=DS2)
    np.testing.assert_array_equal(e2, e)
    np.testing.assert_array_equal(s2, s)
    # Official files may hold float64 and 1-D energies: both are accepted.
    _raw_file(tmp_path / "b.h5", e.astype(np.float64)[:, None], s.astype(np.float64))
    np.testing.assert_array_equal(read_showers(tmp_path / "b.h5")[1], s)


def test_streaming_in_batches_equals_whole(tmp_path):
    e, s = _sample(n=103)
    p = write_showers(tmp_path / "a.h5", e, s)
    batches = list(iter_showers(p, batch_size=25))
    assert [len(b[0]) for b in batches] == [25, 25, 25, 25, 3]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), s)
    part = read_showers(p, start=10, stop=20)[1]
    np.testing.assert_array_equal(part, s[10:20])


def test_refuses_overwrite_and_force(tmp_path):
    e, s = _sample(n=5)
    p = write_showers(tmp_path / "a.h5", e, s)
    with pytest.raises(ShowerFileError, match="refusing to overwrite"):
        write_showers(p, e, s * 2)
    np.testing.assert_array_equal(read_showers(p)[1], s)        # untouched
    write_showers(p, e, s * 2, force=True)
    np.testing.assert_array_equal(read_showers(p)[1], s * 2)


def test_interrupted_write_leaves_no_file(tmp_path):
    e, s = _sample(n=5)
    target = tmp_path / "a.h5"
    with pytest.raises(RuntimeError):
        with ShowerWriter(target, 6480) as w:
            w.write(e, s)
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    # An existing file survives a failed overwrite.
    write_showers(target, e, s)
    with pytest.raises(RuntimeError):
        with ShowerWriter(target, 6480, force=True) as w:
            raise RuntimeError("killed")
    np.testing.assert_array_equal(read_showers(target)[1], s)


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    """A SIGKILL strands `.NAME.PID.tmp`; the next write to NAME removes it unless its process still runs."""
    e, s = _sample(n=5)
    dead = 2 ** 22 + 12345                              # above Linux's default pid_max: no such process
    stale, live = tmp_path / f".a.h5.{dead}.tmp", tmp_path / f".a.h5.{os.getppid()}.tmp"
    other = tmp_path / f".b.h5.{dead}.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"x" * 96)
    write_showers(tmp_path / "a.h5", e, s)
    assert not stale.exists() and live.exists() and other.exists()    # only a.h5's, only a dead process's


def test_sigterm_removes_the_partial_output(tmp_path):
    """SIGTERM during a long write: exit 143, one line, no file under the name and no temporary left."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = tmp_path / "g.h5"
    proc = subprocess.Popen([sys.executable, "-m", "calofast", "gflash", "--geometry", "ds2", "--n", "2000000",
                             "--workers", "1", "--chunk", "500", "-o", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".g.h5.*.tmp")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".g.h5.*.tmp")), "the temporary never appeared"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143
    last = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("calofast:")]
    assert last == ["calofast: interrupted (SIGTERM); no partial output was kept"], err[-500:]
    assert list(tmp_path.iterdir()) == []


def test_not_hdf5_and_truncated(tmp_path):
    bad = tmp_path / "text.h5"
    bad.write_text("hello")
    with pytest.raises(ShowerFileError, match="not an HDF5 file"):
        inspect_file(bad)
    with pytest.raises(ShowerFileError, match="no such file"):
        inspect_file(tmp_path / "none.h5")
    e, s = _sample(n=200)
    p = write_showers(tmp_path / "a.h5", e, s)
    data = p.read_bytes()
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShowerFileError, match="truncated or corrupt"):
        read_showers(trunc)


@pytest.mark.parametrize("case, match", [
    ("missing", "missing dataset 'showers'"),
    ("n_mismatch", "10 incident energies but 9 showers"),
    ("voxels", "6000 voxels per shower, but geometry ds2 has 6480"),
    ("nan", "NaN or inf voxel energy at event 3"),
    ("negative", "negative voxel energy at event 4"),
    ("zero_energy", "non-positive incident energy at event 2"),
    ("inf_energy", "non-finite incident energy at event 1"),
])
def test_validation_errors_name_file_and_problem(tmp_path, case, match):
    e, s = _sample(n=10)
    e = e[:, None].astype(np.float64)
    p = tmp_path / f"{case}.h5"
    if case == "missing":
        with h5py.File(p, "w") as f:
            f.create_dataset("incident_energies", data=e)
    elif case == "n_mismatch":
        _raw_file(p, e, s[:9])
    elif case == "voxels":
        _raw_file(p, e, s[:, :6000])
    else:
        if case == "nan":
            s[3, 7] = np.nan
        elif case == "negative":
            s[4, 0] = -1.0
        elif case == "zero_energy":
            e[2] = 0.0
        elif case == "inf_energy":
            e[1] = np.inf
        _raw_file(p, e, s)
    with pytest.raises(ShowerFileError) as info:
        read_showers(p, geometry=DS2)
    assert str(p) in str(info.value) and match in str(info.value)


def test_writer_rejects_bad_values(tmp_path):
    e, s = _sample(n=3)
    s[1, 1] = -5
    with pytest.raises(ShowerFileError, match="negative"):
        write_showers(tmp_path / "x.h5", e, s)
    assert not (tmp_path / "x.h5").exists()


def test_file_attrs_are_plain_values(tmp_path):
    """Attributes of any file (arrays, bytes, numpy scalars) come back as JSON-able Python values."""
    import json
    from calofast.data import file_attrs
    path = write_showers(tmp_path / "a.h5", np.array([1e3]), np.zeros((1, 36)),
                         attrs={"array": np.arange(3), "raw": b"xy", "count": np.int64(4), "text": "t"})
    attrs = file_attrs(path)
    assert attrs == {"array": [0, 1, 2], "raw": "xy", "count": 4, "text": "t"} and json.dumps(attrs)
