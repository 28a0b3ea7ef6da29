"""Consistency distillation (Song et al. 2023, arXiv:2303.01469; spec `samplers.md` 6.2).

The student f(x, sigma) carries the boundary condition f(x, sigma_min) = x (the `Boundary`
parameterisation around the teacher's, so it starts from the teacher's weights). On an N-point
Karras grid, n ~ U{0..N-2}: x_t = x0 + t z at t = sigma_n; one teacher Heun step (the samplers'
own `heun_step`) to t2 = sigma_{n+1}; loss d(f_theta(x_t, t), f_target(x_t2, t2)) with the target
network an EMA (mu) of the student and d = L2 or pseudo-Huber over the whole shower vector
(c = 0.00054 sqrt(dim), Song & Dhariwal 2023). No perceptual loss: it means nothing for voxels.
"""
from __future__ import annotations

import math

import torch

from ..samplers import heun_step

__all__ = ["consistency_loss", "consistency_points", "update_target"]


def consistency_loss(student, target, teacher, x0: torch.Tensor, cond: torch.Tensor, grid: torch.Tensor,
                     metric: str = "pseudo_huber", generator: torch.Generator | None = None,
                     reduce: bool = True) -> torch.Tensor:
    """One CD loss evaluation; `grid` is the decreasing N-point Karras grid (sigma_max ... sigma_min).

    Returns the batch mean, or the per-event losses [B] with reduce=False."""
    b = x0.shape[0]
    g = grid.to(device=x0.device, dtype=torch.float32)
    n = torch.randint(0, len(grid) - 1, (b,), generator=generator, device=x0.device)
    t, t2 = g[n], g[n + 1]
    x_t = x0 + t.reshape(-1, *([1] * (x0.ndim - 1))) * torch.randn(x0.shape, generator=generator,
                                                                    device=x0.device, dtype=x0.dtype)
    with torch.no_grad():
        with torch.autocast(x0.device.type, enabled=False):
            x_t2, _ = heun_step(teacher, x_t, t, t2, cond)
        f_target = target(x_t2, t2, cond).float()
    diff = (student(x_t, t, cond) - f_target).flatten(1)
    if metric == "l2":
        per_event = diff.pow(2).mean(dim=1)
    elif metric == "pseudo_huber":
        c = 0.00054 * math.sqrt(diff.shape[1])
        per_event = torch.sqrt(diff.pow(2).sum(dim=1) + c * c) - c
    else:
        raise ValueError(f"unknown consistency metric {metric!r} (l2, pseudo_huber)")
    return per_event.mean() if reduce else per_event


@torch.no_grad()
def update_target(target: torch.nn.Module, student: torch.nn.Module, mu: float) -> None:
    """target <- mu target + (1 - mu) student."""
    for pt, ps in zip(target.parameters(), student.parameters()):
        pt.lerp_(ps.detach(), 1 - mu)


def consistency_points(grid: list[float] | torch.Tensor, steps: int) -> torch.Tensor:
    """Evaluation sigmas for a `steps`-step consistency sampler from the N-point training grid, plus
    sigma_min: index 0 first, then evenly spread indices (2 steps: 0 and 0.55 N, as CD's 0, 22 of 40)."""
    g = [float(v) for v in grid]
    n = len(g)
    if not 1 <= steps < n:
        raise ValueError(f"{steps} consistency steps do not fit a {n}-point grid")
    idx = [0] + [round(0.55 * n * k / (steps - 1)) if steps > 1 else 0 for k in range(1, steps)]
    idx = sorted(set(min(i, n - 2) for i in idx))
    return torch.tensor([g[i] for i in idx] + [g[-1]], dtype=torch.float64)
