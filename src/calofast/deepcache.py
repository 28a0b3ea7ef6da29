"""DeepCache for the patch transformer (Ma et al. 2023, arXiv:2312.00858, in the form DiT caches take: FORA,
Delta-DiT): adjacent sampler steps change the deep features little, so the residual the deep blocks add,
delta = h_depth - h_keep, is computed at a *full* call and reused at the *cached* calls after it, which run
only the stem, the first `keep` blocks and the output head.

`DeepCache` wraps a `Transformer3D` with the same forward(x, c_noise, cond), so the stage's denoiser keeps
its interface and every sampler, the NFE count, `generate`, `bench`, the CUDA graph and the study run it
unchanged (the counted NFE is still the number of denoiser calls, each a cheaper one). Which calls are full:
every `interval`-th (uniform), or the call indices listed in `full` (non-uniform, e.g. dense where the
sampler moves fast); call 0 is always full. `run_stages` resets the cache before each stage's sampler run
(`reset_caches`). Inference only: a cached bundle is not saved. Under `--compile` the two parts (stem + first
blocks, deep blocks) are compiled, the schedule stays in Python (a CUDA graph records it at capture).
"""
from __future__ import annotations

import torch
from torch import nn

from .nn.transformer import Transformer3D

__all__ = ["DeepCache", "deep_cache", "parse_deep_cache", "reset_caches"]


class DeepCache(nn.Module):
    def __init__(self, net: Transformer3D, keep: int, interval: int = 2, full: tuple[int, ...] | None = None):
        super().__init__()
        if not isinstance(net, Transformer3D):
            raise ValueError(f"DeepCache needs a transformer stage (this one is a {type(net).__name__})")
        if not 1 <= keep < len(net.blocks):
            raise ValueError(f"DeepCache keep={keep}: the cached part needs 1 <= keep < depth ({len(net.blocks)})")
        if interval < 1:
            raise ValueError(f"DeepCache interval {interval}: at least 1")
        self.net, self.keep, self.interval = net, keep, interval
        self.full = None if full is None else frozenset(int(i) for i in full)
        self.calls, self.full_calls, self.delta = 0, 0, None
        self._front, self._deep, self.compiled = self._front_eager, self._deep_eager, False

    def reset(self) -> None:
        self.calls, self.full_calls, self.delta = 0, 0, None

    def is_full(self, call: int) -> bool:
        return call == 0 or (call in self.full if self.full is not None else call % self.interval == 0)

    def _front_eager(self, x, c_noise, cond):
        h, emb = self.net.stem(x, c_noise, cond)
        return self.net.blocks_range(h, emb, 0, self.keep), emb

    def _deep_eager(self, h, emb):
        return self.net.blocks_range(h, emb, self.keep, len(self.net.blocks)) - h

    def compile_parts(self) -> None:
        """torch.compile the two parts (static shapes); the call schedule stays eager."""
        self._front = torch.compile(self._front_eager, dynamic=False)
        self._deep = torch.compile(self._deep_eager, dynamic=False)
        self.compiled = True

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h, emb = self._front(x, c_noise, cond)
        if self.delta is None or self.delta.shape != h.shape or self.is_full(self.calls):
            self.delta = self._deep(h, emb)
            self.full_calls += 1
        self.calls += 1
        return self.net.output(h + self.delta, emb)


def parse_deep_cache(text: str | None, what: str = "--deep-cache") -> tuple[int, int, tuple[int, ...] | None] | None:
    """'KEEP:INTERVAL' (e.g. '4:2') or 'KEEP:i,j,k' (the full calls) -> (keep, interval, full); '' -> None."""
    if not text:
        return None
    keep, _, sched = text.partition(":")
    parts = sched.split(",")
    if not keep.isdigit() or not sched or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{what} {text!r}: expected KEEP:INTERVAL (e.g. 4:2) or KEEP:CALL,CALL,... (the full calls)")
    if len(parts) == 1:
        return int(keep), int(parts[0]), None
    return int(keep), 1, tuple(sorted({int(p) for p in parts}))


def deep_cache(bundle, keep: int, interval: int = 2, full: tuple[int, ...] | None = None):
    """The bundle with its main stage's transformer wrapped in `DeepCache`, in place (inference only)."""
    den = bundle.stages[-1].denoiser
    den.net = DeepCache(den.net, keep, interval, full)
    getattr(den, "_bound", {}).clear()               # grid-bound copies (shortcut models) hold the old network
    return bundle


def reset_caches(denoiser) -> None:
    for m in (denoiser.modules() if isinstance(denoiser, nn.Module) else ()):
        if isinstance(m, DeepCache):
            m.reset()
