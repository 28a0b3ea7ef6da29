"""Diffusion parameterisations as scalings, and the one denoiser interface D(x, sigma, cond) -> x0_hat.

Everything lives in sigma-space (x = x0 + sigma n; spec `samplers.md` sections 1-3, EDM arXiv:2206.00364
Table 1). A parameterisation is four scalings of a raw network F,

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), cond),

plus a training distribution of sigma and a loss weight; samplers never branch on it.

* `EpsVP`, `VVP`, `X0VP`: DDPM-style models on a discrete VP table (linear or cosine, any T). The network
  sees the VP-scaled input x / sqrt(sigma^2 + 1) and the table index t(sigma) (linear interpolation in
  ln sigma, k-diffusion `DiscreteSchedule`), mapped to [0, 1000].
* `EDM`: Karras et al. preconditioning with sigma_data measured from the data.
* `Flow`: rectified flow / conditional flow matching (Liu et al. 2022; Lipman et al. 2022; Esser et al.
  2024): the linear path x_t = (1 - t) x0 + t n is x = x0 + sigma n with sigma = t / (1 - t), so the
  network sees x_t = x / (1 + sigma) and t, predicts the velocity v = n - x0, and the logit-normal
  t of SD3 is ln sigma ~ N(m, s^2). Every sampler runs on it unchanged.
* `Boundary`: the consistency-model boundary condition f(x, sigma_min) = x wrapped around any of them
  (c_skip -> 1, c_out -> 0 at sigma_min), so a student can start from its teacher's weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .schedules import vp_sigmas

__all__ = ["Denoiser", "Parameterisation", "DiscreteVP", "EpsVP", "VVP", "X0VP", "EDM", "Flow", "Boundary",
           "Preconditioned", "denoising_loss", "parameterisation_from_dict", "parameterisation_to_dict",
           "build_parameterisation"]


class Denoiser(Protocol):
    sigma_min: float
    sigma_max: float
    sigma_data: float

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor: ...


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


@dataclass(frozen=True)
class DiscreteVP:
    """A discrete VP table (improved-diffusion betas) and its sigma <-> t maps."""

    schedule: str = "cosine"   # 'linear' or 'cosine'
    T: int = 400
    # ln sigma table per device: constant data built once, kept out of comparisons and repr.
    _log_tables: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self):
        sigmas = vp_sigmas(self.schedule, self.T)
        self._log_tables["float64"] = sigmas
        self._log_tables["cpu"] = torch.log(torch.as_tensor(sigmas)).float()

    @property
    def sigmas(self) -> np.ndarray:
        """The exact float64 table sigma_0 < ... < sigma_{T-1} (a copy)."""
        return self._log_tables["float64"].copy()

    def log_table(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._log_tables:
            self._log_tables[key] = self._log_tables["cpu"].to(device)
        return self._log_tables[key]

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional table index of sigma, by linear interpolation in ln sigma (clamped to the table)."""
        log_table = self.log_table(sigma.device)
        ls = torch.log(sigma.float().clamp_min(1e-20)).clamp(log_table[0], log_table[-1])
        # Index of the first table entry >= ls (a comparison count rather than searchsorted: exports to ONNX).
        hi = (log_table[None, :] < ls[:, None]).sum(dim=1).clamp(1, self.T - 1)
        lo = hi - 1
        w = (ls - log_table[lo]) / (log_table[hi] - log_table[lo])
        return lo.float() + w

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.t_of_sigma(sigma) * (1000.0 / (self.T - 1))

    def sample_sigma(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        idx = torch.randint(0, self.T, (n,), generator=generator, device=device)
        return torch.exp(self.log_table(idx.device))[idx]


@dataclass(frozen=True)
class _VPParam:
    table: DiscreteVP = field(default_factory=DiscreteVP)
    sigma_data: float = 1.0    # standard VP models assume unit-variance data

    @property
    def sigma_min(self) -> float:
        return float(self.table.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.table.sigmas[-1])

    def sample_sigma(self, n, generator, device):
        return self.table.sample_sigma(n, generator, device)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)          # unweighted MSE in the network's output space

    def _c_in(self, sigma):
        return 1.0 / torch.sqrt(sigma ** 2 + 1.0)


