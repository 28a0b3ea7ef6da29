import numpy as np
import pytest
import torch
from scipy import stats

from calofast.energies import parse_energy, parse_spectrum
from calofast.rng import EventRNG, event_keys, hash32


def test_parse_energy_units():
    assert parse_energy("10GeV") == 1e4 and parse_energy("1TeV") == 1e6 and parse_energy("250") == 250
    assert parse_energy("5eV") == pytest.approx(5e-6) and parse_energy("5e3MeV") == 5e3 and parse_energy(".5 GeV") == 500
    for bad in ("10 parsecs", "-1GeV", "abc"):
        with pytest.raises(ValueError):
            parse_energy(bad)


def test_spectra_are_per_event_and_in_range():
    sp = parse_spectrum("log-uniform:1GeV:1TeV")
    e = sp.sample(3, range(20000))
    assert e.min() >= 1e3 and e.max() <= 1e6
    # log-uniform: log10(E) uniform on [3, 6]; KS test at a fixed seed.
    assert stats.kstest((np.log10(e) - 3) / 3, "uniform").pvalue > 1e-3
    np.testing.assert_array_equal(sp.sample(3, range(100, 200)), e[100:200])
    assert parse_spectrum("fixed:50GeV").sample(0, range(3)).tolist() == [5e4] * 3
    ds1 = parse_spectrum("ds1-photons").sample(0, range(5000))
    assert set(np.log2(ds1).round().astype(int)) <= set(range(8, 23))
    with pytest.raises(ValueError):
        parse_spectrum("log-uniform:1TeV:1GeV")


def test_hash32_matches_python_reference():
    def ref(x):
        x ^= x >> 16; x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15; x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    vals = [0, 1, 12345, 0xFFFFFFFF, 0x80000000, 2**31 - 1, 987654321]
    assert hash32(torch.tensor(vals, dtype=torch.int64)).tolist() == [ref(v) for v in vals]


def test_event_noise_is_batch_independent_and_normal():
    a = EventRNG(7, range(0, 64)).randn((4, 5))
    b = EventRNG(7, range(10, 20)).randn((4, 5))
    torch.testing.assert_close(a[10:20], b, rtol=0, atol=0)
    r = EventRNG(7, range(0, 64))
    first, second = r.randn((1000,)), r.randn((1000,))
    assert not torch.equal(first, second)
    z = torch.cat([first, second]).flatten().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n) and abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    # Neighbouring events and elements are uncorrelated.
    m = first.numpy()
    c = np.corrcoef(m[:-1].ravel(), m[1:].ravel())[0, 1]
    c2 = np.corrcoef(m[:, :-1].ravel(), m[:, 1:].ravel())[0, 1]
    assert abs(c) < 5 / np.sqrt(m[:-1].size) and abs(c2) < 5 / np.sqrt(m[:, :-1].size)
    assert not torch.equal(EventRNG(8, range(3)).randn((5,)), EventRNG(7, range(3)).randn((5,)))


def test_event_keys_vectorised_equals_seedsequence():
    """The vectorised key derivation is numpy's SeedSequence bit for bit (edges of the 32-bit range
    included), and values beyond 32 bits take the per-event SeedSequence path."""
    def loop(seed, events, purpose):
        return np.stack([np.random.SeedSequence([seed, int(k), purpose]).generate_state(2, np.uint32)
                         for k in events]).astype(np.int64)

    cases = [(0, range(2000), 2), (2**32 - 1, range(2**32 - 300, 2**32), 0), (123456789, range(5, 3000, 7), 1),
             (7, [3, 1, 99, 2**31], 2), (2**40, range(4), 2), (3, [2**33, 5], 1)]
    for seed, events, purpose in cases:
        np.testing.assert_array_equal(event_keys(seed, events, purpose), loop(seed, events, purpose))
    np.testing.assert_array_equal(event_keys(3, iter([2**33, 5]), 1), loop(3, [2**33, 5], 1))  # an iterator
    assert event_keys(5, range(0), 2).shape == (0, 2)
