"""The MeanFlow loss (Geng et al. 2025, arXiv:2505.13447) for the interval network of the shortcut models.

An `IntervalDenoiser` s(x_t, t, h) makes the jump x_{t-h} = x_t - h s, so s is MeanFlow's average velocity
u(z_t, r, t) with r = t - h: u = (1 / (t - r)) * integral_r^t v(z_tau, tau) dtau. Differentiating
(t - r) u = integral_r^t v in t with r fixed gives the MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt = v . grad_z + d/dt + d/dh  (r fixed: dh/dt = 1),

which the network is trained to satisfy with the conditional velocity v = n - x0 of the linear path
z_t = (1 - t) x0 + t n and the right-hand side as a stop-gradient target. One loss, one run, any number of
jumps at sampling time: the same sampler and bundle as a shortcut student (`interval.py`).

The paper computes d/dt u with a Jacobian-vector product. Here it is a central finite difference along the
tangent (v, 1, 1) in (z, t, h), in float32 without autocast and without gradient, of step e = min(eps, h / 2)
(so t - e > 0 and h - e >= 0); the step's rounding error enters the target multiplied by h / e <= 2 / eps * h,
small where h is. This keeps the compiled network and every attention kernel usable (forward-mode AD is not
available through all of them) at the cost of two forwards of the r < t part of the batch.
"""
from __future__ import annotations

import torch

from ..diffusion import _bcast
from ..interval import velocity

__all__ = ["meanflow_loss", "meanflow_target"]


def _draw_t(sample_sigma, n: int, generator, device) -> torch.Tensor:
    sig = sample_sigma(n, generator, device)
    return sig / (1 + sig)


def meanflow_target(model, x_t: torch.Tensor, t: torch.Tensor, h: torch.Tensor, v: torch.Tensor, cond: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """v - h d/dt s(x_t, t, h) along the tangent (v, 1, 1) (module notes), float32, no gradient."""
    x, t, h, v = x_t.float(), t.float(), h.float(), v.float()
    e = torch.minimum(h / 2, torch.full_like(h, eps))
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        up = velocity(model, x + _bcast(e, x) * v, t + e, h + e, cond)
        down = velocity(model, x - _bcast(e, x) * v, t - e, h - e, cond)
    return v - _bcast(h, x) * (up - down) / _bcast(2 * e.clamp_min(1e-30), x)


def meanflow_loss(model, x0: torch.Tensor, cond: torch.Tensor, t_max: float, sample_sigma, ratio: float, p: float,
                  eps: float, generator: torch.Generator | None = None, teacher=None) -> torch.Tensor:
    """One loss evaluation. `model` is (a compiled or DDP wrapper of) an IntervalDenoiser; `sample_sigma` the flow
    parameterisation's training distribution, from which t (and, for a share `ratio` of the events, r < t as the
    smaller of two draws) comes; `p` the adaptive weighting's power (per event 1 / (|err|^2 + 1e-3)^p, stop-gradient;
    0 = plain squared error); `eps` the finite-difference step; `teacher`: `shortcut.TeacherTargets` pairs appended
    (their target is an exact average velocity of the teacher's ODE). The value returned is the plain mean squared
    error (comparable across p); its gradient is that of the weighted loss."""
    extra = teacher.draw(x0, cond, generator) if teacher is not None else None
    b, dev = x0.shape[0], x0.device
    n_mf = int(round(b * ratio))
    ta, tb = _draw_t(sample_sigma, b, generator, dev), _draw_t(sample_sigma, b, generator, dev)
    first = torch.arange(b, device=dev) < n_mf
    t = torch.where(first, torch.maximum(ta, tb), ta).clamp(max=t_max)
    r = torch.where(first, torch.minimum(ta, tb).clamp(max=t_max), t)
    h = t - r
    noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    x_t = (1 - _bcast(t, x0)) * x0 + _bcast(t, x0) * noise
    v = noise - x0
    target = v.float()
    if n_mf:
        target = torch.cat([meanflow_target(model, x_t[:n_mf], t[:n_mf], h[:n_mf], v[:n_mf], cond[:n_mf], eps),
                            target[n_mf:]])
    if extra is not None:
        x_t, t, h, target, cond = (torch.cat([u, w.to(u.dtype)]) for u, w in zip((x_t, t, h, target, cond), extra))
    sq = ((velocity(model, x_t, t, h, cond) - target) ** 2).flatten(1).sum(1)
    weighted = (sq / (sq.detach() + 1e-3) ** p).mean()
    return weighted - weighted.detach() + sq.detach().mean() / x0[0].numel()
