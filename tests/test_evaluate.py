"""The evaluation on the built-in data: GFlash vs GFlash sits at the noise floor, a distorted copy does not.

Fast mode (smaller classifier, 10 epochs at lr 1e-3, fewer FPD/KPD draws) keeps CPU time low; 6000 events per file
give a standard error of the validation AUC of 0.012, so the 0.5 +/- 0.03 band is 2.5 standard errors
(fixed seeds: the outcome is deterministic).
"""
import json

import h5py
import numpy as np
import pytest

from calofast.cli import main
from calofast.data import read_showers, write_showers
from calofast.evaluate import evaluate_files, prepare_reference
from calofast.geometry import PRESETS
from calofast.gflash import write_gflash

DS2 = PRESETS["ds2"]
N = 6000


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    a = write_gflash(tmp / "a.h5", DS2, N, "log-uniform:1GeV:1TeV", seed=101, workers=2, progress=False)
    b = write_gflash(tmp / "b.h5", DS2, N, "log-uniform:1GeV:1TeV", seed=202, workers=2, progress=False)
    e, s = read_showers(b)
    scaled = write_showers(tmp / "scaled.h5", e, s * 1.03)
    grid = s.reshape(N, 45, 144)
    shifted = np.concatenate([np.zeros_like(grid[:, :1]), grid[:, :-1]], axis=1).reshape(N, -1)
    shifted = write_showers(tmp / "shifted.h5", e, shifted)
    return tmp, a, b, scaled, shifted


@pytest.fixture(scope="module")
def reference(files):
    return prepare_reference(files[1], DS2)


def _se(m):
    n = m["n_val"] / 2
    return np.sqrt((2 * n + 1) / (12 * n * n))


def test_gflash_vs_gflash_is_at_the_noise_floor(files, reference):
    tmp, a, b, *_ = files
    m = evaluate_files(a, reference, DS2, tmp / "same", fast=True, min_events=1000, progress=False)
    for key in ("classifier_low", "classifier_high"):
        assert abs(m[key]["auc"] - 0.5) < 0.03 and 0.03 > 2.5 * _se(m[key]), (key, m[key]["auc"])
    assert abs(m["kpd"]["value"]) < 3 * m["kpd"]["error"] + 1e-9
    # FPD of two finite samples has a floor; the floor of two halves of one file is its scale.
    ref_halves = evaluate_files(_half(files, a, 0), _half(files, a, 1), DS2, tmp / "halves", fast=True,
                                min_events=1000, classifiers=(), plots=False, progress=False)
    assert m["fpd"]["value"] < 2.5 * ref_halves["fpd"]["value"]
    assert json.loads((tmp / "same/metrics.json").read_text())["events"] == N
    assert (tmp / "same/report.html").stat().st_size > 50_000
    # The report explains itself: a verdict, the meaning of each number, the AUC per energy decade.
    page = (tmp / "same/report.html").read_text()
    assert "Verdict: the classifiers can hardly tell" in page and "what it means" in page
    assert "by incident energy" in page and "0.5: indistinguishable" in page
    assert set(m["classifier_low"]["auc_by_energy"]) == {"1-10 GeV", "10-100 GeV", "100-1000 GeV"}


def test_report_baseline_column_and_bad_baselines(files, tmp_path, capsys):
    """A baseline (another evaluation's metrics.json) adds a column; a file that is not one is refused in one line."""
    from calofast.report import load_baseline, verdict, write_report
    tmp = files[0]
    m = json.loads((tmp / "same/metrics.json").read_text())
    (tmp_path / "r").mkdir()
    for name in m.get("plots", {}).values():
        (tmp_path / "r" / name).write_bytes((tmp / "same" / name).read_bytes())
    base = dict(m, label="GFlash vs GFlash")
    page = write_report(m, tmp_path / "r", base).read_text()
    assert "baseline: GFlash vs GFlash" in page and page.count(f"{m['classifier_low']['auc']:.4f}") >= 2
    assert verdict({"classifier_low": {"auc": 0.9}, "classifier_high": {"auc": 0.52}}).startswith(
        "Verdict: a classifier tells them apart easily")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json: not a calofast metrics.json"):
        load_baseline(bad)
    assert main(["evaluate", "--generated", str(files[1]), "--reference", str(files[1]), "--baseline",
                 str(tmp_path / "missing.json"), "-o", str(tmp_path / "ev")]) == 2
    assert "missing.json: not a readable metrics.json" in capsys.readouterr().err


def _half(files, path, k):
    tmp = files[0]
    out = tmp / f"half{k}.h5"
    if not out.exists():
        e, s = read_showers(path)
        write_showers(out, e[k::2], s[k::2])
    return out


def test_classifier_seeds_give_the_auc_spread(files, reference):
    """Repeated with other seeds (split and initialisation), the classifier's AUCs on two GFlash samples scatter
    by about their standard error around 0.5; the first is the one-seed result."""
    tmp, a, *_ = files
    m = evaluate_files(a, reference, DS2, tmp / "seeds", fast=True, min_events=1000, classifiers=("high",),
                       distances=False, plots=False, progress=False, classifier_seeds=3)
    s = m["classifier_high"]["auc_seeds"]
    assert s["seeds"] == [0, 1, 2] and s["values"][0] == m["classifier_high"]["auc"] and len(set(s["values"])) == 3
    assert s["mean"] == pytest.approx(np.mean(s["values"])) and s["std"] == pytest.approx(np.std(s["values"], ddof=1))
    se = _se(m["classifier_high"])
    assert all(abs(v - 0.5) < 4 * se for v in s["values"]) and s["std"] < 4 * se
    with pytest.raises(ValueError, match="--classifier-seeds 0"):
        evaluate_files(a, reference, DS2, tmp / "seeds0", fast=True, min_events=1000, classifier_seeds=0)


