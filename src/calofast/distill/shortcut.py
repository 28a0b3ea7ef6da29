"""Shortcut-model training (Frans et al., arXiv:2410.12557) of a flow-matching stage: one run, one loss,
every jump size at once (no stage-by-stage distillation). The network is an `IntervalDenoiser`.

Per batch, a fraction 1 - q of the events gets the flow-matching loss at h = 0 (t logit-normal as the
teacher trained, target n - x0); the other q the self-consistency loss at a jump 2d = t_max / 2^j, j
uniform in 0..K (2^K = max_steps), from a point t = t_max i / 2^j of that jump's grid (i uniform in
1..2^j): the target is the mean of two jumps of d, taken by the model itself without gradient,

    s(x_t, t, 2d) <- [s(x_t, t, d) + s(x_t - d s(x_t, t, d), t - d, d)] / 2,

with the smallest jump's halves (j = K) taken at h = 0, the instantaneous velocity. Both parts are the
plain squared error in the network's output (velocity) space, one mean over all entries.

The bootstrap's errors compound over the K levels up to the jumps a 1- or 2-step student takes. With
`TeacherTargets` the J top levels also learn from the frozen teacher's ODE: trajectories from t_max (Heun on a
Karras grid holding the points t_max k / 2^(J-1)) give, for each jump t_max / 2^j (j < J) between two of those
points, the target (x_a - x_b) / h, 2^J - 1 pairs per trajectory. The trajectories of a whole batch are
computed at once (a small batch of teacher calls is launch-bound: 64 trajectories cost 11.5 training-batch
forwards on an H200) into a shuffled buffer of pairs, and each step appends `fraction` x batch of them to its
batch until the buffer is used up. The buffer is not part of the resume state: a resumed run redraws it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..interval import IntervalDenoiser, check_max_steps, velocity
from ..samplers import heun_step
from ..schedules import karras

__all__ = ["shortcut_loss", "TeacherTargets"]


class _Instant:
    """A shortcut teacher's instantaneous velocity (h = 0) behind the plain denoiser call."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, sigma, cond):
        return self.model(x, sigma, cond, interval=torch.zeros_like(sigma))


@dataclass
class TeacherTargets:
    """Top-level targets from the teacher's ODE (module notes): `denoiser` the frozen teacher's D(x, sigma, cond)
    (`of` makes it from a teacher stage), `fraction` x batch pairs appended to each step, `levels` = J, `steps`
    Heun steps on the Karras grid from sigma_max(t_max) to sigma_min."""

    denoiser: object
    t_max: float
    fraction: float
    levels: int = 3
    steps: int = 32
    sigma_min: float = 0.002
    _buffer: tuple | None = None
    _used: int = 0

    @classmethod
    def of(cls, teacher, compile: bool, **kw) -> "TeacherTargets":
        """From a teacher stage's denoiser (a shortcut model runs at h = 0), compiled if asked."""
        den = torch.compile(teacher) if compile else teacher
        return cls(_Instant(den) if isinstance(teacher, IntervalDenoiser) else den, sigma_min=teacher.sigma_min, **kw)

    def grid(self) -> tuple[list[float], list[int]]:
        """(sigma grid, index of each level point t_max k / S, k = S .. 0, S = 2^(J-1)) of one trajectory."""
        n_seg = 2 ** (self.levels - 1)
        marks = [self.t_max * k / n_seg for k in range(n_seg, 0, -1)]
        mark_s = [t / (1 - t) for t in marks] + [0.0]
        fill = [v for v in karras(self.steps, self.sigma_min, mark_s[0]).tolist()
                if all(abs(v - m) > 1e-9 * max(m, 1e-12) for m in mark_s)]
        grid = sorted(set(fill) | set(mark_s), reverse=True)
        return grid, [grid.index(m) for m in mark_s]

    @torch.no_grad()
    def pairs(self, x0: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor):
        """(x_a, t_a, h, target velocity, cond) for every jump of every trajectory started from (x0, noise)."""
        grid, marks = self.grid()
        x = x0 + grid[0] * noise                                          # sigma-space: x_t (1 + sigma)
        states = {0: x}
        for i in range(len(grid) - 1):
            x, _ = heun_step(self.denoiser, x, grid[i], grid[i + 1], cond)
            if i + 1 in marks:
                states[i + 1] = x
        pts = [states[m].float() / (1 + grid[m]) for m in marks]         # t-space states at the level points
        n_seg = len(marks) - 1
        jumps = [(a, n_seg >> j) for j in range(self.levels) for a in range(0, n_seg, n_seg >> j)]  # (start, length)

        def full(v: float) -> torch.Tensor:
            return torch.full((x0.shape[0],), v, device=x0.device)

        h = [self.t_max * n / n_seg for _, n in jumps]
        return (torch.cat([pts[a] for a, _ in jumps]),
                torch.cat([full(self.t_max * (n_seg - a) / n_seg) for a, _ in jumps]),
                torch.cat([full(v) for v in h]),
                torch.cat([(pts[a] - pts[a + n]) / v for (a, n), v in zip(jumps, h)]),
                cond.repeat(len(jumps), *([1] * (cond.ndim - 1))))

    def draw(self, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None):
        """round(fraction x batch) pairs (as `pairs` returns them) for this step; when the buffer is used up, it
        is refilled from trajectories of this whole batch (x0, cond) and shuffled."""
        k = int(round(x0.shape[0] * self.fraction))
        if k == 0:
            return None
        if self._buffer is None or self._used + k > self._buffer[0].shape[0]:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            pairs = self.pairs(x0, cond, noise)
            order = torch.randperm(pairs[0].shape[0], generator=generator, device=x0.device)
            self._buffer, self._used = tuple(v[order] for v in pairs), 0      # (2^J - 1) x batch >= k pairs
        out = tuple(v[self._used:self._used + k] for v in self._buffer)
        self._used += k
        return out


def shortcut_loss(model, x0: torch.Tensor, cond: torch.Tensor, t_max: float, max_steps: int, fraction: float,
                  sample_sigma, generator: torch.Generator | None = None,
                  teacher: TeacherTargets | None = None) -> torch.Tensor:
    """One loss evaluation; `model` is (a compiled or DDP wrapper of) an IntervalDenoiser, `sample_sigma` the
    flow parameterisation's training distribution; `teacher`: top-level targets from the teacher's ODE."""
    extra = teacher.draw(x0, cond, generator) if teacher is not None else None
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
    if extra is not None:
        x_t, t, h, target, cond = (torch.cat([u, v.to(u.dtype)]) for u, v in zip((x_t, t, h, target, cond), extra))
    return ((velocity(model, x_t, t, h, cond) - target) ** 2).mean()
