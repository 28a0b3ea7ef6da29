"""Samplers against exact answers (Gaussian oracle), each other, and an independent implementation."""
import math

import pytest
import torch

from calofast import samplers as S
from calofast.rng import EventRNG
from calofast.schedules import karras, table_grid, vp_sigmas

from oracle import GaussianDenoiser

D = GaussianDenoiser()


def _run(name, n, x0_noise, **kw):
    sig = karras(n, D.sigma_min, D.sigma_max)[:-1]          # stop at sigma_min: no final denoise
    return S.SAMPLERS[name].fn(D, x0_noise, sig, None, **kw)


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpmpp-2m", 2)])
def test_convergence_order_matches_theory(name, order):
    """Global error at sigma_min vs the exact ODE solution; observed order on the finest doublings."""
    z = torch.linspace(-3, 3, 61, dtype=torch.float64)[:, None]
    exact = D.ode(z * D.sigma_max, D.sigma_max, D.sigma_min)
    errs = [float((_run(name, n, z) - exact).abs().max()) for n in (16, 32, 64, 128)]
    orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(b < a for a, b in zip(errs, errs[1:]))
    assert abs(orders[-1] - order) <= 0.3, (errs, orders)
    assert abs(orders[-2] - order) <= 0.3 + 0.2 * (order - 1), (errs, orders)   # pre-asymptotic slack


@pytest.mark.parametrize("order, corrector, expected", [(1, True, 2), (2, True, 3), (3, True, 4), (2, False, 2),
                                                      (3, False, 3)])
def test_unipc_convergence_order(order, corrector, expected):
    """UniP-p alone converges at order p; the corrector UniC (no extra NFE) raises it to p + 1 (Zhao et al.
    2023, Theorem 3.3)."""
    z = torch.linspace(-3, 3, 61, dtype=torch.float64)[:, None]
    exact = D.ode(z * D.sigma_max, D.sigma_max, D.sigma_min)
    errs = [float((_run("unipc", n, z, order=order, corrector=corrector) - exact).abs().max()) for n in (32, 64, 128)]
    orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(b < a for a, b in zip(errs, errs[1:]))
    assert abs(orders[-1] - expected) <= 0.3 and abs(orders[-2] - expected) <= 0.3 + 0.1 * expected, (errs, orders)


def test_ddim_eta0_equals_euler():
    z = torch.randn(8, 1, 3, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = torch.as_tensor(table_grid(vp_sigmas("cosine", 400), 25))
    torch.testing.assert_close(S.ddim(D, z, sig, None, eta=0.0), S.euler(D, z, sig, None), rtol=0, atol=1e-6)


def _ddpm_eps_form(x, sigmas, rng):
    """Ho et al. eq. 11 in VP variables, float64: the reference the sampler's posterior form must equal."""
    s = [float(v) for v in sigmas]
    x = x * s[0]
    for sigma, sigma_next in zip(s, s[1:]):
        d = D(x, torch.full((x.shape[0],), sigma, dtype=x.dtype), None)
        abar, abar_prev = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
        alpha = abar / abar_prev
        eps = (x - d) / sigma
        z_prev = (math.sqrt(abar) * x - (1 - alpha) / math.sqrt(1 - abar) * eps) / math.sqrt(alpha)
        var = (1 - alpha) * (1 - abar_prev) / (1 - abar)
        if var > 0:
            z_prev = z_prev + math.sqrt(var) * rng.randn_like(x)
        x = z_prev / math.sqrt(abar_prev)
    return x


def test_ddpm_classic_form_equals_ddim_eta1_with_same_noise():
    """DDPM's posterior update == Ho et al.'s eps form (eq. 11) == DDIM(eta=1), same grid and noise (three codes)."""
    table = vp_sigmas("cosine", 400)
    for steps in (400, 50):
        sig = table_grid(table, steps)
        z = EventRNG(1, range(6)).randn((50,)).double()
        a = S.ddpm(D, z, sig, None, rng=EventRNG(2, range(6)))
        b = S.ddim(D, z, sig, None, eta=1.0, rng=EventRNG(2, range(6)))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a, _ddpm_eps_form(z, sig, EventRNG(2, range(6))), rtol=1e-6, atol=1e-6)


class _Smooth:
    """A denoiser that depends on x at large sigma (as a network may): D = 0.3 + 0.5 tanh(x / 100)."""

    def __call__(self, x, sigma, cond):
        return 0.3 + 0.5 * torch.tanh(x / 100)


@pytest.mark.parametrize("step", ["euler", "ddpm"])
def test_float32_step_keeps_the_signal_at_large_sigma(step):
    """One step down from sigma = 8116 (the top of the 400-step cosine table) in float32 and in float64 from
    the same input: the float32 result is within a few roundings of its own size (norm-wise). Written as
    x + (sigma' - sigma)(x - D)/sigma it is off by 2e-6 here (x ~ 8116 cancels down to ~257)."""
    table = vp_sigmas("cosine", 400)
    s, s_next = float(table[-1]), float(table[-2])
    x = (EventRNG(0, range(4)).randn((256,)) * s).float()
    out = []
    for dtype in (torch.float32, torch.float64):
        kw = {"rng": EventRNG(1, range(4))} if step == "ddpm" else {}
        out.append(getattr(S, f"{step}_step")(_Smooth(), x.to(dtype), s, s_next, None, **kw)[0])
    rel = (out[0].double() - out[1]).norm() / out[1].norm()
    assert out[0].dtype == torch.float32 and float(rel) < 4 * 2 ** -24


