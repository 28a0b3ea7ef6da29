"""Parameterisations: the oracle expressed as each network output gives the same denoiser."""
import math

import numpy as np
import pytest
import torch

from calofast.diffusion import (EDM, Boundary, DiscreteVP, EpsVP, Preconditioned, VVP, X0VP, denoising_loss,
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
                                   VVP(DiscreteVP("linear", 1000)), Boundary(VVP(), 0.01)])
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


@pytest.mark.parametrize("param", [EpsVP(), VVP(), X0VP(), EDM(sigma_data=0.7), Boundary(EDM(), 0.002)])
def test_parameterisation_serialises(param):
    assert parameterisation_from_dict(parameterisation_to_dict(param)) == param


def test_loss_is_zero_for_the_oracle_and_positive_otherwise():
    for param in (EpsVP(), VVP(), EDM(sigma_data=0.7)):
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
