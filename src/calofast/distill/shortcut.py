"""Shortcut-model training (Frans et al., arXiv:2410.12557) of a flow-matching stage: one run, one loss,
every jump size at once (no stage-by-stage distillation). The network is an `IntervalDenoiser`.

Per batch, a fraction 1 - q of the events gets the flow-matching loss at h = 0 (t logit-normal as the
teacher trained, target n - x0); the other q the self-consistency loss at a jump 2d = t_max / 2^j, j
uniform in 0..K (2^K = max_steps), from a point t = t_max i / 2^j of that jump's grid (i uniform in
1..2^j): the target is the mean of two jumps of d, taken by the model itself without gradient,

    s(x_t, t, 2d) <- [s(x_t, t, d) + s(x_t - d s(x_t, t, d), t - d, d)] / 2,

with the smallest jump's halves (j = K) taken at h = 0, the instantaneous velocity. Both parts are the
plain squared error in the network's output (velocity) space, one mean over all entries.
"""
from __future__ import annotations

import torch

from ..interval import check_max_steps, velocity

__all__ = ["shortcut_loss"]


def shortcut_loss(model, x0: torch.Tensor, cond: torch.Tensor, t_max: float, max_steps: int, fraction: float,
                  sample_sigma, generator: torch.Generator | None = None) -> torch.Tensor:
    """One loss evaluation; `model` is (a compiled or DDP wrapper of) an IntervalDenoiser, `sample_sigma` the
    flow parameterisation's training distribution."""
    b, dev = x0.shape[0], x0.device
    k = check_max_steps(max_steps)
    n_sc = int(round(b * fraction))
    sig = sample_sigma(b - n_sc, generator, dev)
    t_fm = sig / (1 + sig)
    j = torch.randint(0, k + 1, (n_sc,), generator=generator, device=dev)
    cells = (2.0 ** j).float()
    i = torch.floor(torch.rand(n_sc, generator=generator, device=dev) * cells) + 1          # 1..2^j
    jump = t_max / cells
    t_sc = jump * i
    t = torch.cat([t_fm, t_sc]).clamp(max=t_max)
    col = lambda v: v.reshape(-1, *([1] * (x0.ndim - 1)))
    noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    x_t = (1 - col(t)) * x0 + col(t) * noise
    half = jump / 2
    h_in = torch.where(j < k, half, torch.zeros_like(half))
    xs, cs = x_t[b - n_sc:], cond[b - n_sc:]
    with torch.no_grad():
        s1 = velocity(model, xs, t_sc, h_in, cs)
        x_mid = xs - col(half) * s1
        s2 = velocity(model, x_mid, t_sc - half, h_in, cs)
    target = torch.cat([(noise - x0)[: b - n_sc], (s1 + s2) / 2])
    h = torch.cat([torch.zeros_like(t_fm), jump])
    return ((velocity(model, x_t, t, h, cond) - target) ** 2).mean()
