"""Per-event random streams: event k's randomness depends only on (seed, k), never on batching.

* `EventRNG` draws Gaussian noise for a batch of events on any device, vectorised: a counter-based
  generator (a 32-bit integer hash of event key, draw counter and element index, turned into a
  normal variate by the inverse CDF). One torch.Generator per event would need B kernel launches per
  draw, far too slow at batch 10,000 x 400 steps on a GPU. Bit-identical integer hashing makes the
  noise independent of batch size and of device (up to float rounding of the inverse CDF).
* `numpy_streams` gives one numpy Generator per event (used by the GFlash generator).

Streams are separated by a `purpose` tag so that, e.g., the incident energy and the shower noise of
one event are independent.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = ["EventRNG", "numpy_streams", "event_keys", "ENERGY", "SHOWER", "NOISE"]

ENERGY, SHOWER, NOISE = 0, 1, 2
_MASK = 0xFFFFFFFF


# numpy's SeedSequence constants (numpy/random/bit_generator.pyx), for the vectorised copy below.
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _POOL = 0xCA01F9DD, 0x4973F715, 4


def _seedseq_state2(words: list[np.ndarray]) -> np.ndarray:
    """SeedSequence(entropy).generate_state(2, uint32) for many entropies at once: `words` holds one
    uint32 array per entropy word (one entry per event), at most 4 words (numpy's pool size)."""
    u = np.uint32
    hc = [_INIT_A]

    def hashmix(v: np.ndarray) -> np.ndarray:
        v = v ^ u(hc[0])
        hc[0] = (hc[0] * _MULT_A) & _MASK
        v = v * u(hc[0])
        return v ^ (v >> u(16))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = u(_MIX_L) * x - u(_MIX_R) * y
        return r ^ (r >> u(16))

    zero = np.zeros_like(words[0])
    pool = [hashmix(words[i] if i < len(words) else zero) for i in range(_POOL)]
    for i_src in range(_POOL):
        for i_dst in range(_POOL):
            if i_src != i_dst:
                pool[i_dst] = mix(pool[i_dst], hashmix(pool[i_src]))
    out, h = [], _INIT_B
    for i in range(2):
        v = pool[i % _POOL] ^ u(h)
        h = (h * _MULT_B) & _MASK
        v = v * u(h)
        out.append(v ^ (v >> u(16)))
    return np.stack(out, 1)


def _as_uint32(events: range | list[int]) -> np.ndarray | None:
    """The event indices as uint32, or None where one of them is not a 32-bit unsigned value."""
    if isinstance(events, range):
        ends = (events[0], events[-1]) if len(events) else (0, 0)
        if min(ends) < 0 or max(ends) > _MASK:
            return None
        return np.arange(events.start, events.stop, events.step, dtype=np.int64).astype(np.uint32)
    return None if any(k < 0 or k > _MASK for k in events) else np.array(events, dtype=np.uint32)


def event_keys(seed: int, events: Iterable[int], purpose: int) -> np.ndarray:
    """[B, 2] uint32 keys per event (as int64), mixed from (seed, event, purpose) through numpy's
    SeedSequence: vectorised where every value is one 32-bit word (a per-event Python loop cost
    ~0.01-0.02 ms per shower, as much as a network evaluation), the loop itself otherwise."""
    events = events if isinstance(events, range) else [int(k) for k in events]   # iterate once
    k = _as_uint32(events)
    if k is not None and 0 <= seed <= _MASK and 0 <= purpose <= _MASK:
        with np.errstate(over="ignore"):
            keys = _seedseq_state2([np.full_like(k, seed), k, np.full_like(k, purpose)])
        return keys.astype(np.int64).reshape(-1, 2)
    return np.stack([np.random.SeedSequence([seed, int(k), purpose]).generate_state(2, np.uint32)
                     for k in events]).astype(np.int64).reshape(-1, 2)


def numpy_streams(seed: int, events: Iterable[int], purpose: int) -> list[np.random.Generator]:
    """One numpy Generator per event index."""
    return [np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, int(k), purpose])))
            for k in events]


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2**32 for 0 <= x < 2**32 in int64 without signed overflow."""
    if m < 2**31:
        return (x * m) & _MASK
    return (((x * (m - 2**31)) & _MASK) + ((x << 31) & _MASK)) & _MASK


def hash32(x: torch.Tensor) -> torch.Tensor:
    """The 'lowbias32' integer hash (C. Wellons) on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _uniform(state: torch.Tensor, key1: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] float64 uniforms in (0, 1) from the per-(event, draw) state [B] and the second key word [B]."""
    idx = torch.arange(n, device=state.device, dtype=torch.int64)
    h = hash32(hash32(idx[None, :] ^ state[:, None]) ^ key1[:, None])
    return (h.to(torch.float64) + 0.5) * (1.0 / 2**32)


_fused_uniform = None


def _uniform_fused(state: torch.Tensor, key1: torch.Tensor, n: int) -> torch.Tensor:
    """`_uniform` as one compiled kernel (integer hashing is exact: the same bits as eager)."""
    global _fused_uniform
    if _fused_uniform is None:
        _fused_uniform = torch.compile(_uniform, dynamic=False)
    return _fused_uniform(state, key1, n)


class EventRNG:
    """Counter-based Gaussian noise, one independent stream per event.

    Args:
        seed: the run's seed.
        events: global event indices of this batch (e.g. range(k0, k0 + B)).
        device: where the noise is produced.
        purpose: stream tag (NOISE by default).
        fused: hash with one compiled kernel instead of ~30 eager ones (the same noise; compiles per shape).
    """

    def __init__(self, seed: int, events: Sequence[int] | range, device: "torch.device | str" = "cpu",
                 purpose: int = NOISE, fused: bool = False):
        self.device = torch.device(device)
        self.keys = torch.as_tensor(event_keys(seed, events, purpose), device=self.device)  # [B, 2]
        self.counter, self.fused = 0, fused

    def __len__(self) -> int:
        return self.keys.shape[0]

    def randn(self, event_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[B, *event_shape] standard normal; each call advances every event's stream by one draw."""
        n = int(np.prod(event_shape)) if len(event_shape) else 1
        c = self.counter
        self.counter += 1
        # Per (event, draw) state from both key words and the counter, then one hash per element.
        s = hash32(self.keys[:, 0] ^ hash32(self.keys[:, 1] ^ hash32(torch.full_like(self.keys[:, 0], c))))
        u = (_uniform_fused if self.fused else _uniform)(s, self.keys[:, 1], n)
        z = torch.special.ndtri(u).to(dtype)
        return z.reshape(len(self), *event_shape)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self):
            raise ValueError(f"batch of {x.shape[0]} events but {len(self)} event streams")
        return self.randn(tuple(x.shape[1:]), x.dtype).to(x.device)
