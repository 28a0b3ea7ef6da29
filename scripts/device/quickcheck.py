"""Quick look at a model's showers next to a reference file (simple means; not the full evaluation).

    python scripts/device/quickcheck.py --reference ref.h5 --n 4000 --device cuda \
        --model teacher.safetensors:ddim:50 --model student.safetensors
"""
import argparse
import time

import numpy as np
import torch

from calofast.checkpoint import load_bundle
from calofast.data import read_showers
from calofast.generate import resolve_sampler, sample_batch
from calofast.geometry import PRESETS
from calofast.metrics.features import shower_features


def summary(e: np.ndarray, s: np.ndarray) -> dict:
    f = shower_features(s, e, PRESETS["ds2"])
    resp = f["E_tot"] / f["E_inc"]
    depth = (f["E_layer"] * np.arange(f["E_layer"].shape[1])).sum(1) / (f["E_layer"].sum(1) + 1e-16)
    return {"resp_mean": resp.mean(), "resp_rms": resp.std(), "sparsity": f["sparsity"].mean(),
            "depth": depth.mean(), "EC_r(l10)": f["EC_r"][:, 10].mean(), "width_r(l10)": f["width_r"][:, 10].mean()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", required=True)
    ap.add_argument("--model", action="append", required=True, help="bundle[:sampler:steps]")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--bf16", action="store_true")
    a = ap.parse_args()
    e, s = read_showers(a.reference, stop=a.n)
    rows = {"reference": summary(e, s)}
    for spec in a.model:
        path, *rest = spec.split(":")
        b = load_bundle(path, a.device)
        name, steps, sigmas = resolve_sampler(b, rest[0] if rest else None, int(rest[1]) if len(rest) > 1 else None)
        out, t0 = [], time.perf_counter()
        for lo in range(0, a.n, 2000):
            x, nfe, _ = sample_batch(b, torch.from_numpy(e[lo:lo + 2000].astype(np.float64)), 1, range(lo, min(lo + 2000, a.n)),
                                  sampler=name, steps=steps, sigmas=sigmas, bf16=a.bf16)
            out.append(x.cpu().numpy())
        dt = time.perf_counter() - t0
        rows[f"{path.split('/')[-1]} {name}x{steps} (NFE {nfe}, {a.n / dt:.0f}/s)"] = summary(e, np.concatenate(out))
    keys = list(rows["reference"])
    print(f"{'':58s}" + "".join(f"{k:>13s}" for k in keys))
    for name, r in rows.items():
        print(f"{name[:58]:58s}" + "".join(f"{r[k]:13.4f}" for k in keys))


if __name__ == "__main__":
    main()
