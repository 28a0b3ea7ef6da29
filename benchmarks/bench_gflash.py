"""GFlash generator throughput on ONE CPU core (simulation only, no file I/O).

    python benchmarks/bench_gflash.py --geometry ds2 --n 4000

Pins the process to one core (where the OS allows) and single-threaded BLAS, warms up, then reports
the median of --repeats timings in showers per second for log-uniform 1 GeV - 1 TeV electrons.
"""
import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from calofast.energies import parse_spectrum  # noqa: E402
from calofast.geometry import get_geometry  # noqa: E402
from calofast.gflash import GFlash  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="ds2")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--energies", default="log-uniform:1GeV:1TeV")
    a = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    gen = GFlash(get_geometry(a.geometry))
    e = parse_spectrum(a.energies).sample(0, range(a.n))
    gen.simulate(e[:200], 0, range(200))                       # warm-up
    rates = []
    for r in range(a.repeats):
        t0 = time.perf_counter()
        gen.simulate(e, r, range(a.n))
        rates.append(a.n / (time.perf_counter() - t0))
    cpu = platform.processor() or platform.machine()
    print(f"gflash {a.geometry}: {statistics.median(rates):.0f} showers/s on one core "
          f"(median of {a.repeats}, {a.n} showers each, {a.energies}; cpu {cpu}; "
          f"all: {', '.join(f'{x:.0f}' for x in rates)})")


if __name__ == "__main__":
    main()
