"""Distribution matching for a shortcut student (DMD: Yin et al. 2024, arXiv:2311.18828; DMD2: arXiv:2405.14867).

The shortcut loss teaches each jump to land where the teacher's ODE lands, in the mean: where the map from noise
to shower is too sharp for the network, the jump lands on an average of the possible showers. Distribution
matching instead compares what the student's 1- and 2-jump showers look like, as a distribution, with what the
teacher's model of the data says they should look like.

The student makes showers x = G(n) with k Euler jumps on the uniform t-grid (the `generate` pipeline: x_{t_max}
= t_max n, x_{t-h} = x_t - h s(x_t, t, h)), gradient kept through every jump. A *critic* (the fake score),
initialised as the teacher, is trained with the teacher's own flow-matching loss on the student's showers
(stop-gradient), so it models the student's distribution while the frozen teacher models the data's. With both
denoisers at a noised x_t = (1 - t) x + t n' (t from the teacher's training distribution), the gradient of the
reverse KL divergence of the two distributions with respect to x is, per event,

    grad = (D_critic(x_t) - D_teacher(x_t)) / mean |x - D_teacher(x_t)|      (DMD eq. 7-8, the weight per event),

applied as the loss 0.5 |x - sg(x - grad)|^2 (mean over entries), whose gradient in x is grad / entries: the
student's showers move towards where the teacher's density exceeds the critic's. The critic takes `updates`
optimiser steps on each batch of student showers before the student's step (DMD2's two time-scale rule), with
its own AdamW; it is part of the resume state but not of the bundle. The term is ramped up over `warmup` student
steps, while the critic learns the student's distribution. The loss returned is added, with a weight,
to the shortcut loss, which keeps every other jump size (and the h = 0 velocity) the teacher's.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..diffusion import Preconditioned, _bcast, denoising_loss
from ..interval import IntervalDenoiser, velocity

__all__ = ["DistributionMatching", "jump_sample"]


def jump_sample(model, noise: torch.Tensor, cond: torch.Tensor, t_max: float, steps: int) -> torch.Tensor:
    """Showers (codes) of `steps` Euler jumps of the interval model `model` from x_{t_max} = t_max noise on the
    uniform t-grid, as `generate` makes them; differentiable in the model's weights."""
    n = noise.shape[0]
    h = torch.full((n,), t_max / steps, device=noise.device)
    x = t_max * noise.float()
    for k in range(steps):
        t = torch.full((n,), t_max * (steps - k) / steps, device=noise.device)
        x = x - _bcast(h, x) * velocity(model, x, t, h, cond)
    return x


@dataclass
class DistributionMatching:
    """The distribution-matching term (module notes). `real`: the frozen teacher's D(x, sigma, cond), a flow
    denoiser; `critic`: the fake-score denoiser (a trainable copy of the teacher); `jumps`: the student's step
    counts matched (the DMD share of a batch is split evenly over them); `fraction`: that share of each batch."""

    real: Preconditioned
    critic: Preconditioned
    t_max: float
    jumps: tuple[int, ...] = (1, 2)
    fraction: float = 0.25
    updates: int = 2
    lr: float = 1e-4
    grad_clip: float = 1.0
    warmup: int = 0
    compile: bool = False
    opt: torch.optim.Optimizer = field(init=False)
    calls: int = field(init=False, default=0)
    _sums: dict = field(init=False, default_factory=dict)

    def __post_init__(self):
        if not self.jumps or min(self.jumps) < 1:
            raise ValueError(f"distribution matching needs step counts >= 1, not {self.jumps}")
        self.critic.train().requires_grad_(True)
        self.real.eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.critic.parameters(), lr=self.lr, weight_decay=0.0)
        self._critic = torch.compile(self.critic) if self.compile else self.critic
        self._real = torch.compile(self.real) if self.compile else self.real

    @classmethod
    def of(cls, teacher: Preconditioned, **kw) -> "DistributionMatching":
        """From the teacher's (plain flow) main-stage denoiser: the teacher itself as the real score, a copy of it
        as the critic."""
        if not isinstance(teacher, Preconditioned) or teacher.param.kind != "flow" or isinstance(teacher, IntervalDenoiser):
            raise ValueError("distribution matching needs a plain flow-matching teacher (not a shortcut student) as "
                             "the real score: give the original teacher with --targets-from")
        critic = Preconditioned(copy.deepcopy(teacher.net), teacher.param)
        return cls(teacher, critic, **kw)

    # -- resume state (fit's extra_modules) ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "opt": self.opt.state_dict(), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.opt.load_state_dict(state["opt"])
        self.calls = int(state["calls"])

    def stats(self) -> dict:
        """Means since the last call: the critic's loss and |grad| (the DMD gradient per entry)."""
        out = {k: round(float(s) / n, 6) for k, (s, n) in self._sums.items()}
        self._sums = {}
        return out

    def _add(self, **values: torch.Tensor) -> None:
        for k, v in values.items():       # summed on the device: no sync per step
            s, n = self._sums.get(k, (0.0, 0))
            self._sums[k] = (s + v.detach().float(), n + 1)

    # -- one evaluation -------------------------------------------------------------------------------------------
    def samples(self, model, cond: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator | None):
        """The student's showers [n, *shape] for `cond` [n, C], the events split evenly over the step counts."""
        noise = torch.randn((cond.shape[0], *shape), generator=generator, device=cond.device)
        parts = torch.arange(cond.shape[0], device=cond.device).tensor_split(len(self.jumps))
        return torch.cat([jump_sample(model, noise[p], cond[p], self.t_max, k) for p, k in zip(parts, self.jumps)])

    def _train_critic(self, x: torch.Tensor, cond: torch.Tensor, generator) -> None:
        for _ in range(self.updates):
            loss = denoising_loss(self._critic, self.critic.param, x, cond, generator)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.critic.parameters(), self.grad_clip)
            self.opt.step()
        self._add(critic_loss=loss)

    def loss(self, model, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The DMD loss of the first round(fraction x batch) events' conditions (their showers x0 are not used: the
        student makes its own); trains the critic first. Over the first `warmup` calls the loss is ramped up from 0
        while the critic already trains: a critic only a few Adam steps from the teacher differs from it by those
        steps' noise, not by what the student lacks."""
        n = max(len(self.jumps), int(round(x0.shape[0] * self.fraction)))
        cond = cond[:n]
        x = self.samples(model, cond, x0.shape[1:], generator)
        self._train_critic(x.detach(), cond, generator)
        sigma = self.real.param.sample_sigma(n, generator, x0.device)
        noisy = x.detach() + _bcast(sigma, x) * torch.randn(x.shape, generator=generator, device=x.device)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):   # the difference of two near-equal
            d_real = self._real(noisy, sigma, cond.float()).float()           # denoisers: float32, not bf16
            d_fake = self._critic(noisy, sigma, cond.float()).float()
            w = 1.0 / ((x.detach().float() - d_real).abs().flatten(1).mean(1) + 1e-6)
            grad = (d_fake - d_real) * _bcast(w, x)
        self._add(dmd_grad=grad.abs().mean())
        self.calls += 1
        ramp = min(1.0, self.calls / self.warmup) if self.warmup > 0 else 1.0
        return ramp * 0.5 * ((x.float() - (x.detach().float() - grad)) ** 2).mean()
