"""Denoisers that know how far they jump: the seam for single-stage few-step models (shortcut models).

A flow-matching stage sees x_t = (1 - t) x0 + t n and predicts a velocity; a *shortcut* network
s(x_t, t, h) also gets the length h of the jump in t it is asked to make, x_{t-h} = x_t - h s (Frans et
al., arXiv:2410.12557); h = 0 is the ordinary instantaneous velocity. The interval enters the network as
one more condition entry at the *front* of `cond` (the transformer's per-layer embedding reads the last L
entries, so it is unaffected), coded as c(h) = (K + 1 + log2(h / t_max)) / (K + 1) clipped to [0, 1] with
2^K = `max_steps`: the trained jumps t_max / 2^j (j = 0..K) sit evenly at 1, K/(K+1), ..., 1/(K+1), h = 0 at 0.

`IntervalDenoiser` keeps the denoiser interface D(x, sigma, cond). It finds h itself from a sigma grid it
is bound to (`on_grid`): at a grid point the jump goes to the next grid point, off the grid (or unbound)
to t = 0, so D is then the one-jump prediction of x0. With the model's Euler sampler on the bound grid,
each Euler step is exactly one shortcut jump x_t - h s (`generate` and `export` bind Euler's grid, `bind`);
every other sampler sees the one-jump prediction, an ordinary denoiser, as do the metrics.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .diffusion import Flow, Preconditioned, _bcast

__all__ = ["IntervalDenoiser", "uniform_grid", "interval_code", "widen_condition", "velocity", "bind",
           "check_max_steps"]

GRID_TOL = 1e-6             # relative tolerance in t for "sigma is this grid point"


def uniform_grid(steps: int, sigma_max: float) -> torch.Tensor:
    """The `steps`-jump grid, uniform in t from t_max = sigma_max / (1 + sigma_max) to 0, as sigmas (float64)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    t_max = sigma_max / (1 + sigma_max)
    t = t_max * torch.arange(steps, -1, -1, dtype=torch.float64) / steps
    return t / (1 - t)


def check_max_steps(max_steps: int) -> int:
    """K = log2(max_steps) for a power of two max_steps >= 1."""
    if max_steps < 1 or max_steps & (max_steps - 1):
        raise ValueError(f"shortcut max_steps {max_steps}: the smallest jump is t_max / max_steps, a power of two >= 1")
    return int(math.log2(max_steps))


def interval_code(h: torch.Tensor, t_max: float, max_steps: int) -> torch.Tensor:
    """c(h) in [0, 1] (module notes)."""
    n = check_max_steps(max_steps) + 1
    code = (n + torch.log2((h.double() / t_max).clamp_min(2.0 ** -(n + 1)))) / n
    return torch.where(h > 0, code.clamp(0, 1), torch.zeros_like(code))


def widen_condition(net: nn.Module) -> nn.Module:
    """A copy of `net` whose condition takes one more entry at the front, with a zero weight: the copy
    computes exactly what `net` did, whatever that entry holds."""
    net = copy.deepcopy(net)
    old = net.emb.cond_mlp[0]
    new = nn.Linear(old.in_features + 1, old.out_features, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, 1:] = old.weight
        new.bias.copy_(old.bias)
    net.emb.cond_mlp[0] = new
    return net


class IntervalDenoiser(Preconditioned):
    """A flow-matching network with a jump-length input (module notes), behind D(x, sigma, cond).

    `t_max` and `max_steps` (the smallest trained jump is t_max / max_steps) fix the interval code; `grid`
    (a decreasing sigma grid ending in 0) is the one the sampler runs on, or None. `forward(..., interval=h)`
    takes h explicitly (training)."""

    def __init__(self, net: nn.Module, param: Flow, t_max: float, max_steps: int, grid: torch.Tensor | None = None):
        super().__init__(net, param)
        if not isinstance(param, Flow):
            raise ValueError(f"an interval (shortcut) model needs the flow parameterisation, not {param.kind!r}")
        if not 0 < t_max < 1:
            raise ValueError(f"interval code needs 0 < t_max < 1 (got {t_max})")
        check_max_steps(max_steps)
        self.t_max, self.max_steps = float(t_max), int(max_steps)
        device = next(net.parameters()).device          # on the network's device: no copy per call (CUDA graphs)
        self.grid_t = None if grid is None else (grid / (1 + grid)).double().to(device)
        self._bound: dict = {}                           # on_grid's denoisers (a plain dict: not in the state_dict)

    def on_grid(self, grid: torch.Tensor) -> "IntervalDenoiser":
        """The same network (shared weights) bound to the sampler grid `grid`; one object per grid, so a
        compiled one is compiled once (`generate.bound_plan`)."""
        grid = torch.as_tensor(grid, dtype=torch.float64)
        key = tuple(grid.tolist())
        if key not in self._bound:
            self._bound[key] = IntervalDenoiser(self.net, self.param, self.t_max, self.max_steps, grid)
        return self._bound[key]

    def jump(self, sigma: torch.Tensor) -> torch.Tensor:
        """h [B] for per-event sigma [B]: to the next grid point at a grid point, else to t = 0."""
        t = (sigma.double() / (1 + sigma.double()))
        if self.grid_t is None:
            return t
        g = self.grid_t.to(sigma.device)
        hit = (g[None, :-1] - t[:, None]).abs() <= GRID_TOL * g[None, :-1]
        t_next = (hit.double() * g[None, 1:]).sum(1)          # 0 when sigma is not on the grid
        return t - t_next

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
                interval: torch.Tensor | None = None) -> torch.Tensor:
        sigma = sigma.float().reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma.float().reshape(-1)
        h = self.jump(sigma) if interval is None else interval.reshape(-1)
        code = interval_code(h, self.t_max, self.max_steps).to(cond.dtype)
        return super().forward(x, sigma, torch.cat([code[:, None], cond], 1))


def velocity(denoiser, x_t: torch.Tensor, t: torch.Tensor, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """s(x_t, t, h) in t-space (float32) through the denoiser call (so a compiled or DDP wrapper of an
    `IntervalDenoiser` serves it): D = x_t - t s, hence s = (x_t - D) / t."""
    t = t.float().reshape(-1)
    sigma = t / (1 - t)
    x = x_t.float() * _bcast(1 + sigma, x_t)
    return (x_t.float() - denoiser(x, sigma, cond, interval=h)) / _bcast(t, x_t)


def bind(denoiser, sampler: str, grid: torch.Tensor):
    """The denoiser sampler `sampler` should call on `grid`: with Euler an interval model bound to the grid
    (each step one exact jump); with any other sampler, or any other denoiser, the denoiser itself (for an
    interval model the one-jump x0 prediction, which is what a multistep solver expects of D)."""
    return denoiser.on_grid(grid) if isinstance(denoiser, IntervalDenoiser) and sampler == "euler" else denoiser

