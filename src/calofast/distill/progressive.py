"""Progressive distillation (Salimans & Ho, arXiv:2202.00512), in sigma-space (spec `samplers.md` 6.1).

A student with N steps learns to match two teacher DDIM(eta=0) = Euler steps with one. Steps live on
a Karras map u in (0, 1] -> sigma(u) (u = 1 -> sigma_max, u -> 0 -> sigma_min) with sigma(0) = 0:
the student steps from u = i/N to (i-1)/N, the teacher through the midpoint (i - 1/2)/N. The target
x that makes one student Euler step land where the two teacher steps landed:

    x_target = (x'' - (sigma''/sigma) x) / (1 - sigma''/sigma),   x_target = D_teacher(x', sigma') if sigma'' = 0.

The loss is the student's output-space MSE (v-MSE for a v-model, i.e. (SNR + 1)-weighted x-MSE).
The teacher's two steps are the samplers' own `euler_step`.
"""
from __future__ import annotations

import torch

from ..samplers import euler_step

__all__ = ["sigma_of_u", "student_grid", "progressive_loss"]


def sigma_of_u(u: torch.Tensor, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras map for u in [0, 1]; sigma(0) = 0 exactly."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (lo + u * (hi - lo)) ** rho
    return torch.where(u > 0, s, torch.zeros_like(s))


def student_grid(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The N-step student's grid [sigma(1), sigma((N-1)/N), ..., sigma(1/N), 0] (float64)."""
    u = torch.arange(n, -1, -1, dtype=torch.float64) / n
    return sigma_of_u(u, sigma_min, sigma_max, rho)


def progressive_loss(student, param, teacher, x0: torch.Tensor, cond: torch.Tensor, n: int,
                     sigma_min: float, sigma_max: float, rho: float = 7.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """One PD loss evaluation for an N-step student (per-event step index drawn uniformly)."""
    b = x0.shape[0]
    i = torch.randint(1, n + 1, (b,), generator=generator, device=x0.device).double()
    sigma = sigma_of_u(i / n, sigma_min, sigma_max, rho).float()
    sigma_mid = sigma_of_u((i - 0.5) / n, sigma_min, sigma_max, rho).float()
    sigma_next = sigma_of_u((i - 1) / n, sigma_min, sigma_max, rho).float()
    col = lambda s: s.reshape(-1, *([1] * (x0.ndim - 1)))
    x = x0 + col(sigma) * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    with torch.no_grad(), torch.autocast(x0.device.type, enabled=False):
        x_mid, _ = euler_step(teacher, x, sigma, sigma_mid, cond)
        den_mid = teacher(x_mid, sigma_mid, cond)
        x_next, _ = euler_step(teacher, x_mid, sigma_mid, sigma_next, cond, denoised=den_mid)
        ratio = col(sigma_next / sigma)
        target = torch.where(col(sigma_next) > 0, (x_next - ratio * x) / (1 - ratio), den_mid)
    pred = student(x, sigma, cond)
    _, c_out, _, _ = param.scalings(sigma)
    w = param.loss_weight(sigma) / c_out ** 2
    return (col(w) * (pred - target) ** 2).mean()
