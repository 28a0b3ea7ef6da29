"""The whole sampling pipeline of one batch size as one CUDA graph (no Python or launch overhead per step).

At batch 1 a shower is ~100 network evaluations of tiny kernels (the energy stage's steps, the shape
stage's, the noise and the inverse transform), each paying Python dispatch and a kernel launch: tens of
milliseconds of host time for microseconds of GPU work. `GraphedSampler` runs `generate.run_stages` for a
fixed batch size on a side stream (warm-up: allocations, cuBLAS workspaces, compiled kernels), then captures
it into one `torch.cuda.CUDAGraph` whose inputs are two static tensors, the incident energies [B] and the
event keys [B, 2] of `EventRNG`. Each call copies new energies and keys in and replays the graph: the same
kernels on the same inputs as `sample_batch`, so the same showers for any seed and events (the noise
counters are fixed at capture, exactly as a fresh `EventRNG` starts them). Works with a compiled network
(capture after its warm-up); autocast runs without its weight cache, which CUDA graphs cannot keep.
"""
from __future__ import annotations

import torch

from .checkpoint import Bundle
from .generate import bound_plan, is_compiled, run_stages, sampling_plan
from .rng import NOISE, EventRNG, event_keys

__all__ = ["GraphedSampler"]


class GraphedSampler:
    """`sample_batch` for batches of exactly `batch` events on a CUDA device, replayed from a CUDA graph.

    Args as `sample_batch` (sampler, steps, sigmas, bf16, knobs, early); `warmup`: eager runs before the
    capture (the first compiles a torch.compile'd network at this batch size)."""

    def __init__(self, bundle: Bundle, batch: int, *, sampler: str | None = None, steps: int | None = None,
                 sigmas: torch.Tensor | None = None, bf16: bool = False, knobs: dict | None = None,
                 early: tuple[str, int] | None = None, warmup: int = 2):
        device = next(bundle.denoiser.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device (it is on {device})")
        if batch < 1:
            raise ValueError(f"batch size must be at least 1 (got {batch})")
        self.batch, self.device = batch, device
        lo, hi = bundle.transform.energy_range
        self.energies = torch.full((batch,), (lo * hi) ** 0.5, dtype=torch.float64, device=device)
        self.rng = EventRNG(0, range(batch), device, fused=is_compiled(bundle))
        plan = bound_plan(bundle, sampling_plan(bundle, sampler, steps, sigmas, early))

        def run():
            self.rng.counter = 0
            return run_stages(bundle, plan, self.energies, self.rng, bf16=bf16, knobs=knobs, autocast_cache=False)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 1)):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.showers, self.nfe, self.clipped = run()
        torch.cuda.synchronize(device)

    def __call__(self, energies: torch.Tensor, seed: int, events) -> tuple[torch.Tensor, dict[str, int], torch.Tensor]:
        """(showers [B, V] MeV, NFE per stage, clipped [B]) as `sample_batch` returns them. The tensors are the
        graph's own outputs, overwritten by the next call: copy them to keep them."""
        energies = torch.as_tensor(energies, dtype=torch.float64).reshape(-1)
        keys = torch.as_tensor(event_keys(seed, events, NOISE))
        if energies.shape[0] != self.batch or keys.shape[0] != self.batch:
            raise ValueError(f"this graph was captured for batches of {self.batch} events "
                             f"(got {energies.shape[0]} energies, {keys.shape[0]} events)")
        self.energies.copy_(energies.to(self.device, non_blocking=True))
        self.rng.keys.copy_(keys.to(self.device, non_blocking=True))
        self.graph.replay()
        return self.showers, dict(self.nfe), self.clipped
