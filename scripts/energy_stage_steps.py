"""Diagnostic: a factorised model's energy stage alone at several samplers and step counts (CPU is enough).

    python scripts/energy_stage_steps.py --model ds2-factorised --reference ref.h5 --floor floor.h5

Samples the 45 layer energies for the reference's incident energies (seed 1) and compares them with the
reference: separation power of E_tot/E_inc (100 bins in [0.5, 1.5]) and the mean over layers of the
separation power of E_layer (an empty bin plus 50 log bins). These binnings are this script's, not the
CaloChallenge's: use it to choose the energy stage's sampler, not as an evaluation. `--floor`: a second
GFlash file with the same number of events, the statistical floor of both numbers.
"""
import argparse
import json
import time

import numpy as np
import torch

from calofast.checkpoint import load_bundle
from calofast.data import read_showers
from calofast.generate import make_sigmas
from calofast.rng import EventRNG
from calofast.samplers import SAMPLERS, CountingDenoiser

ROWS = [("heun", 32), ("heun", 16), ("heun", 8), ("heun", 4), ("dpmpp-2m", 16), ("dpmpp-2m", 8), ("dpmpp-2m", 4),
        ("unipc", 8), ("unipc", 4)]


def separation(a: np.ndarray, b: np.ndarray, bins: np.ndarray) -> float:
    ha, hb = np.histogram(a, bins)[0].astype(float), np.histogram(b, bins)[0].astype(float)
    ha, hb = ha / ha.sum(), hb / hb.sum()
    m = (ha + hb) > 0
    return float(0.5 * np.sum((ha[m] - hb[m]) ** 2 / (ha[m] + hb[m])))


def layer_energies(path: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    e, s = read_showers(path)
    g = s.reshape(len(e), 45, -1).astype(np.float64)
    return e.astype(np.float64), np.where(g < threshold, 0, g).sum(-1)


def compare(e: np.ndarray, layers: np.ndarray, e_ref: np.ndarray, ref: np.ndarray) -> dict:
    seps = []
    for k in range(ref.shape[1]):
        pos = ref[:, k][ref[:, k] > 0]
        if len(pos) >= 100:
            bins = np.concatenate([[-1, 1e-3], np.logspace(np.log10(max(pos.min(), 1e-2)), np.log10(pos.max() * 1.5), 50)])
            seps.append(separation(layers[:, k], ref[:, k], bins))
    resp, resp_ref = layers.sum(1) / e, ref.sum(1) / e_ref
    return {"sep_response": round(separation(resp, resp_ref, np.linspace(0.5, 1.5, 101)), 5),
            "sep_E_layer_mean": round(float(np.mean(seps)), 5), "resp_mean": round(float(resp.mean()), 5),
            "resp_mean_ref": round(float(resp_ref.mean()), 5)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ds2-factorised")
    p.add_argument("--reference", required=True)
    p.add_argument("--floor")
    a = p.parse_args()
    b = load_bundle(a.model)
    thr = b.geometry.threshold_mev
    e, ref = layer_energies(a.reference, thr)
    if a.floor:
        print(json.dumps({"row": "gflash-floor", **compare(*layer_energies(a.floor, thr), e, ref)}), flush=True)
    energies = torch.from_numpy(e)
    cond = b.transform.stage_condition(0, energies, [])
    stage = b.stages[0]
    for name, steps in ROWS:
        t0 = time.time()
        rng = EventRNG(1, range(len(e)))
        counted = CountingDenoiser(stage.denoiser)
        with torch.no_grad():
            x = SAMPLERS[name].fn(counted, rng.randn(b.transform.stage_shapes[0]), make_sigmas(stage.denoiser, name, steps),
                                  cond, rng=rng)
        layers = b.transform._code_to_layers(x, energies, torch.float64).numpy()
        print(json.dumps({"row": f"{name}-{steps}", "nfe": counted.nfe, **compare(e, layers, e, ref),
                          "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
