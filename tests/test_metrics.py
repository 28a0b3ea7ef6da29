"""Metrics: features on hand-made showers, binnings, separation power, AUC/isotonic, FPD/KPD closed forms."""
import numpy as np
import pytest

from calofast.geometry import PRESETS
from calofast.metrics.classifier import FAST, IsotonicCalibrator, classifier_test, energy_groups, group_names, roc_auc
from calofast.metrics.compare import feature_bins, normalised_histogram, separation_power, voxel_bins
from calofast.metrics.features import high_level_vector, shower_features
from calofast.metrics.fpd import fpd, frechet_distance, kpd, mmd2_unbiased

DS2, DS1 = PRESETS["ds2"], PRESETS["ds1-photons"]


def test_single_voxel_features():
    s = np.zeros((1, DS2.n_voxels))
    v = (10 * 16 + 5) * 9 + 3                        # layer 10, alpha bin 5, radial bin 3
    s[0, v] = 500.0
    s[0, 7] = 0.01                                   # below the 15 keV threshold: ignored
    f = shower_features(s, np.array([1000.0]), DS2)
    assert f["E_tot"][0] == 500.0 and f["E_layer"][0, 10] == 500.0 and f["E_layer"][0, 0] == 0
    assert f["EC_r"][0, 10] == pytest.approx(DS2.voxel_r[v]) and f["width_r"][0, 10] == pytest.approx(0, abs=1e-5)
    assert f["EC_eta"][0, 10] == pytest.approx(DS2.voxel_x[v]) and f["EC_phi"][0, 10] == pytest.approx(DS2.voxel_y[v])
    assert f["sparsity"][0, 10] == pytest.approx(1 - 1 / 144) and f["sparsity"][0, 0] == 1.0
    assert f["EC_r"][0, 0] == 0 and f["width_eta"][0, 0] == 0       # empty layers give 0
    assert high_level_vector(f).shape == (1, 362)


def test_two_voxel_width_and_generic_path_agree():
    rng = np.random.default_rng(0)
    s = rng.exponential(5.0, (50, DS2.n_voxels)) * (rng.random((50, DS2.n_voxels)) < 0.2)
    e = rng.uniform(1e3, 1e5, 50)
    fast, generic = shower_features(s, e, DS2), shower_features(s, e, DS2, generic=True)
    for k in fast:
        np.testing.assert_allclose(fast[k], generic[k], rtol=1e-9, atol=1e-5)
    # Two equal deposits at radii r1, r2 of one layer: centre (r1+r2)/2, width |r1-r2|/2.
    one = np.zeros((1, DS2.n_voxels))
    one[0, [2, 6]] = 100.0
    f = shower_features(one, np.array([1e3]), DS2)
    r1, r2 = DS2.voxel_r[2], DS2.voxel_r[6]
    assert f["EC_r"][0, 0] == pytest.approx((r1 + r2) / 2) and f["width_r"][0, 0] == pytest.approx(abs(r1 - r2) / 2)


def test_ds1_features_use_layer_ids():
    s = np.zeros((1, DS1.n_voxels))
    s[0, 363 + 2] = 10.0                               # layer id 12, radial bin 2 (one alpha bin)
    s[0, 8 + 1 * 16 + 1] = 20.0                         # layer id 1 (offset 8, 16 radial bins): alpha 1, radius 1
    f = shower_features(s, np.array([5e3]), DS1)
    assert f["E_layer"].shape == (1, 5) and f["E_layer"][0, 4] == 10.0 and f["E_layer"][0, 1] == 20.0
    assert f["EC_eta"].shape == (1, 2)                  # only layers 1 and 2 are alpha-binned
    assert high_level_vector(f).shape == (1, 30)


def test_binnings_follow_the_protocol():
    assert len(feature_bins("response", DS2, 0)) == 101 and feature_bins("response", DS2, 0)[[0, -1]].tolist() == [0.5, 1.5]
    assert feature_bins("EC_eta", DS2, 5)[[0, -1]].tolist() == [-30, 30]
    assert feature_bins("EC_eta", DS1, 12)[[0, -1]].tolist() == [-500, 500]
    assert feature_bins("width_r", DS1, 14)[-1] == 1500 and feature_bins("width_r", DS2, 3)[-1] == 20
    e = feature_bins("E_layer", DS2, 0, np.array([1.0, 3e4]))
    assert len(e) == 40 and e[0] == pytest.approx(DS2.threshold_mev) and e[-1] == pytest.approx(3e4)
    assert len(voxel_bins(DS2, 5e3)) == 50 and len(feature_bins("sparsity", DS2, 0)) == 21


def test_separation_power_limits():
    edges = np.linspace(0, 1, 11)
    a = np.random.default_rng(0).random(1000)
    h = normalised_histogram(a, edges)
    assert h.sum() == pytest.approx(1.0) and separation_power(h, h) == 0.0
    assert separation_power(normalised_histogram(a * 0.1, edges), normalised_histogram(0.95 + a * 0.04, edges)) == pytest.approx(1.0)
    assert normalised_histogram(np.array([5.0, 6.0]), edges).sum() == 0      # all outside: dropped