def _moments_ok(x, n_eff):
    """Sample mean and variance of N(mu, s^2) within 5 standard errors."""
    m, v = float(x.mean()), float(x.var())
    return abs(m - D.mu) < 5 * D.s / math.sqrt(n_eff) and abs(v - D.s ** 2) < 5 * D.s ** 2 * math.sqrt(2 / n_eff)


@pytest.mark.parametrize("name, kw, grid", [
    ("ddpm", {}, "table"),
    ("ddim", {"eta": 1.0}, "table"),
    ("ddim", {"eta": 0.5}, "table"),
    ("heun", {"s_churn": 10.0, "s_min": 0.05, "s_max": 50.0}, "karras"),
    ("dpmpp-2m-sde", {}, "karras"),
])
def test_stochastic_samplers_recover_data_distribution(name, kw, grid):
    table = vp_sigmas("cosine", 400)
    sig = table_grid(table, 400 if grid == "table" else 0) if grid == "table" else karras(100, table[0], 80.0)
    sig = sig.double()
    b, d = 200, 500
    rng = EventRNG(5, range(b))
    # Start from the exact marginal at sigma_0 (removes the prior mismatch, spec 9).
    z = rng.randn((d,)).double() * math.sqrt(D.s ** 2 + float(sig[0]) ** 2) / float(sig[0]) + D.mu / float(sig[0])
    x = S.SAMPLERS[name].fn(D, z, sig, None, rng=rng, **kw)
    assert _moments_ok(x, b * d), (float(x.mean()), float(x.var()))
    # And the output is really random: fresh seeds give different samples.
    assert not torch.equal(x, S.SAMPLERS[name].fn(D, z, sig, None, rng=EventRNG(6, range(b)), **kw))


def test_stochastic_samplers_need_rng():
    sig = karras(5, 0.01, 10.0)
    z = torch.zeros(2, 3, dtype=torch.float64)
    for name, kw in (("ddpm", {}), ("ddim", {"eta": 1.0}), ("dpmpp-2m-sde", {}), ("heun", {"s_churn": 1.0})):
        with pytest.raises(ValueError, match="stochastic|rng"):
            S.SAMPLERS[name].fn(D, z, sig, None, **kw)


def test_consistency_sampler_with_exact_consistency_function():
    class CM:
        sigma_min, sigma_max, sigma_data = D.sigma_min, D.sigma_max, D.s

        def __call__(self, x, sigma, cond):
            return D.consistency(x, sigma, cond)

    b, d = 200, 500
    for points in ([80.0], [80.0, 0.8], [80.0, 2.0, 0.3]):
        sig = torch.tensor(points + [D.sigma_min], dtype=torch.float64)
        rng = EventRNG(9, range(b))
        z = rng.randn((d,)).double()
        x = S.consistency(CM(), z, sig, None, rng=rng)
        # One step from sigma_max maps N(0, 80^2) to N(mu, s^2 + sigma_min^2) up to the prior mismatch
        # (s^2/80^2 relative in the variance, 1e-4 here: below the statistical tolerance).
        assert _moments_ok(x, b * d)


@pytest.mark.parametrize("name, steps, expected", [("euler", 7, 7), ("heun", 7, 13), ("dpmpp-2m", 7, 7),
                                                   ("ddim", 7, 7), ("unipc", 7, 7), ("consistency", 2, 2)])
def test_nfe_is_counted(name, steps, expected):
    counted = S.CountingDenoiser(D)
    sig = karras(steps, 0.01, 80.0) if name != "consistency" else torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64)
    S.SAMPLERS[name].fn(counted, torch.zeros(2, 3, dtype=torch.float64), sig, None, rng=EventRNG(0, range(2)))
    assert counted.nfe == expected == S.SAMPLERS[name].nfe(steps)


def test_dpmpp_2m_matches_fine_euler_reference():
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    ref = S.euler(D, z, karras(1000, D.sigma_min, D.sigma_max), None)
    out = S.dpmpp_2m(D, z, karras(40, D.sigma_min, D.sigma_max), None)
    exact = D.ode(z * D.sigma_max, D.sigma_max, D.sigma_min)
    exact = D(exact, torch.full((9,), D.sigma_min, dtype=torch.float64), None)    # the final first-order denoise step
    assert float((out - exact).abs().max()) < float((ref - exact).abs().max()) * 5 + 1e-4


def test_grid_validation():
    with pytest.raises(ValueError, match="decreasing"):
        S.euler(D, torch.zeros(1, 2, dtype=torch.float64), torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), None)
    with pytest.raises(ValueError, match="eta"):
        S.ddim(D, torch.zeros(1, 2, dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64), None, eta=2.0)
