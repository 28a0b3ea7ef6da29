"""Device glue: generate several evaluation rows from one bundle in one process (the network compiled once).

    python scripts/device/generate_rows.py --model M --reference ref.h5 --out DIR [--compile] ROW ...

ROW is LABEL=SAMPLER:STEPS[:ETA]. Each row is DIR/LABEL.h5 with the reference's incident energies (seed 1,
batch 10,000, bf16 on CUDA) and DIR/LABEL.json with the generation statistics; rows already on disk are
skipped. Only library calls: load_bundle, compile_network, sample_batch (a warm-up), generate_file.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from calofast.checkpoint import load_bundle
from calofast.data import read_showers
from calofast.generate import compile_network, generate_file, sample_batch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--compile", action="store_true")
    p.add_argument("rows", nargs="+")
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bundle = load_bundle(a.model, dev)
    if a.compile and dev == "cuda":
        compile_network(bundle)
    energies = read_showers(a.reference, stop=a.n, validate=False)[0].astype(np.float64)
    a.out.mkdir(parents=True, exist_ok=True)
    # Warm-up at the generation batch size (compiles every stage's network), so that no row pays for it.
    warm = min(10_000, len(energies))
    sample_batch(bundle, torch.from_numpy(energies[:warm]), 0, range(warm), sampler="euler", steps=2, bf16=dev == "cuda")
    for row in a.rows:
        label, spec = row.split("=")
        sampler, steps, *eta = spec.split(":")
        if (a.out / f"{label}.h5").exists():
            continue
        stats = generate_file(bundle, a.out / f"{label}.h5", energies, seed=1, sampler=sampler, steps=int(steps),
                              batch_size=10_000, bf16=dev == "cuda", knobs={"eta": float(eta[0])} if eta else None,
                              progress=False)
        rec = {"label": label, "model": str(a.model), "sampler": stats.sampler, "steps": stats.steps, "nfe": stats.nfe,
               "seconds": stats.seconds, "ms_per_shower": stats.seconds / stats.n * 1e3, "clipped": stats.clipped,
               "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "compiled": a.compile and dev == "cuda"}
        (a.out / f"{label}.json").write_text(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    sys.exit(main())