def test_auc_and_isotonic_match_scikit_learn():
    sk = pytest.importorskip("sklearn", reason="scikit-learn not installed (test extra)")
    from sklearn.isotonic import IsotonicRegression
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 3000)
    s = np.round(rng.normal(y * 0.7, 1.0), 1)            # many ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    x = np.round(rng.random(800), 2)
    t = (rng.random(800) < x).astype(float)
    q = np.linspace(-0.2, 1.2, 500)
    ours = IsotonicCalibrator().fit(x, t).predict(q)
    ref = IsotonicRegression(y_min=1e-6, y_max=1 - 1e-6, out_of_bounds="clip").fit(x, t).predict(q)
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    assert sk


def test_classifier_separates_and_does_not_invent_differences():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, (3000, 5)), rng.normal(0, 1, (3000, 5))
    same = classifier_test(a, b, FAST, "cpu")
    # AUC of two identical distributions: 0.5 within 5 standard errors of the val-split AUC.
    n = same["n_val"] / 2
    assert abs(same["auc"] - 0.5) < 5 * np.sqrt((2 * n + 1) / (12 * n * n))
    diff = classifier_test(a, b + np.array([1.5, 0, 0, 0, 0]), FAST, "cpu")
    assert diff["auc"] > 0.8 and diff["jsd"] > 0.2


def test_classifier_auc_by_group_finds_where_the_difference_is():
    """Only group 1 of the generated events is shifted: its val AUC is high, group 0's stays at 0.5."""
    rng = np.random.default_rng(5)
    n = 3000
    g_gen, g_ref = rng.integers(0, 2, n), rng.integers(0, 2, n)
    a, b = rng.normal(0, 1, (n, 5)), rng.normal(0, 1, (n, 5))
    a[g_gen == 1, 0] += 2.0
    res = classifier_test(a, b, FAST, "cpu", groups=(g_gen, g_ref))
    by = res["auc_by_group"]
    assert set(by) == {"0", "1"} and sum(v["n_val"] for v in by.values()) == res["n_val"]
    m = by["0"]["n_val"] / 2                             # events per class in group 0's val split, about
    assert abs(by["0"]["auc"] - 0.5) < 5 * np.sqrt((2 * m + 1) / (12 * m * m))
    assert by["1"]["auc"] > 0.8 > by["0"]["auc"]
    with pytest.raises(ValueError, match="one label per event"):
        classifier_test(a, b, FAST, "cpu", groups=(g_gen[:-1], g_ref))
    assert energy_groups(np.array([1e3, 9.99e3, 1e4, 5e5, 1e6])).tolist() == [0, 0, 1, 2, 3]
    assert group_names(np.array([0, 2])) == {0: "1-10 GeV", 2: "100-1000 GeV"}


def test_frechet_distance_closed_form_and_fpd_extrapolation():
    rng = np.random.default_rng(3)
    d, n = 6, 30_000
    s1, s2, dm = 1.0, 1.3, 0.2
    exact = d * dm ** 2 + d * (s1 ** 2 + s2 ** 2 - 2 * s1 * s2)
    assert frechet_distance(np.zeros(d), np.eye(d) * s1 ** 2, np.full(d, dm), np.eye(d) * s2 ** 2) == pytest.approx(exact)
    x, y = rng.normal(0, s1, (n, d)), rng.normal(dm, s2, (n, d))
    val, err = fpd(x, y, min_samples=3000, max_samples=15_000, normalise=False)
    # Finite sets of n rows: the empirical means differ from the true ones by ~ sqrt(d (s1^2 + s2^2) / n).
    finite = 2 * dm * np.sqrt(d * (s1 ** 2 + s2 ** 2) / n) + d * (s1 ** 2 + s2 ** 2) / n
    assert abs(val - exact) < 5 * err + 3 * finite, (val, err, exact)
    same, same_err = fpd(x[: n // 2], x[n // 2:], min_samples=3000, max_samples=15_000, normalise=False)
    assert same < 3 * finite + 5 * same_err and same < exact / 20


def test_kpd_unbiased_estimator_and_behaviour():
    rng = np.random.default_rng(4)
    x, y = rng.normal(0, 1, (40, 3)), rng.normal(0.5, 1, (30, 3))
    k = lambda a, b: (a @ b / 3 + 1) ** 4
    brute = (sum(k(x[i], x[j]) for i in range(40) for j in range(40) if i != j) / (40 * 39)
             + sum(k(y[i], y[j]) for i in range(30) for j in range(30) if i != j) / (30 * 29)
             - 2 * sum(k(x[i], y[j]) for i in range(40) for j in range(30)) / (40 * 30))
    assert mmd2_unbiased(x, y) == pytest.approx(brute, rel=1e-10)
    a, b = rng.normal(0, 1, (4000, 5)), rng.normal(0, 1, (4000, 5))
    same, err = kpd(a, b, batch_size=2000)
    assert abs(same) < 3 * err + 1e-12
    shifted, err2 = kpd(a, b + 0.3, batch_size=2000)
    assert shifted > 5 * err2
