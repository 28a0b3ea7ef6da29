
import numpy as np
import pytest
import torch

from calofast.geometry import PRESETS
from calofast.transforms import Transform, fit_transform

DS2 = PRESETS["ds2"]


def _showers(n=64, seed=0):
    rng = np.random.default_rng(seed)
    e = np.exp(rng.uniform(np.log(1e3), np.log(1e6), n))
    s = rng.exponential(1.0, (n, DS2.n_voxels)) * (e[:, None] / 500) * (rng.random((n, DS2.n_voxels)) < 0.3)
    s[s < DS2.threshold_mev] = 0
    return e, s


@pytest.mark.parametrize("kind", ["log1p", "logit"])
def test_inverse_of_forward_is_identity(kind):
    e, s = _showers()
    t = fit_transform(DS2, [(e, s)], kind)
    x = t(torch.as_tensor(s), torch.as_tensor(e))
    assert x.shape == (64, 1, 45, 16, 9) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3      # standardised on this data
    back = t.inverse(x, torch.as_tensor(e)).double().numpy()
    np.testing.assert_allclose(back, s, rtol=2e-5, atol=1e-3 if kind == "logit" else 1e-6)


@pytest.mark.parametrize("kind", ["log1p", "logit"])
def test_inverse_is_nonnegative_and_thresholded(kind):
    e, s = _showers()
    t = fit_transform(DS2, [(e, s)], kind)
    x = torch.randn(8, 1, 45, 16, 9) * 3
    out = t.inverse(x, torch.as_tensor(e[:8]))
    assert torch.all(out >= 0) and torch.all((out == 0) | (out >= DS2.threshold_mev))
    assert torch.isfinite(t.inverse(torch.full((1, 1, 45, 16, 9), 1e4), torch.tensor([1e3]))).all()


def test_condition_roundtrip_and_range():
    e, s = _showers()
    t = fit_transform(DS2, [(e, s)])
    c = t.condition(torch.as_tensor(e))
    assert c.shape == (64, 1) and float(c.min()) == pytest.approx(-1, abs=1e-6) and float(c.max()) == pytest.approx(1, abs=1e-6)
    torch.testing.assert_close(t.energies(c), torch.as_tensor(e), rtol=1e-6, atol=0)


def test_constants_roundtrip():
    e, s = _showers()
    t = fit_transform(DS2, [(e, s)], "logit", alpha=1e-7)
    t2 = Transform.from_constants(DS2, t.spec(), t.constants())
    x = t(torch.as_tensor(s), torch.as_tensor(e))
    torch.testing.assert_close(t2(torch.as_tensor(s), torch.as_tensor(e)), x)
    with pytest.raises(ValueError):
        Transform(DS2, "sqrt")
