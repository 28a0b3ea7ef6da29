"""Parameterisations: the oracle expressed as each network output gives the same denoiser."""
import math

import numpy as np
import pytest
import torch

from calofast.diffusion import (EDM, Boundary, DiscreteVP, EpsVP, Flow, Preconditioned, VVP, X0VP, denoising_loss,
                                parameterisation_from_dict, parameterisation_to_dict)
from calofast.schedules import table_indices, vp_betas, vp_sigmas

from oracle import GaussianDenoiser

D = GaussianDenoiser(mu=0.3, s=0.7)


class OracleNet(torch.nn.Module):
    """Returns the ideal network output F = (D* - c_skip x) / c_out for a given parameterisation."""

    def __init__(self, param):
        super().__init__()
        self.param = param
        self.sigma = None

    def forward(self, x_in, c_noise, cond):
        c_skip, c_out, c_in, _ = self.param.scalings(self.sigma)
        col = lambda v: v.reshape(-1, 1)
        x = x_in / col(c_in)
        return (D(x, self.sigma, None) - col(c_skip) * x) / col(c_out)


@pytest.mark.parametrize("param", [EpsVP(), VVP(), X0VP(), EDM(sigma_data=0.7), EDM(sigma_data=1.3),
                                   VVP(DiscreteVP("linear", 1000)), Boundary(VVP(), 0.01), Flow(), Boundary(Flow(), 0.002)])
def test_oracle_through_every_parameterisation(param):
    net = OracleNet(param)
    pre = Preconditioned(net, param)
    sigma = torch.tensor([0.02, 0.5, 3.0, 70.0], dtype=torch.float64)
    net.sigma = sigma
    x = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    pre = pre.double()
    torch.testing.assert_close(pre(x, sigma, None).double(), D(x, sigma, None), rtol=1e-5, atol=1e-5)


def test_known_scalings():
    s = torch.tensor([0.5])
    cs, co, ci, _ = EpsVP().scalings(s)
    assert (float(cs), float(co), float(ci)) == pytest.approx((1.0, -0.5, 1 / math.sqrt(1.25)))
    cs, co, _, _ = VVP().scalings(s)
    assert (float(cs), float(co)) == pytest.approx((1 / 1.25, -0.5 / math.sqrt(1.25)))
    cs, co, ci, cn = EDM(sigma_data=0.5).scalings(s)
    assert (float(cs), float(co), float(ci), float(cn)) == pytest.approx((0.5, 0.5 / math.sqrt(2), 1 / math.sqrt(0.5), math.log(0.5) / 4))
    cs, co, ci, cn = Flow().scalings(s)                 # t = 1/3: x_t = x / 1.5, D = x_t - t v
    assert (float(cs), float(co), float(ci), float(cn)) == pytest.approx((1 / 1.5, -0.5 / 1.5, 1 / 1.5, 1000 / 3))
    b = Boundary(EDM(sigma_data=0.5), 0.002)
    cs, co, _, _ = b.scalings(torch.tensor([0.002]))
    assert float(cs) == pytest.approx(1.0) and float(co) == pytest.approx(0.0)


def test_vp_tables_match_spec():
    for kind, T, lo, hi, second in (("linear", 1000, 0.0100, 157.4, 155.8), ("linear", 400, 0.0158, 165.8, 161.6),
                                    ("cosine", 1000, 0.0064, 2.03e4, 642), ("cosine", 400, 0.0106, 8116, 257)):
        s = vp_sigmas(kind, T)
        assert np.all(np.diff(s) > 0)
        assert s[0] == pytest.approx(lo, rel=5e-3) and s[-1] == pytest.approx(hi, rel=5e-3)
        assert s[-2] == pytest.approx(second, rel=5e-3)
    assert vp_betas("cosine", 400).max() == pytest.approx(0.999)


def test_time_map_and_spacings():
    table = DiscreteVP("cosine", 400)
    sig = torch.as_tensor(table.sigmas[[0, 17, 399]], dtype=torch.float32)
    torch.testing.assert_close(table.t_of_sigma(sig), torch.tensor([0.0, 17.0, 399.0]), rtol=0, atol=2e-3)
    assert table_indices(1000, 5, "leading").tolist() == [800, 600, 400, 200, 0]
    assert table_indices(1000, 5, "trailing").tolist() == [999, 799, 599, 399, 199]
    assert table_indices(400, 3, "linspace").tolist() == [399, 200, 0]


@pytest.mark.parametrize("param", [EpsVP(), VVP(), X0VP(), EDM(sigma_data=0.7), Boundary(EDM(), 0.002),
                                   Flow(0.9, 0.1, 1.2), Boundary(Flow(), 0.002)])
