"""Samplers: pure functions over a Denoiser, one signature, loops over public step functions.

    sampler(denoiser, noise, sigmas, cond, *, rng=None, **knobs) -> x0

`noise` is unit-variance [B, ...]; `sigmas` a decreasing 1-D float64 grid (CPU) ending in 0 (in
sigma_min for the consistency sampler); `cond` is passed through untouched; `rng` (an EventRNG)
supplies the fresh noise of stochastic samplers, which raise without it. No @torch.no_grad here: the
caller decides. Formulas: spec `samplers.md` section 5 (Karras et al. 2022; Lu et al. 2022; Ho et al.
2020; Song et al. 2021; Song et al. 2023).

* euler              DDIM(eta=0) = Euler on the probability-flow ODE in sigma (5.1)
* ddim               DDIM with any eta = Euler-ancestral (5.2)
* ddpm               DDPM ancestral, classic VP update with posterior variance; on a subset of the
                     table this is strided (respaced) DDPM (5.3, 5.4)
* heun               EDM Algorithm 2 with churn (S_churn, S_min, S_max, S_noise); last step Euler (5.5)
* dpmpp_2m           DPM-Solver++(2M), lower-order final steps (5.6)
* dpmpp_2m_sde       DPM-Solver++(2M) SDE, midpoint (5.7)
* unipc              UniPC (Zhao et al. 2023): multistep predictor UniP-p + corrector UniC, data prediction,
                     B(h) = e^h - 1 (bh2) or h (bh1), order 1-3, lower-order warm-up and final step (5.8)
* consistency        multistep consistency sampling (5.9)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["CountingDenoiser", "euler_step", "ddim_step", "ddpm_step", "heun_step", "dpmpp_2m_step",
           "dpmpp_2m_sde_step", "consistency_step", "unipc_update", "euler", "ddim", "ddpm", "heun", "dpmpp_2m",
           "dpmpp_2m_sde", "unipc", "consistency", "SamplerInfo", "SAMPLERS"]


class CountingDenoiser:
    """Wraps a denoiser and counts its calls: the NFE that samplers report is measured, not computed.
    `hook(nfe)`, if given, is called as each call starts (host side, no synchronisation: a progress display)."""

    def __init__(self, denoiser, hook=None):
        self.denoiser, self.nfe, self.hook = denoiser, 0, hook

    def __getattr__(self, name):
        return getattr(self.denoiser, name)

    def __call__(self, x, sigma, cond):
        self.nfe += 1
        if self.hook is not None:
            self.hook(self.nfe)
        return self.denoiser(x, sigma, cond)


def _call(denoiser, x: torch.Tensor, sigma, cond: torch.Tensor) -> torch.Tensor:
    if isinstance(sigma, torch.Tensor):
        return denoiser(x, sigma.reshape(-1).to(x.dtype), cond)
    return denoiser(x, x.new_full((x.shape[0],), sigma), cond)


def _col(sigma, x: torch.Tensor):
    """A per-event sigma tensor [B] as a column broadcasting against x; floats pass through."""
    if isinstance(sigma, torch.Tensor):
        return sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return sigma


def _need(rng, name: str):
    if rng is None:
        raise ValueError(f"{name} is stochastic: pass rng (an EventRNG)")
    return rng


# ---------------------------------------------------------------------------------------- steps
def euler_step(denoiser, x, sigma, sigma_next, cond, denoised=None):
    """x + (sigma_next - sigma) d with d = (x - D)/sigma, computed as r x + (1 - r) D, r = sigma_next/sigma.
    Returns (x_next, denoised).

    The two forms are equal; the second does not cancel in float32 when sigma >> sigma_next (on the 400-step
    cosine table, sigma_max 8116, the first form lost 2.5e-3 relative to float64, this one 4e-6).
    sigma, sigma_next: floats, or per-event tensors [B] (distillation draws a step per event).
    """
    if denoised is None:
        denoised = _call(denoiser, x, sigma, cond)
    r = _col(sigma_next, x) / _col(sigma, x)
    return r * x + (1 - r) * denoised, denoised


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of k-diffusion `get_ancestral_step`."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - up ** 2), up


def ddim_step(denoiser, x, sigma: float, sigma_next: float, cond, *, eta: float = 0.0, rng=None):
    """DDIM(eta) as Euler-ancestral: Euler to sigma_down, then add sigma_up fresh noise."""
    down, up = ancestral_sigmas(sigma, sigma_next, eta)
    x, denoised = euler_step(denoiser, x, sigma, down, cond)
    if up > 0:
        x = x + up * _need(rng, "ddim with eta > 0").randn_like(x)
    return x, denoised


def ddpm_step(denoiser, x, sigma: float, sigma_next: float, cond, *, rng=None):
    """One DDPM ancestral step: the posterior q(z_prev | z_t, x0 = D) of Ho et al. (eq. 6-7, variance beta~).

    With abar = 1/(1+sigma^2), z = sqrt(abar) x, alpha_t = abar_t / abar_prev and beta_t = 1 - alpha_t, the
    mean sqrt(abar_prev) beta_t/(1 - abar_t) x0 + sqrt(alpha_t)(1 - abar_prev)/(1 - abar_t) z_t and the
    variance beta~_t = beta_t (1 - abar_prev)/(1 - abar_t) are, in sigma-space (x = z / sqrt(abar)),
        x_prev = q x + (1 - q) D + sigma_next sqrt(1 - q) noise,   q = sigma_next^2 / sigma^2,
    the same update as the eps form (eq. 11) without its float32 cancellation at large sigma.
    """
    denoised = _call(denoiser, x, sigma, cond)
    q = sigma_next ** 2 / sigma ** 2
    x_prev = q * x + (1 - q) * denoised
    if sigma_next > 0:
        x_prev = x_prev + sigma_next * math.sqrt(1 - q) * _need(rng, "ddpm").randn_like(x)
    return x_prev, denoised


def heun_step(denoiser, x, sigma, sigma_next, cond, *, gamma: float = 0.0, s_noise: float = 1.0,
              rng=None):
    """EDM Algorithm 2, one step: churn to sigma_hat = sigma (1 + gamma), Euler, then the trapezoidal
    correction unless sigma_next = 0. Returns (x_next, denoised at sigma_hat).

    Per-event tensor sigmas [B] are accepted without churn; they must then all be > 0 (distillation).
    """
    if isinstance(sigma, torch.Tensor):
        if gamma > 0 or not bool((sigma_next > 0).all()):
            raise ValueError("tensor sigmas need gamma = 0 and sigma_next > 0")
        x_next, denoised = euler_step(denoiser, x, sigma, sigma_next, cond)
        s, s_next = _col(sigma, x), _col(sigma_next, x)
        d, d2 = (x - denoised) / s, (x_next - _call(denoiser, x_next, sigma_next, cond)) / s_next
        return x + (s_next - s) * (d + d2) / 2, denoised
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        x = x + math.sqrt(sigma_hat ** 2 - sigma ** 2) * s_noise * _need(rng, "heun with churn").randn_like(x)
    denoised = _call(denoiser, x, sigma_hat, cond)
    d = (x - denoised) / sigma_hat
    x_next = x + (sigma_next - sigma_hat) * d
    if sigma_next > 0:
        d2 = (x_next - _call(denoiser, x_next, sigma_next, cond)) / sigma_next
        x_next = x + (sigma_next - sigma_hat) * (d + d2) / 2
    return x_next, denoised


def dpmpp_2m_step(denoiser, x, sigma: float, sigma_next: float, cond, *, old_denoised=None,
                  h_last: float | None = None, first_order: bool = False):
    """DPM-Solver++(2M) step in t = -ln sigma. Returns (x_next, denoised, h)."""
    denoised = _call(denoiser, x, sigma, cond)
    if sigma_next == 0:
        return denoised, denoised, math.inf
    h = math.log(sigma) - math.log(sigma_next)
    d = denoised
    if old_denoised is not None and h_last is not None and not first_order:
        r = h_last / h
        d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return (sigma_next / sigma) * x - math.expm1(-h) * d, denoised, h


def dpmpp_2m_sde_step(denoiser, x, sigma: float, sigma_next: float, cond, *, old_denoised=None,
                      h_last: float | None = None, eta: float = 1.0, s_noise: float = 1.0, rng=None):
    """DPM-Solver++(2M) SDE step (midpoint). Returns (x_next, denoised, h)."""
    denoised = _call(denoiser, x, sigma, cond)
    if sigma_next == 0:
        return denoised, denoised, math.inf
    h = math.log(sigma) - math.log(sigma_next)
    eta_h = eta * h
    g = -math.expm1(-h - eta_h)
    x = (sigma_next / sigma) * math.exp(-eta_h) * x + g * denoised
    if old_denoised is not None and h_last is not None:
        r = h_last / h
        x = x + 0.5 * g * (1 / r) * (denoised - old_denoised)
    if eta > 0 and s_noise > 0:
        x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise * _need(rng, "dpmpp-2m-sde").randn_like(x)
    return x, denoised, h


def unipc_update(x, sigma: float, sigma_next: float, history: list, order: int, *, variant: str = "bh2",
                 corrector_d=None):
    """One UniPC update from sigma to sigma_next in lambda = -ln sigma (data prediction, VE form).

    history: [(sigma_k, D_k)] newest last, history[-1] the denoised at `sigma`; `order` of them are used.
    Predictor (UniP-p): corrector_d None. Corrector (UniC-p): x is the previous point's sample, sigma_next
    the new point and corrector_d the denoised there, already evaluated (no extra NFE)."""
    s0, m0 = history[-1]
    h = math.log(s0) - math.log(sigma_next)
    hh = -h
    rks, d1s = [], []
    for k in range(1, order):
        sk, mk = history[-(k + 1)]
        rk = (math.log(s0) - math.log(sk)) / h          # (lambda_k - lambda_0) / h, negative
        rks.append(rk)
        d1s.append((mk - m0) / rk)
    rks.append(1.0)
    h_phi_1 = math.expm1(hh)
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    x_next = (sigma_next / s0) * x - h_phi_1 * m0
    if corrector_d is None:
        if order == 1:
            return x_next
        rhos = [0.5] if order == 2 else torch.linalg.solve(torch.tensor(rows[:-1], dtype=torch.float64)[:, :-1],
                                                            torch.tensor(b[:-1], dtype=torch.float64)).tolist()
        return x_next - b_h * sum(r * d for r, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else torch.linalg.solve(torch.tensor(rows, dtype=torch.float64),
                                                        torch.tensor(b, dtype=torch.float64)).tolist()
    res = sum((r * d for r, d in zip(rhos[:-1], d1s)), torch.zeros_like(m0)) + rhos[-1] * (corrector_d - m0)
    return x_next - b_h * res


def consistency_step(denoiser, x, sigma: float, cond):
    """One evaluation of the consistency function f(x, sigma) (the student's Denoiser)."""
    return _call(denoiser, x, sigma, cond)


# ---------------------------------------------------------------------------------------- samplers
def _grid(sigmas: torch.Tensor) -> list[float]:
    s = [float(v) for v in sigmas.detach().cpu().double()]
    if len(s) < 2 or any(b >= a for a, b in zip(s, s[1:])):
        raise ValueError("sigmas must be a decreasing grid of at least two entries")
    return s


def euler(denoiser, noise, sigmas, cond, *, rng=None):
    s = _grid(sigmas)
    x = noise * s[0]
    for i in range(len(s) - 1):
        x, _ = euler_step(denoiser, x, s[i], s[i + 1], cond)
    return x


def ddim(denoiser, noise, sigmas, cond, *, rng=None, eta: float = 0.0):
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    s = _grid(sigmas)
    x = noise * s[0]
    for i in range(len(s) - 1):
        x, _ = ddim_step(denoiser, x, s[i], s[i + 1], cond, eta=eta, rng=rng)
    return x


def ddpm(denoiser, noise, sigmas, cond, *, rng=None):
    s = _grid(sigmas)
    x = noise * s[0]
    for i in range(len(s) - 1):
        x, _ = ddpm_step(denoiser, x, s[i], s[i + 1], cond, rng=rng)
    return x


def heun(denoiser, noise, sigmas, cond, *, rng=None, s_churn: float = 0.0, s_min: float = 0.0,
         s_max: float = math.inf, s_noise: float = 1.0):
    s = _grid(sigmas)
    n = len(s) - 1
    x = noise * s[0]
    for i in range(n):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_min <= s[i] <= s_max else 0.0
        x, _ = heun_step(denoiser, x, s[i], s[i + 1], cond, gamma=gamma, s_noise=s_noise, rng=rng)
    return x


def default_lower_order_final(n: int) -> int:
    """Steps at the end taken first order: the last one, as k-diffusion and diffusers do for the 2nd-order
    solver (spec 5.6 proposed 2 below 15 steps; `lower_order_final=2` still gives that)."""
    return 1


def dpmpp_2m(denoiser, noise, sigmas, cond, *, rng=None, lower_order_final: int | None = None):
    s = _grid(sigmas)
    n = len(s) - 1
    k = default_lower_order_final(n) if lower_order_final is None else lower_order_final
    x, old, h_last = noise * s[0], None, None
    for i in range(n):
        x, old, h_last = dpmpp_2m_step(denoiser, x, s[i], s[i + 1], cond, old_denoised=old, h_last=h_last,
                                       first_order=i >= n - k)
    return x


def dpmpp_2m_sde(denoiser, noise, sigmas, cond, *, rng=None, eta: float = 1.0, s_noise: float = 1.0):
    s = _grid(sigmas)
    x, old, h_last = noise * s[0], None, None
    for i in range(len(s) - 1):
        x, old, h_last = dpmpp_2m_sde_step(denoiser, x, s[i], s[i + 1], cond, old_denoised=old, h_last=h_last,
                                           eta=eta, s_noise=s_noise, rng=rng)
    return x


def unipc(denoiser, noise, sigmas, cond, *, rng=None, order: int = 2, variant: str = "bh2", corrector: bool = True,
          lower_order_final: bool = True):
    """UniPC: at each point the denoised corrects the sample that led there (UniC, free), then the predictor
    (UniP) steps on; first steps lower order while history builds up, the last step first order
    (lower_order_final; a step to sigma 0 is always the plain denoised). NFE = steps."""
    if order not in (1, 2, 3) or variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc: order must be 1, 2 or 3 and variant bh1 or bh2 (got {order}, {variant!r})")
    s = _grid(sigmas)
    n = len(s) - 1
    x, history, prev, prev_order = noise * s[0], [], None, 0
    for i in range(n):
        d = _call(denoiser, x, s[i], cond)
        if corrector and prev is not None:
            x = unipc_update(prev, s[i - 1], s[i], history, prev_order, variant=variant, corrector_d=d)
        history = (history + [(s[i], d)])[-order:]
        p = min(order, len(history), n - i if lower_order_final else order)
        prev, prev_order = x, p
        x = d if s[i + 1] == 0 else unipc_update(x, s[i], s[i + 1], history, p, variant=variant)
    return x


def consistency(denoiser, noise, sigmas, cond, *, rng=None):
    """sigmas = [s_0 > ... > s_{K-1}, sigma_min]: K evaluations; between them re-noise to s_{k+1}."""
    s = _grid(sigmas)
    sigma_min, points = s[-1], s[:-1]
    x = noise * points[0]
    for k, sigma in enumerate(points):
        x0 = consistency_step(denoiser, x, sigma, cond)
        if k + 1 < len(points):
            x = x0 + math.sqrt(points[k + 1] ** 2 - sigma_min ** 2) * _need(rng, "multistep consistency").randn_like(x0)
    return x0


@dataclass(frozen=True)
class SamplerInfo:
    fn: Callable
    stochastic: bool
    grid: str                    # default grid: 'table' (discrete models) / 'karras' / 'consistency'
    nfe: Callable[[int], int]    # expected NFE for N steps (a check; NFE reported is counted)


SAMPLERS: dict[str, SamplerInfo] = {
    "euler": SamplerInfo(euler, False, "karras", lambda n: n),
    "ddim": SamplerInfo(ddim, False, "table", lambda n: n),           # stochastic when eta > 0
    "ddpm": SamplerInfo(ddpm, True, "table", lambda n: n),
    "heun": SamplerInfo(heun, False, "karras", lambda n: 2 * n - 1),  # stochastic when s_churn > 0
    "dpmpp-2m": SamplerInfo(dpmpp_2m, False, "karras", lambda n: n),
    "dpmpp-2m-sde": SamplerInfo(dpmpp_2m_sde, True, "karras", lambda n: n),
    "unipc": SamplerInfo(unipc, False, "karras", lambda n: n),
    "consistency": SamplerInfo(consistency, True, "consistency", lambda n: n),
}
