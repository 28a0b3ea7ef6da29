"""High-level feature extraction speed: stream a DS2 file and compute every CaloChallenge feature.

    python benchmarks/bench_features.py --file ds2_100k.h5      (written with GFlash first if missing)
Reports showers per second and the wall time for the whole file, with the number of CPU threads.
"""
import argparse
import os
import time
from pathlib import Path

from calofast.geometry import PRESETS
from calofast.gflash import write_gflash
from calofast.metrics.features import file_features


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", type=Path, default=Path("ds2_gflash_100k.h5"))
    ap.add_argument("--n", type=int, default=100_000)
    a = ap.parse_args()
    geo = PRESETS["ds2"]
    if not a.file.exists():
        write_gflash(a.file, geo, a.n, "log-uniform:1GeV:1TeV", seed=11, workers=os.cpu_count() or 1)
    t0 = time.perf_counter()
    ff = file_features(a.file, geo)
    dt = time.perf_counter() - t0
    print(f"features of {ff.n} DS2 showers in {dt:.1f} s ({ff.n / dt:.0f} showers/s) on {os.cpu_count()} CPU cores "
          f"(file {a.file.stat().st_size / 1e9:.2f} GB, gzip)")


if __name__ == "__main__":
    main()