def test_parameterisation_serialises(param):
    assert parameterisation_from_dict(parameterisation_to_dict(param)) == param


def test_loss_is_zero_for_the_oracle_and_positive_otherwise():
    for param in (EpsVP(), VVP(), EDM(sigma_data=0.7), Flow()):
        net = OracleNet(param)
        pre = Preconditioned(net, param).double()
        g = torch.Generator().manual_seed(1)
        x0 = D.mu + D.s * torch.randn(4096, 1, dtype=torch.float64, generator=g)

        class Wrapped(torch.nn.Module):
            def forward(self, x, sigma, cond):
                net.sigma = sigma
                return pre(x, sigma, cond)

        # The oracle is the minimiser: its loss is the irreducible variance, and a perturbed model is worse.
        loss_opt = float(denoising_loss(Wrapped(), param, x0, None, torch.Generator().manual_seed(2)))

        class Perturbed(Wrapped):
            def forward(self, x, sigma, cond):
                return super().forward(x, sigma, cond) + 0.05
        loss_bad = float(denoising_loss(Perturbed(), param, x0, None, torch.Generator().manual_seed(2)))
        assert np.isfinite(loss_opt) and loss_bad > loss_opt


@pytest.mark.parametrize("T", [400, 1000, 4000])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_any_number_of_training_steps(T, schedule):
    """Tables of any length give finite losses and working table samplers (large T, few sampling steps)."""
    from calofast.generate import make_sigmas
    from calofast.samplers import ddim, ddpm
    from calofast.rng import EventRNG

    param = VVP(DiscreteVP(schedule, T))
    net = OracleNet(param)
    pre = Preconditioned(net, param).double()

    class Wrapped(torch.nn.Module):
        sigma_min, sigma_max, sigma_data = param.sigma_min, param.sigma_max, 1.0

        def forward(self, x, sigma, cond):
            net.sigma = sigma.double()
            return pre(x, sigma, cond)

    w = Wrapped()
    w.param = param
    x0 = D.mu + D.s * torch.randn(512, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert np.isfinite(float(denoising_loss(w, param, x0, None, torch.Generator().manual_seed(1))))
    grid = make_sigmas(w, "ddpm", 20)
    assert len(grid) == 21 and float(grid[0]) == pytest.approx(param.sigma_max)
    z = EventRNG(0, range(64)).randn((32,)).double()
    for sampler in (ddpm, ddim):
        out = sampler(w, z, grid, None, rng=EventRNG(1, range(64)))
        # Sample mean of N(mu, s^2) within 5 standard errors (2048 values).
        assert torch.isfinite(out).all() and abs(float(out.mean()) - D.mu) < 5 * D.s / out.numel() ** 0.5


def test_flow_is_rectified_flow_with_logit_normal_time():
    """The Flow loss is the velocity MSE |v - (n - x0)|^2 on x_t = (1 - t) x0 + t n, t ~ logit-normal(m, s)."""
    param = Flow(m=0.3, s=0.8)
    g = torch.Generator().manual_seed(0)
    sigma = param.sample_sigma(200_000, g, "cpu").double()
    t = sigma / (1 + sigma)
    logit_t = torch.log(t) - torch.log1p(-t)
    # Mean and std of logit(t) within 5 standard errors of (m, s).
    assert abs(float(logit_t.mean()) - 0.3) < 5 * 0.8 / 200_000 ** 0.5
    assert abs(float(logit_t.std()) - 0.8) < 5 * 0.8 / (2 * 200_000) ** 0.5

    class Velocity(torch.nn.Module):                 # a fixed, arbitrary network output
        def forward(self, x_in, c_noise, cond):
            return 0.5 * x_in + 0.001 * c_noise.reshape(-1, 1)

    x0 = torch.randn(64, 3, generator=g, dtype=torch.float64)
    n = torch.randn(64, 3, generator=g, dtype=torch.float64)
    s = torch.exp(torch.randn(64, generator=g, dtype=torch.float64))
    tt = (s / (1 + s)).reshape(-1, 1)
    x_t = (1 - tt) * x0 + tt * n
    pre = Preconditioned(Velocity(), param).double()
    d = pre(x0 + s.reshape(-1, 1) * n, s, None).double()          # the denoiser combines in float32
    v_hat = 0.5 * x_t + 0.001 * 1000 * tt
    torch.testing.assert_close(d, x_t - tt * v_hat, rtol=1e-5, atol=1e-5)          # D = x_t - t v
    _, c_out, _, _ = param.scalings(s)
    w = (param.loss_weight(s) / c_out ** 2).reshape(-1, 1)
    torch.testing.assert_close(w * (d - x0) ** 2, (v_hat - (n - x0)) ** 2, rtol=1e-4, atol=1e-4)
