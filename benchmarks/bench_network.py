"""Raw network throughput of a bundle's denoiser (one NFE) on a GPU: eager fp32 / bf16, channels-last,
torch.compile of the network (`calofast.generate.compile_network`); FLOPs per shower counted by torch's
FlopCounterMode, achieved TFLOP/s reported.

    python benchmarks/bench_network.py --model src/calofast/models/ds2-shortcut.safetensors --batch 10000
"""
import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from calofast.checkpoint import load_bundle
from calofast.generate import compile_network


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    b = load_bundle(a.model, "cuda")
    d = b.denoiser
    x = torch.randn(a.batch, *b.event_shape, device="cuda")
    sigma = torch.full((a.batch,), 10.0, device="cuda")
    cond = torch.zeros(a.batch, 1, device="cuda")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        d(x[:1], sigma[:1], cond[:1])
    flops = fc.get_total_flops()
    print(f"{a.model}: {flops / 1e9:.3f} GFLOP per shower per NFE; GPU {torch.cuda.get_device_name()}")
    variants = {}
    with torch.no_grad():
        variants["eager fp32"] = lambda: d(x, sigma, cond)
        variants["eager bf16"] = lambda: torch.autocast("cuda", torch.bfloat16)(d)(x, sigma, cond)
        d_cl = load_bundle(a.model, "cuda").denoiser.to(memory_format=torch.channels_last_3d)
        x_cl = x.contiguous(memory_format=torch.channels_last_3d)
        variants["channels-last bf16"] = lambda: torch.autocast("cuda", torch.bfloat16)(d_cl)(x_cl, sigma, cond)
        if a.compile:
            dc = compile_network(load_bundle(a.model, "cuda")).denoiser    # what --compile does
            variants["torch.compile bf16"] = lambda: torch.autocast("cuda", torch.bfloat16)(dc)(x, sigma, cond)
        for name, fn in variants.items():
            try:
                t = timed(fn, a.reps)
                print(f"  {name:22s} {t * 1e3:9.2f} ms per batch of {a.batch}: {a.batch / t:10.0f} showers/s, "
                      f"{flops * a.batch / t / 1e12:6.1f} TFLOP/s")
            except Exception as err:  # report and go on: a benchmark of alternatives
                print(f"  {name:22s} failed: {type(err).__name__}: {err}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