@dataclass(frozen=True)
class EpsVP(_VPParam):
    """eps-prediction (DDPM): D = x - sigma eps_theta (k-diffusion DiscreteEpsDDPMDenoiser)."""

    kind = "eps"

    def scalings(self, sigma):
        return torch.ones_like(sigma), -sigma, self._c_in(sigma), self.table.c_noise(sigma)


@dataclass(frozen=True)
class VVP(_VPParam):
    """v-prediction (Salimans & Ho): D = x/(sigma^2+1) - sigma/sqrt(sigma^2+1) v_theta."""

    kind = "v"

    def scalings(self, sigma):
        s2 = sigma ** 2 + 1.0
        return 1.0 / s2, -sigma / torch.sqrt(s2), self._c_in(sigma), self.table.c_noise(sigma)


@dataclass(frozen=True)
class X0VP(_VPParam):
    """x0-prediction: D = x0_theta."""

    kind = "x0"

    def scalings(self, sigma):
        return torch.zeros_like(sigma), torch.ones_like(sigma), self._c_in(sigma), self.table.c_noise(sigma)


@dataclass(frozen=True)
class EDM:
    """EDM preconditioning (Karras et al. 2022, Table 1), ln sigma ~ N(P_mean, P_std^2) in training."""

    sigma_data: float = 1.0
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    kind = "edm"

    def scalings(self, sigma):
        sd2 = self.sigma_data ** 2
        r = torch.sqrt(sigma ** 2 + sd2)
        return sd2 / (sigma ** 2 + sd2), sigma * self.sigma_data / r, 1.0 / r, torch.log(sigma) / 4

    def sample_sigma(self, n, generator, device):
        z = torch.randn(n, generator=generator, device=device)
        return torch.exp(self.P_mean + self.P_std * z)

    def loss_weight(self, sigma):
        return torch.ones_like(sigma)          # F-space MSE == EDM's lambda(sigma)-weighted D-space MSE


@dataclass(frozen=True)
class Flow:
    """Rectified flow in sigma-space: x_t = x / (1 + sigma), t = sigma / (1 + sigma), F = v = n - x0.

    D = x_t - t v gives c_skip = c_in = 1/(1 + sigma), c_out = -sigma/(1 + sigma); the loss weight 1 makes
    `denoising_loss` the plain velocity MSE. Training t ~ logit-normal(m, s), i.e. ln sigma ~ N(m, s^2).
    c_noise = 1000 t, the range the VP models' time embedding sees.
    """

    sigma_data: float = 1.0
    m: float = 0.0
    s: float = 1.0
    sigma_min: float = 0.002
    sigma_max: float = 160.0
    kind = "flow"

    def scalings(self, sigma):
        k = 1.0 / (1.0 + sigma)
        return k, -sigma * k, k, 1000.0 * sigma * k

    def sample_sigma(self, n, generator, device):
        z = torch.randn(n, generator=generator, device=device)
        return torch.exp(self.m + self.s * z)

    def loss_weight(self, sigma):
        return torch.ones_like(sigma)


@dataclass(frozen=True)
class Boundary:
    """Consistency boundary condition around a base parameterisation (spec 6.2, [inferred] design).

    f(x, sigma) = k x + (1 - k) D_base(x, sigma), k = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2),
    so f(x, sigma_min) = x exactly and f ~ D_base for sigma >> sigma_d.
    """

    base: object
    sigma_min: float
    kind = "boundary"

    @property
    def sigma_data(self) -> float:
        return self.base.sigma_data

    @property
    def sigma_max(self) -> float:
        return self.base.sigma_max

    def scalings(self, sigma):
        cs, co, ci, cn = self.base.scalings(sigma)
        k = self.sigma_data ** 2 / ((sigma - self.sigma_min) ** 2 + self.sigma_data ** 2)
        return k + (1 - k) * cs, (1 - k) * co, ci, cn

    def sample_sigma(self, n, generator, device):
        return self.base.sample_sigma(n, generator, device)

    def loss_weight(self, sigma):
        return self.base.loss_weight(sigma)


