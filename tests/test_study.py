"""`calofast study` on the tiny geometry: plan checks, chunked generation that resumes after a kill and equals
one unchunked run, evaluation in a worker process, the table, plot and index; and a small DS2 plan with a
GFlash reference and the GFlash-vs-GFlash floor row."""
import csv
import json

import numpy as np
import pytest

from calofast.checkpoint import load_bundle
from calofast.cli import main
from calofast.config import apply_overrides, get_preset
from calofast.data import read_showers
from calofast.generate import generate_file
from calofast.study import study
from calofast.study_plan import load_plan
from calofast.train import train_model

from helpers import tiny_data, tiny_xml


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    cfg = apply_overrides(get_preset("tiny"), [f"geometry={tiny_xml(tmp)}", "train.showers=2048"])
    model = train_model(cfg, tiny_data(tmp), tmp / "run")
    return tmp, model, tiny_data(tmp, n=300, seed=5)


def _plan(tmp, model, ref, rows, name="plan.toml", n=300):
    text = f'name = "tiny study"\nchunk = 128\ntiming_repeats = 2\n[reference]\nfile = "{ref}"\nn = {n}\n' \
           f'[defaults]\nmodel = "{model}"\nbatch_size = 100\n' + "".join(f"[[rows]]\n{r}\n" for r in rows)
    path = tmp / name
    path.write_text(text)
    return path


ROWS = ['label = "euler-3"\nsampler = "euler"\nsteps = 3\nfamily = "Euler"',
        'label = "ddim-eta05-4"\nsampler = "ddim"\nsteps = 4\nknobs = { eta = 0.5 }\nfamily = "DDIM"']


def test_plan_errors_name_the_file_and_the_key(tiny, tmp_path, capsys):
    tmp, model, ref = tiny
    bad = {"unknown key": 'label = "a"\nsampler = "euler"\nstep = 3',
           "used twice": 'label = "a"\n[[rows]]\nlabel = "a"',
           "must be letters": 'label = "a b"',
           "takes no option": 'label = "a"\nsampler = "euler"\nknobs = { eta = 0.5 }',
           "unknown sampler": 'label = "a"\nsampler = "magic"'}
    (tmp_path / "seeds.toml").write_text(f'classifier_seeds = 0\n[reference]\nfile = "{ref}"\nn = 10\n'
                                         f'[[rows]]\nlabel = "a"\nmodel = "{model}"\n')
    with pytest.raises(ValueError, match="classifier_seeds = 0: must be a positive integer"):
        load_plan(tmp_path / "seeds.toml")
    for msg, row in bad.items():
        p = _plan(tmp_path, model, ref, [row])
        with pytest.raises(ValueError, match=msg) as err:
            load_plan(p)
        assert str(p) in str(err.value)
    (tmp_path / "nref.toml").write_text(f'[reference]\nfile = "{ref}"\n[[rows]]\nlabel = "a"\nmodel = "m"\n')
    assert main(["study", str(tmp_path / "nref.toml"), "-o", str(tmp_path / "o")]) == 2
    assert "needs n" in capsys.readouterr().err
    assert main(["study", str(tmp_path / "missing.toml"), "-o", str(tmp_path / "o")]) == 2


def test_study_resumes_after_a_kill_and_matches_one_run(tiny, tmp_path, monkeypatch):
    tmp, model, ref = tiny
    plan = _plan(tmp_path, model, ref, ROWS)
    out = tmp_path / "s"
    calls = []
    import calofast.generate as gen_mod
    orig = gen_mod.generate_file

    def dying(*a, **k):                      # the process "dies" while writing the second chunk
        calls.append(k["first_event"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(gen_mod, "generate_file", dying)
    with pytest.raises(KeyboardInterrupt):
        study(plan, out, fast=True, keep_showers=True)
    assert calls == [0, 128] and sorted(p.name for p in (out / "rows/euler-3/chunks").iterdir()) == ["000000000.h5"]
    monkeypatch.setattr(gen_mod, "generate_file", orig)
    assert study(plan, out, fast=True, eval_jobs=1, keep_showers=True) == 0
    # Chunked and resumed = one unchunked run, bit for bit.
    e = read_showers(ref, stop=300)[0].astype(np.float64)
    whole = generate_file(load_bundle(model), tmp_path / "whole.h5", e, seed=1, sampler="euler", steps=3,
                          batch_size=100, progress=False)
    np.testing.assert_array_equal(read_showers(out / "rows/euler-3/showers.h5")[1], read_showers(whole.path)[1])
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [r["label"] for r in rows] == ["euler-3", "ddim-eta05-4"] and all(r["status"] == "ok" for r in rows)
    for r in rows:
        m = json.loads((out / "rows" / r["label"] / "eval/metrics.json").read_text())
        assert float(r["auc_low"]) == m["classifier_low"]["auc"] and int(r["events"]) == 300
        assert float(r["ms_per_shower"]) > 0 and r["nfe"] in ("3", "4")
    assert (out / "pareto.png").stat().st_size > 10_000
    assert 'href="rows/ddim-eta05-4/eval/report.html"' in (out / "index.html").read_text()
    assert "| euler-3 | 3 |" in (out / "table.md").read_text()
    # A finished study re-run does nothing new; a changed row under an old label is refused.
    stamp = (out / "rows/euler-3/eval/metrics.json").stat().st_mtime_ns
    assert study(plan, out, fast=True) == 0
    assert (out / "rows/euler-3/eval/metrics.json").stat().st_mtime_ns == stamp
    changed = _plan(tmp_path, model, ref, [ROWS[0].replace("steps = 3", "steps = 5")], name="changed.toml")
    with pytest.raises(ValueError, match="give it a new label"):     # even though the row is finished
        study(changed, out, fast=True)
    # A row whose report was not kept (a table rebuilt from metrics alone) gets no dead link.
    from calofast.study_report import collect_rows, write_outputs
    (out / "rows/ddim-eta05-4/eval/report.html").unlink()
    write_outputs(out, collect_rows(out, ["ddim-eta05-4"]), "t")
    assert "ddim-eta05-4" in (out / "index.html").read_text() and "report.html" not in (out / "index.html").read_text()


def test_a_row_resumes_only_with_the_same_weights(tiny, tmp_path):
    """The row record holds the model file's sha256: new weights under the same path and label are refused, not
    skipped as done (session 9 lost a call to that)."""
    from calofast.checkpoint import file_sha256
    from calofast.study import _row_dir
    tmp, model, ref = tiny
    weights = tmp_path / "m.safetensors"
    weights.write_bytes(open(model, "rb").read())
    row = load_plan(_plan(tmp_path, weights, ref, ROWS[:1])).rows[0]
    d = _row_dir(tmp_path / "s", row)
    assert json.loads((d / "row.json").read_text())["model_sha256"] == file_sha256(weights)
    assert _row_dir(tmp_path / "s", row) == d                            # same weights: resumed
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))            # other weights, same path
    with pytest.raises(ValueError, match="give it a new label"):
        _row_dir(tmp_path / "s", row)
    old = {k: v for k, v in json.loads((d / "row.json").read_text()).items() if k != "model_sha256"}
    (d / "row.json").write_text(json.dumps(old))                         # a record from before the hash
    assert _row_dir(tmp_path / "s", row) == d and "model_sha256" not in json.loads((d / "row.json").read_text())