@pytest.mark.parametrize("which", ["scaled", "shifted"])
def test_distorted_copy_is_detected(files, reference, which):
    tmp, a, b, scaled, shifted = files
    same = json.loads((tmp / "same/metrics.json").read_text()) if (tmp / "same/metrics.json").exists() else \
        evaluate_files(a, reference, DS2, tmp / "same2", fast=True, min_events=1000, plots=False, progress=False)
    m = evaluate_files(scaled if which == "scaled" else shifted, reference, DS2, tmp / which, fast=True,
                       min_events=1000, plots=False, progress=False)
    if which == "shifted":
        # The shortened classifier sees a one-layer shift at once (a 3 % energy scale needs the full one).
        for key in ("classifier_low", "classifier_high"):
            assert m[key]["auc"] > 0.5 + 10 * _se(m[key]) and m[key]["auc"] > same[key]["auc"] + 0.1
    key = "response" if which == "scaled" else "E_layer"
    get = lambda x: x["separation_power"][key] if key == "response" else x["separation_power"][key]["mean"]
    assert get(m) > 5 * get(same)
    assert m["fpd"]["value"] > 3 * same["fpd"]["value"]


def test_refuses_mismatched_files(files, tmp_path, capsys):
    tmp, a, *_ = files
    ds3 = tmp_path / "ds3.h5"
    with h5py.File(ds3, "w") as f:
        f["incident_energies"] = np.ones((10, 1)) * 1e3
        f["showers"] = np.zeros((10, 40500), np.float32)
    assert main(["evaluate", "--generated", str(ds3), "--reference", str(a), "-o", str(tmp_path / "r")]) == 2
    assert "40500 voxels per shower, but geometry ds2 has 6480" in capsys.readouterr().err
    assert main(["evaluate", "--generated", str(a), "--reference", str(a), "-o", str(tmp_path / "r")]) == 2
    assert "the protocol needs 100000" in capsys.readouterr().err
    # Without --geometry the reference's voxel count names it: a DS3 pair is evaluated as DS3, an unknown count is
    # refused with the option to give
    assert main(["evaluate", "--generated", str(ds3), "--reference", str(ds3), "-o", str(tmp_path / "r")]) == 2
    assert "10 events and the protocol needs 100000" in capsys.readouterr().err
    odd = tmp_path / "odd.h5"
    with h5py.File(odd, "w") as f:
        f["incident_energies"] = np.ones((10, 1)) * 1e3
        f["showers"] = np.zeros((10, 77), np.float32)
    assert main(["evaluate", "--generated", str(odd), "--reference", str(odd), "-o", str(tmp_path / "r")]) == 2
    assert "no built-in geometry has 77 voxels" in (err := capsys.readouterr().err) and "give --geometry" in err
    e, s = read_showers(a)
    fewer = write_showers(tmp_path / "fewer.h5", e[:3000], s[:3000])
    assert main(["evaluate", "--generated", str(fewer), "--reference", str(a), "--min-events", "1000", "--fast",
                 "-o", str(tmp_path / "r")]) == 2
    assert "needs equal counts" in capsys.readouterr().err
    # both problems at once, in one line, each with its fix
    assert main(["evaluate", "--generated", str(fewer), "--reference", str(a), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--min-events 3000" in err and "--energies-from" in err and err.count("\n") == 1, err


def test_a_plot_that_fails_is_skipped_and_the_metrics_survive(files, tmp_path, monkeypatch):
    """metrics.json is written before any plot; a plot that raises is named in the report instead."""
    import calofast.plots as plots

    def broken(*a, **k):
        raise ValueError("Number of rows must be a positive integer, not 0")

    monkeypatch.setattr(plots, "plot_mean_showers", broken)
    tmp, a, b, *_ = files
    m = evaluate_files(a, b, DS2, tmp_path / "ev", fast=True, min_events=1000, classifiers=(), distances=False,
                       progress=False)
    saved = json.loads((tmp_path / "ev/metrics.json").read_text())
    assert saved["plot_errors"] == {"mean_showers": "ValueError: Number of rows must be a positive integer, not 0"}
    assert set(saved["plots"]) == {"histograms", "response"} and saved["separation_power"] == m["separation_power"]
    assert "plot <b>mean_showers</b> skipped" in (tmp_path / "ev/report.html").read_text()


def test_energies_from_reads_only_the_energies(tmp_path, capsys):
    """--energies-from takes the incident energies alone (checked) and never reads the showers."""
    from calofast.data import read_energies
    path = write_showers(tmp_path / "e.h5", np.array([1e3, 2e4, 5e5]), np.ones((3, DS2.n_voxels)))
    with h5py.File(path, "r+") as f:
        f["showers"][1] = np.nan                      # a bad shower does not matter for its energy
    np.testing.assert_allclose(read_energies(path, stop=2), [1e3, 2e4])
    with h5py.File(path, "r+") as f:
        f["incident_energies"][2] = -1.0
    assert main(["generate", "--model", "ds2-shortcut", "--energies-from", str(path), "-o",
                 str(tmp_path / "g.h5")]) == 2
    assert "incident energy -1.0 at event 2" in capsys.readouterr().err and not (tmp_path / "g.h5").exists()