Parameterisation = EpsVP | VVP | X0VP | EDM | Flow | Boundary
_VP_KINDS = {"eps": EpsVP, "v": VVP, "x0": X0VP}


def parameterisation_to_dict(p: Parameterisation) -> dict:
    if isinstance(p, Boundary):
        return {"kind": "boundary", "sigma_min": p.sigma_min, "base": parameterisation_to_dict(p.base)}
    if isinstance(p, EDM):
        return {"kind": "edm", "sigma_data": p.sigma_data, "P_mean": p.P_mean, "P_std": p.P_std,
                "sigma_min": p.sigma_min, "sigma_max": p.sigma_max}
    if isinstance(p, Flow):
        return {"kind": "flow", "sigma_data": p.sigma_data, "m": p.m, "s": p.s, "sigma_min": p.sigma_min,
                "sigma_max": p.sigma_max}
    return {"kind": p.kind, "schedule": p.table.schedule, "T": p.table.T, "sigma_data": p.sigma_data}


def parameterisation_from_dict(d: dict) -> Parameterisation:
    kind = d["kind"]
    if kind == "boundary":
        return Boundary(parameterisation_from_dict(d["base"]), float(d["sigma_min"]))
    if kind == "edm":
        return EDM(*(float(d[k]) for k in ("sigma_data", "P_mean", "P_std", "sigma_min", "sigma_max")))
    if kind == "flow":
        return Flow(*(float(d[k]) for k in ("sigma_data", "m", "s", "sigma_min", "sigma_max")))
    if kind in _VP_KINDS:
        return _VP_KINDS[kind](DiscreteVP(d["schedule"], int(d["T"])), float(d["sigma_data"]))
    raise ValueError(f"unknown parameterisation {kind!r}")


class Preconditioned(nn.Module):
    """The Denoiser: a raw network wrapped by a parameterisation. Combination in float32."""

    def __init__(self, net: nn.Module, param: Parameterisation):
        super().__init__()
        self.net, self.param = net, param

    @property
    def sigma_min(self) -> float:
        return self.param.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.param.sigma_max

    @property
    def sigma_data(self) -> float:
        return self.param.sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = x.float()
        sigma = sigma.float().reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma.float().reshape(-1)
        c_skip, c_out, c_in, c_noise = self.param.scalings(sigma)
        F = self.net(_bcast(c_in, x) * x, c_noise, cond).float()
        return _bcast(c_skip, x) * x + _bcast(c_out, x) * F


def denoising_loss(denoiser: nn.Module, param: Parameterisation, x0: torch.Tensor, cond: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """E_sigma,n [ w(sigma) / c_out(sigma)^2 * |D(x0 + sigma n, sigma) - x0|^2 ]  (EDM `EDMLoss`).

    w / c_out^2 turns the D-space error into the network-output-space MSE weighted by w, so eps-, v-,
    x0- and EDM models all train on their usual objective through the same Denoiser call (which is
    what DistributedDataParallel needs to see).
    """
    sigma = param.sample_sigma(x0.shape[0], generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    denoised = denoiser(x0 + _bcast(sigma, x0) * noise, sigma, cond)
    _, c_out, _, _ = param.scalings(sigma)
    w = param.loss_weight(sigma) / c_out ** 2
    return (_bcast(w, x0) * (denoised - x0) ** 2).mean()


def build_parameterisation(cfg, sigma_data: float = 1.0) -> Parameterisation:
    """From a `DiffusionConfig`; `sigma_data` is the measured std of the preprocessed data (EDM)."""
    if cfg.param == "edm":
        sd = cfg.sigma_data or sigma_data
        return EDM(sd, cfg.p_mean, cfg.p_std, cfg.sigma_min * sd / 0.5, cfg.sigma_max * sd / 0.5)
    if cfg.param == "flow":
        # Standardised data: sigma_data is measured (about 1) but the path itself has no sigma_data knob.
        return Flow(cfg.sigma_data or sigma_data, cfg.p_mean, cfg.p_std, cfg.sigma_min, cfg.sigma_max)
    return _VP_KINDS[cfg.param](DiscreteVP(cfg.schedule, cfg.timesteps))
