"""Transforms: round trips, the bound on decoded showers, the factorised energy/shape codes."""
import numpy as np
import pytest
import torch

from calofast.factorised import FactorisedTransform, energy_fractions, layer_energies
from calofast.geometry import PRESETS
from calofast.transforms import MAX_RESPONSE, Transform, fit_transform, transform_from_spec

DS2 = PRESETS["ds2"]
KINDS = [("log1p", "global"), ("logit", "global"), ("logit", "voxel"), ("layer", "voxel"), ("layer", "global")]


def _showers(n=64, seed=0):
    rng = np.random.default_rng(seed)
    e = np.exp(rng.uniform(np.log(1e3), np.log(1e6), n))
    s = rng.exponential(1.0, (n, DS2.n_voxels)) * (e[:, None] / 5000) * (rng.random((n, DS2.n_voxels)) < 0.3)
    s[s < DS2.threshold_mev] = 0
    s[:4, :144 * 3] = 0                      # some empty layers (first three of four showers)
    return e, s


@pytest.mark.parametrize("kind,std", KINDS)
def test_decode_of_encode_is_identity(kind, std):
    e, s = _showers()
    t = fit_transform(DS2, [(e, s)], kind, standardise=std)
    xs = t.encode(torch.as_tensor(s), torch.as_tensor(e))
    assert [tuple(x.shape[1:]) for x in xs] == list(t.stage_shapes) and all(x.dtype == torch.float32 for x in xs)
    for x in xs:
        if std == "global" or x.ndim == 2:       # standardised on this data (per position: mean 0 each)
            assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 2e-2
    back, clipped = t.decode(xs, torch.as_tensor(e))
    assert not clipped.any()
    np.testing.assert_allclose(back.double().numpy(), s, rtol=2e-5, atol=1e-6 if kind == "log1p" else 2e-3)
    if kind == "layer":                      # layer energies survive exactly (float32 codes)
        np.testing.assert_allclose(back.double().numpy().reshape(64, 45, -1).sum(-1), s.reshape(64, 45, -1).sum(-1),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,std", KINDS)
def test_hostile_codes_decode_to_bounded_showers(kind, std):
    """Whatever a network outputs (huge, NaN, inf, noise), showers are finite, >= 0, thresholded and hold at
    most MAX_RESPONSE x E_inc; showers with non-finite codes (or, one-stage, too much energy) are flagged."""
    e, s = _showers()
    t = fit_transform(DS2, [(e, s)], kind, standardise=std)
    energies = torch.as_tensor(e[:6])
    g = torch.Generator().manual_seed(0)
    hostile = [x + 3 * torch.randn(x.shape, generator=g) for x in t.encode(torch.as_tensor(s[:6]), energies)]
    hostile[-1][0] = t.encode(torch.as_tensor(s[:1]), energies[:1])[-1][0]      # shower 0: a real one
    if kind == "layer":
        hostile[0][0] = t.encode(torch.as_tensor(s[:1]), energies[:1])[0][0]
    for x in hostile:
        x[1] = 1e30
        x[2] = -1e30
        x[3].view(-1)[::7] = float("nan")
        x[4].view(-1)[::5] = float("inf")
    out, clipped = t.decode(hostile, energies)
    assert torch.isfinite(out).all() and (out >= 0).all() and ((out == 0) | (out >= DS2.threshold_mev)).all()
    assert (out.double().sum(1) <= MAX_RESPONSE * energies * (1 + 1e-6)).all()
    assert clipped[3] and clipped[4] and not clipped[0]
    if kind == "log1p":                      # exp of a huge code: far above the bound, scaled down and flagged
        assert clipped[1]


def test_energy_fractions_roundtrip_and_sum():
    g = torch.Generator().manual_seed(1)
    layer_e = torch.rand(16, 45, generator=g, dtype=torch.float64) * (torch.rand(16, 45, generator=g) > 0.3)
    energies = layer_e.sum(1) / 0.9
    u = energy_fractions(layer_e, energies)
    assert u.shape == (16, 45) and (u >= 0).all() and (u <= 1).all()
    torch.testing.assert_close(layer_energies(u, energies), layer_e, rtol=1e-10, atol=1e-12)
    any_u = torch.rand(16, 45, generator=g, dtype=torch.float64)           # any fractions: sum = u_tot x bound
    torch.testing.assert_close(layer_energies(any_u, energies).sum(1), any_u[:, 0] * MAX_RESPONSE * energies)


def test_shape_condition_carries_layer_energies():
    e, s = _showers()
    t = fit_transform(DS2, [(e, s)], "layer", standardise="voxel")
    xs = t.encode(torch.as_tensor(s), torch.as_tensor(e))
    c = t.stage_condition(1, torch.as_tensor(e), xs[:1])
    assert c.shape == (64, 46)
    torch.testing.assert_close(c[:, :1], t.condition(torch.as_tensor(e)))
    empty = torch.as_tensor(s.reshape(64, 45, -1).sum(-1) == 0)
    # Empty layers sit at the floor value: the smallest condition of their layer.
    assert (c[:, 1:][empty] <= c[:, 1:].min(0).values.expand(64, 45)[empty] + 1e-4).all()


def test_condition_roundtrip_and_range():
    e, s = _showers()
    t = fit_transform(DS2, [(e, s)])
    c = t.condition(torch.as_tensor(e))
    assert c.shape == (64, 1) and float(c.min()) == pytest.approx(-1, abs=1e-6) and float(c.max()) == pytest.approx(1, abs=1e-6)
    torch.testing.assert_close(t.energies(c), torch.as_tensor(e), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind,std", KINDS)
def test_constants_roundtrip(kind, std):
    e, s = _showers()
    t = fit_transform(DS2, [(e, s)], kind, alpha=1e-7, standardise=std)
    t2 = transform_from_spec(DS2, t.spec(), t.constants())
    assert type(t2) is type(t)
    for a, b in zip(t.encode(torch.as_tensor(s), torch.as_tensor(e)), t2.encode(torch.as_tensor(s), torch.as_tensor(e))):
        torch.testing.assert_close(a, b)


def test_bad_constants_are_refused():
    with pytest.raises(ValueError):
        Transform(DS2, "sqrt")
    with pytest.raises(ValueError):
        Transform(DS2, "log1p", std=torch.zeros(DS2.n_voxels))
    ones = torch.ones(45, dtype=torch.float64)
    with pytest.raises(ValueError):
        FactorisedTransform(DS2, 1e-6, ones, ones, ones, ones, torch.ones(7), 1.0, 1e3, 1e6)
    with pytest.raises(ValueError):
        FactorisedTransform(DS2, 1e-6, ones, -ones, ones, ones, 0.0, 1.0, 1e3, 1e6)


@pytest.mark.parametrize("std", ["voxel", "global"])
def test_dequantised_codes_fill_the_gap_and_decode_to_the_same_showers(std):
    """Training noise moves only the empty voxels of non-empty layers, into [code of 0, code of the threshold),
    and every such code decodes back to the original shower (the band decodes to empty voxels)."""
    e, s = _showers()
    t = fit_transform(DS2, [(e, s)], "layer", standardise=std, dequantise=True)
    assert transform_from_spec(DS2, t.spec(), t.constants()).dequantise
    energies = torch.as_tensor(e)
    xs = t.encode(torch.as_tensor(s), energies)
    cond = t.conditions(energies, xs)[1]
    noisy = t.dequantised(xs[1], cond, torch.Generator().manual_seed(1))
    assert t.dequantised(xs[0], t.conditions(energies, xs)[0]) is xs[0]          # the energy stage: untouched
    flat, flat_noisy = DS2.to_flat(xs[1]), DS2.to_flat(noisy)
    layer_e = torch.as_tensor(s).reshape(64, 45, -1).sum(-1)
    empty = torch.as_tensor(s == 0) & (layer_e > 0).repeat_interleave(144, 1)
    assert torch.equal(flat_noisy[~empty], flat[~empty])
    assert (flat_noisy[empty] > flat[empty]).float().mean() > 0.99               # a continuous draw, not the spike
    y = flat_noisy.double() * t.v_std + t.v_mean
    at_thr = torch.logit(1e-6 + (1 - 2e-6) * (DS2.threshold_mev / layer_e.clamp_min(1e-30)).clamp(max=1))
    assert (y[empty] <= at_thr.repeat_interleave(144, 1)[empty] + 1e-5).all()
    back, clipped = t.decode([xs[0], noisy], energies)
    assert not clipped.any()
    np.testing.assert_allclose(back.double().numpy(), s, rtol=2e-5, atol=2e-3)
    plain = fit_transform(DS2, [(e, s)], "layer", standardise=std)
    assert plain.dequantised(xs[1], cond) is xs[1] and not plain.spec()["dequantise"]


def test_dequantised_decoding_is_bounded_for_hostile_codes():
    e, s = _showers()
    t = fit_transform(DS2, [(e, s)], "layer", standardise="voxel", dequantise=True)
    energies = torch.as_tensor(e[:4])
    xs = [x + 20 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
          for x in t.encode(torch.as_tensor(s[:4]), energies)]
    xs[1][1] = float("nan")
    out, clipped = t.decode(xs, energies)
    assert torch.isfinite(out).all() and (out >= 0).all() and ((out == 0) | (out >= DS2.threshold_mev)).all()
    assert (out.double().sum(1) <= MAX_RESPONSE * energies * (1 + 1e-6)).all() and clipped[1]
    with pytest.raises(ValueError, match="layer"):
        fit_transform(DS2, [(e, s)], "logit", dequantise=True)
