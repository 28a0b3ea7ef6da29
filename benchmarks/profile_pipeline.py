"""Where the time of one generated batch goes: event keys (host), then per stage its condition, noise and
sampler, then the inverse transform; each phase timed between device synchronisations (median of
repeats, after a warm-up), through the `mark` hook of `calofast.generate.run_stages` (the same code that
`generate` runs). Synchronising after every phase costs a little; the sum is compared with the unmarked
pipeline and with its CUDA-graph replay in the same run.

    python benchmarks/profile_pipeline.py --model ds2-shortcut --steps 1 --batch 10000 --device cuda --bf16 --compile
"""
import argparse
import statistics
import time
from collections import defaultdict

import numpy as np
import torch

from calofast.checkpoint import load_bundle
from calofast.generate import bound_plan, compile_network, parse_stage_sampler, run_stages, sample_batch, sampling_plan
from calofast.rng import EventRNG


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--sampler")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--energy-sampler", help="NAME:STEPS of the energy stage")
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph comparison")
    ap.add_argument("--trace", action="store_true", help="torch.profiler: kernels per batch, GPU busy time, top kernels")
    a = ap.parse_args()
    device = torch.device(a.device)
    bundle = load_bundle(a.model, device)
    if a.compile:
        compile_network(bundle, bf16=a.bf16)
    early = parse_stage_sampler(a.energy_sampler)
    plan = bound_plan(bundle, sampling_plan(bundle, a.sampler, a.steps, early=early))
    lo, hi = bundle.transform.energy_range
    energies = torch.from_numpy(np.exp(np.random.default_rng(0).uniform(np.log(lo), np.log(hi), a.batch))).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    phases = defaultdict(list)

    def marked():
        sync()
        t = [time.perf_counter()]
        rng = EventRNG(1, range(a.batch), device)
        sync()

        def mark(phase):
            sync()
            now = time.perf_counter()
            phases[phase].append((now - t[0]) * 1e3)
            t[0] = now

        mark("event keys (host)")
        return run_stages(bundle, plan, energies, rng, bf16=a.bf16, mark=mark)

    def timed(fn) -> float:
        fn()
        out = []
        for _ in range(a.repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(out)

    args = dict(sampler=a.sampler, steps=a.steps, bf16=a.bf16, early=early)
    plain = timed(lambda: sample_batch(bundle, energies, 1, range(a.batch), **args))
    marked()
    phases.clear()
    for _ in range(a.repeats):
        _, nfe, _ = marked()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{a.model}: batch {a.batch}, NFE {nfe}, {name}, {'bf16' if a.bf16 else 'fp32'}, "
          f"{'compiled' if a.compile else 'eager'}; median of {a.repeats}")
    print(f"{'phase':<28} {'ms per batch':>13} {'us per shower':>14}")
    total = 0.0
    for phase, ms in phases.items():
        m = statistics.median(ms)
        total += m
        print(f"{phase:<28} {m:13.3f} {m / a.batch * 1e3:14.3f}")
    print(f"{'sum of phases':<28} {total:13.3f} {total / a.batch * 1e3:14.3f}")
    print(f"{'sample_batch, unmarked':<28} {plain:13.3f} {plain / a.batch * 1e3:14.3f}")
    if device.type == "cuda" and not a.no_graph:
        from calofast.graphs import GraphedSampler
        graphed = GraphedSampler(bundle, a.batch, **args)
        g = timed(lambda: graphed(energies, 1, range(a.batch)))
        print(f"{'CUDA graph replay':<28} {g:13.3f} {g / a.batch * 1e3:14.3f}")
        ref, _, _ = sample_batch(bundle, energies, 1, range(a.batch), **args)
        out, _, _ = graphed(energies, 1, range(a.batch))
        print(f"graph vs eager: max |diff| {float((out - ref).abs().max()):.3g} MeV, "
              f"total energy ratio {float(out.sum() / ref.sum()):.6f}")
    if device.type == "cuda" and a.trace:
        trace(lambda: sample_batch(bundle, energies, 1, range(a.batch), **args))


def trace(fn, runs: int = 3) -> None:
    """Kernels per run and their summed GPU time (the floor a CUDA graph can reach), top kernels by time."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    count = sum(e.count for e in events) / runs
    busy = sum(e.device_time_total for e in events) / runs / 1e3
    print(f"trace: {count:.0f} kernels per batch, {busy:.3f} ms of GPU kernel time per batch")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:12]:
        print(f"  {e.device_time_total / runs / 1e3:8.3f} ms {e.count / runs:7.0f}x  {e.key[:90]}")


if __name__ == "__main__":
    main()
