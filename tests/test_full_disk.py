"""A full disk: shower files stop before HDF5 meets it (HDF5 cannot close a file whose write failed, and the
interpreter then crashes at exit), and a write that fails all the same is one line, exit 2, nothing left behind.
Fault injection everywhere; a real tmpfs where this machine lets the tests mount one (root, not in a container that
forbids it)."""
import errno
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

import calofast.data as data
from calofast.data import ShowerFileError, ShowerWriter, read_showers, write_showers

SRC = str(Path(__file__).resolve().parents[1] / "src")
Usage = namedtuple("Usage", "total used free")


def _sample(n, v=6480):
    rng = np.random.default_rng(0)
    return rng.uniform(1e3, 1e5, n).astype(np.float32), rng.exponential(1.0, (n, v)).astype(np.float32)


def _free(monkeypatch, nbytes):
    monkeypatch.setattr(data.shutil, "disk_usage", lambda path: Usage(10 ** 12, 0, nbytes))


def test_writer_refuses_a_batch_that_could_fill_the_disk(tmp_path, monkeypatch):
    e, s = _sample(50)                                  # 1.3 MB uncompressed
    target = write_showers(tmp_path / "a.h5", e, s)     # an existing file, to be kept
    _free(monkeypatch, data.SPACE_MARGIN + e.nbytes + s.nbytes + 1)
    with pytest.raises(ShowerFileError, match=r"a\.h5: not enough disk space: .* the next 50 showers need up to 1\.3 MB"):
        with ShowerWriter(target, 6480, force=True) as w:
            w.write(e, s)                               # fits, just
            _free(monkeypatch, data.SPACE_MARGIN + e.nbytes + s.nbytes - 1)
            w.write(e, s)                               # could fill the disk: refused before HDF5 writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5"]
    np.testing.assert_array_equal(read_showers(target)[1], s)
    _free(monkeypatch, data.SPACE_MARGIN - 1)
    with pytest.raises(ShowerFileError, match=r"b\.h5: not enough disk space: .* a new file needs 16 MiB in hand"):
        ShowerWriter(tmp_path / "b.h5", 6480)
    assert not data.hdf5_unusable()


def test_a_failed_hdf5_write_is_one_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_HDF5_BROKEN", False)

    class Full:                                         # a dataset whose write meets a full disk
        def resize(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: ...)")

    e, s = _sample(5)
    with pytest.raises(ShowerFileError, match=r"c\.h5: cannot write it \(No space left on device\)"):
        with ShowerWriter(tmp_path / "c.h5", 6480) as w:
            w._s = Full()
            w.write(e, s)
    assert list(tmp_path.iterdir()) == []
    assert data.hdf5_unusable()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 24 MiB tmpfs, where this machine allows mounting one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# The second case makes HDF5 meet the full disk itself (as when another writer fills it between the check and the
# write): the failed close must not crash the interpreter (exit 139 before the fix).
RACE = ("import sys, calofast.data as d; d.SPACE_MARGIN = -10 ** 12; from calofast.cli import main; "
        "sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("runner", [["-m", "calofast"], ["-c", RACE]], ids=["checked", "hdf5-fails"])
def test_real_full_disk_gflash(small_tmpfs, runner):
    existing = small_tmpfs / "g.h5"
    existing.write_bytes(b"keep me")
    out = small_tmpfs / "g2.h5"
    done = subprocess.run([sys.executable, *runner, "gflash", "--geometry", "ds2", "--n", "1200", "--chunk", "200",
                           "--workers", "1", "--no-compress", "-o", str(out)],
                          env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=300)
    lines = [x for x in done.stderr.replace("\r", "\n").splitlines() if x.strip() and "shower/s" not in x
             and "?shower" not in x]
    assert done.returncode == 2, done.stderr[-800:]
    assert len(lines) == 1 and lines[0].startswith(f"calofast: error: {out}: "), lines
    assert ("not enough disk space" if runner[0] == "-m" else "No space left on device") in lines[0]
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["g.h5"] and existing.read_bytes() == b"keep me"
