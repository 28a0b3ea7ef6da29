"""Time per shower with the CaloChallenge protocol (spec `calochallenge.md` section 8).

For each batch size: one warm-up call, then `repeats` timed calls; ms per shower = wall time of a
batch / batch size, including the condition preprocessing, every sampler step and the inverse
transform to MeV voxels, excluding file I/O; CUDA is synchronised before each clock read. Reports
mean, std and median, with the hardware, threads, dtype and the counted NFE (main stage; every stage's
in `nfe_stages`).
"""
from __future__ import annotations

import csv
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Bundle
from .generate import is_compiled, resolve_sampler, sample_batch

__all__ = ["bench", "hardware", "write_table"]


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def bench(bundle: Bundle, sampler: str | None, steps: int | None, batch_sizes=(1, 100, 10_000), repeats: int = 10,
          bf16: bool = False, label: str = "", seed: int = 0, knobs: dict | None = None,
          progress: bool = False, early: tuple[str, int] | None = None, cuda_graph: bool = False) -> list[dict]:
    """One row per batch size (`knobs`: the main stage's sampler options, e.g. eta; `early`: (sampler, steps)
    of the stages before the main one); `progress`: a bar per batch size over its warm-up and repeats.
    `cuda_graph`: each batch size captured once as a CUDA graph (`graphs.GraphedSampler`; the capture is
    not timed, the copy of energies and event keys into the graph is)."""
    from tqdm import tqdm
    device = next(bundle.denoiser.parameters()).device
    name, n_steps, sigmas = resolve_sampler(bundle, sampler, steps)
    lo, hi = bundle.transform.energy_range
    rows = []
    for b in batch_sizes:
        energies = torch.from_numpy(np.exp(np.random.default_rng(seed).uniform(np.log(lo), np.log(hi), b)))
        args = dict(sampler=name, steps=n_steps, sigmas=sigmas, bf16=bf16, knobs=knobs, early=early)
        if cuda_graph:
            from .graphs import GraphedSampler
            run = GraphedSampler(bundle, b, **args)
        else:
            def run(e, s, events):
                return sample_batch(bundle, e, s, events, **args)

        def once() -> tuple[float, dict]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            _, nfe, _ = run(energies, seed, range(b))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t0, nfe

        bar = tqdm(total=repeats + 1, desc=f"bench batch {b}", disable=not progress)
        once()                                              # warm-up (allocations, cuDNN autotuning)
        bar.update()
        times, nfe = [], {}
        for _ in range(repeats):
            dt, nfe = once()
            times.append(dt / b * 1e3)
            bar.update()
        bar.close()
        rows.append({"label": label or f"{name} x{n_steps}", "sampler": name, "steps": n_steps,
                     "nfe": list(nfe.values())[-1], "nfe_stages": json.dumps(nfe),
                     "batch": b, "ms_per_shower": statistics.mean(times),
                     "std": statistics.stdev(times) if len(times) > 1 else 0.0,
                     "median": statistics.median(times), "showers_per_s": 1e3 / statistics.median(times),
                     "repeats": repeats, "device": hardware(device), "dtype": "bf16" if bf16 else "fp32",
                     "threads": torch.get_num_threads(), "compiled": is_compiled(bundle), "cuda_graph": cuda_graph})
    return rows


def write_table(rows: list[dict], out: "str | Path", force: bool = False) -> Path:
    """CSV or JSON by suffix, written atomically; an existing file only with `force` (regular files only)."""
    import io

    from .checkpoint import atomic_write_bytes
    from .data import claim_output
    out = Path(out)
    claim_output(out, force)
    if out.suffix == ".json":
        text = json.dumps(rows, indent=1)
    else:
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        text = buf.getvalue()
    atomic_write_bytes(out, text.encode())
    return out