def test_classifier_seeds_put_the_auc_spread_in_the_table(tiny, tmp_path):
    tmp, model, ref = tiny
    plan = _plan(tmp_path, model, ref, ROWS[:1])
    seeded = tmp_path / "seeded.toml"
    seeded.write_text("classifier_seeds = 2\n" + plan.read_text())
    assert study(seeded, tmp_path / "s", fast=True) == 0
    m = json.loads((tmp_path / "s/rows/euler-3/eval/metrics.json").read_text())
    row = next(csv.DictReader(open(tmp_path / "s/table.csv")))
    for side in ("low", "high"):
        seeds = m[f"classifier_{side}"]["auc_seeds"]
        assert float(row[f"auc_{side}"]) == seeds["mean"] and float(row[f"auc_{side}_std"]) == seeds["std"]
        assert f"{seeds['mean']:.3f} ± {seeds['std']:.3f}" in (tmp_path / "s/table.md").read_text()
    with pytest.raises(ValueError, match="choose a new output folder"):    # one seed count per study folder
        study(plan, tmp_path / "s", fast=True)


def test_deadline_leaves_rows_to_resume(tiny, tmp_path, capsys):
    tmp, model, ref = tiny
    plan = _plan(tmp_path, model, ref, ROWS)
    assert main(["study", str(plan), "-o", str(tmp_path / "d"), "--fast", "--deadline", "1e-9"]) == 3
    text = capsys.readouterr().out
    assert "2 rows unfinished" in text and "0 of 2 rows done" in text
    assert "not evaluated" in (tmp_path / "d/table.md").read_text()


def test_ds2_plan_with_gflash_reference_and_floor(tmp_path):
    """GFlash reference made by the study, the floor row, and a deliberately poor row: the shipped teacher with
    one Euler step (CPU, --fast)."""
    plan = tmp_path / "ds2.toml"
    plan.write_text('timing_repeats = 0\n[reference]\nn = 400\ngflash_seed = 1001\nfloor_seed = 2002\n'
                    '[[rows]]\nlabel = "euler-1"\nmodel = "ds2-factorised"\nsampler = "euler"\nsteps = 1\n'
                    'batch_size = 200\nfamily = "teacher"\n')
    out = tmp_path / "s"
    assert main(["study", str(plan), "-o", str(out), "--fast"]) == 0
    rows = {r["label"]: r for r in csv.DictReader(open(out / "table.csv"))}
    assert list(rows) == ["gflash-floor", "euler-1"]
    floor, student = rows["gflash-floor"], rows["euler-1"]
    # Against independent GFlash showers the classifier sits near 0.5 (val: 80 + 80 events, AUC std ~0.046, so
    # 0.15 is over 3 sigma); one ODE step (blurred mean showers) is far above it on the high-level features.
    assert abs(float(floor["auc_high"]) - 0.5) < 0.15 and abs(float(floor["auc_low"]) - 0.5) < 0.15
    assert float(student["auc_high"]) > float(floor["auc_high"]) + 0.15
    assert student["nfe"] == "1" and (out / "pareto.png").exists()


def test_shipped_plans_load_and_name_valid_models_and_options():
    from pathlib import Path
    from calofast.checkpoint import shipped_models
    from calofast.generate import check_knobs
    plans = sorted((Path(__file__).parents[1] / "studies").glob("*.toml"))
    assert plans
    for path in plans:
        plan = load_plan(path)
        assert plan.n == 50_000 and plan.floor_seed is not None
        for row in plan.rows:   # a shipped model, or one the plan's header says how to train into runs/
            assert row.model in shipped_models() or (
                row.model.startswith("runs/") and "calofast train" in path.read_text()), (path, row.label)
            check_knobs(row.sampler, row.knobs)
