"""Single-shower CPU latency through ONNX Runtime (the Geant4 use: batch 1), one thread and all threads.

    python benchmarks/bench_onnx.py [--model ds2-shortcut] [--steps 1 2 4] [--repeats 50]
Exports the model (reproducible flavour) with each step count to a temporary folder, warms up, then
reports the median and the 10-90 % range of single-shower latency.
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from calofast.checkpoint import load_bundle
from calofast.export import export_onnx


def latency(path: Path, threads: int, repeats: int) -> list[float]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    d = sess.get_inputs()[1].shape[1]
    rng = np.random.default_rng(0)
    feeds = [{"conditions": np.array([[e]], np.float32), "noise": rng.standard_normal((1, d), dtype=np.float32)}
             for e in np.exp(rng.uniform(np.log(1e3), np.log(1e6), repeats))]
    for f in feeds[:5]:
        sess.run(None, f)
    out = []
    for f in feeds:
        t0 = time.perf_counter()
        sess.run(None, f)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ds2-shortcut", help="bundle or shipped name")
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=50)
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"onnxruntime {ort.__version__}, CPU {platform.processor() or platform.machine()}, {cores} cores")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(a.model)
        for steps in a.steps:
            path = export_onnx(bundle, Path(tmp) / f"{steps}.onnx", steps=steps)
            nfe = json.loads(path.with_suffix(".json").read_text())["stages"]
            nfe = " + ".join(f"{s['nfe']} {s['stage']}" for s in nfe)
            for threads in (1, cores):
                t = latency(path, threads, a.repeats)
                q = np.percentile(t, [10, 90])
                print(f"  {a.model} {steps} steps (NFE {nfe}): {threads:2d} thread(s): median {statistics.median(t):7.2f} "
                      f"ms per shower (10-90 %: {q[0]:.2f}-{q[1]:.2f} ms, {a.repeats} showers, batch 1)")


if __name__ == "__main__":
    main()
