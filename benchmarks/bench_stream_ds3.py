"""Stream a full-size DS3 file (default 50,000 x 40,500 float32, ~8 GB uncompressed) and report peak RSS.

    python benchmarks/bench_stream_ds3.py --file ds3.h5 [--n 50000]

If --file does not exist it is written first with the GFlash generator (chunked, minutes). Then the
file is read once in batches, computing the CaloChallenge high-level features; the peak resident
memory of the process (ru_maxrss) is printed after each phase: it stays at a few hundred MB, far
below the file's uncompressed size.
"""
import argparse
import resource
import time
from pathlib import Path

from calofast.data import inspect_file
from calofast.geometry import PRESETS
from calofast.gflash import write_gflash
from calofast.metrics.features import file_features


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, default=Path("ds3_gflash_50k.h5"))
    ap.add_argument("--n", type=int, default=50_000)
    a = ap.parse_args()
    geo = PRESETS["ds3"]
    if not a.file.exists():
        t0 = time.perf_counter()
        write_gflash(a.file, geo, a.n, "log-uniform:1GeV:1TeV", seed=3, chunk=1000)
        print(f"wrote {a.file} in {time.perf_counter() - t0:.0f} s; peak RSS so far {peak_mb():.0f} MB")
    info = inspect_file(a.file, geo)
    raw_gb = info.n_events * info.n_voxels * 4 / 1e9
    t0 = time.perf_counter()
    ff = file_features(a.file, geo, progress=True)
    dt = time.perf_counter() - t0
    print(f"streamed {ff.n} DS3 showers ({raw_gb:.1f} GB as float32, {a.file.stat().st_size / 1e9:.2f} GB on disk) "
          f"in {dt:.0f} s ({ff.n / dt:.0f} showers/s); peak RSS {peak_mb():.0f} MB")


if __name__ == "__main__":
    main()
