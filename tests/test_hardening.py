"""Issue 17, second hostile sweep: each refusal is one line naming the option or file, exit 2, before any work, with
nothing made or changed on disk."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from calofast.cli import main
from calofast.geometry import get_geometry
from helpers import tiny_data, tiny_xml

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else
                                         hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


def _refused(args, match, capsys, folder: Path):
    """The command exits 2 with one line containing `match`, and nothing in `folder` is made or changed."""
    before = _digest(folder)
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("calofast: error:") and match in err and err.count("\n") == 1, err
    assert _digest(folder) == before


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A one-stage tiny bundle and two data files on the tiny geometry."""
    from calofast.config import apply_overrides, get_preset
    from calofast.train import train_model
    tmp = tmp_path_factory.mktemp("hardening")
    cfg = apply_overrides(get_preset("tiny"), [f"geometry={tiny_xml(tmp)}", "train.showers=64"])
    bundle = train_model(cfg, tiny_data(tmp, n=64), tmp / "run")
    return tmp, bundle, tiny_data(tmp, n=64), tiny_data(tmp, n=64, seed=1)


@pytest.mark.parametrize("args, match", [
    (["gflash", "--n", "3", "--energies", "fixed:200TeV", "-o", "z.h5"], "above this generator's limit of 100 TeV"),
    (["gflash", "--n", str(10 ** 15), "-o", "z.h5"], "more than the 1e+09 showers"),
    (["gflash", "--n", "3", "--workers", "100000", "-o", "z.h5"], "--workers 100000: this machine has"),
    (["generate", "--model", "ds2-shortcut", "--n", "3", "--energies", "10GeV", "--energies-from", "a.h5",
      "-o", "z.h5"], "choose one"),
    (["generate", "--model", "ds2-shortcut", "--n", str(10 ** 10), "-o", "z.h5"], "more than the 1e+09 showers"),
    (["demo", "--n", str(10 ** 12), "-o", "dm"], "more than the 1e+09 showers"),
    (["export", "--model", "ds2-shortcut", "--steps", "0", "-o", "m.onnx"], "--steps 0"),
    (["export", "--model", "ds2-factorised", "--steps", "300", "-o", "m.onnx"], "at most 256 per stage"),
    (["evaluate", "--generated", "a.h5", "--reference", "b.h5", "--geometry", "ds2", "--min-events", "0",
      "-o", "ev"], "--min-events 0"),
    (["evaluate", "--generated", "a.h5", "--reference", "b.h5", "--geometry", "ds2", "--classifier-seeds", "1000",
      "-o", "ev"], "from 1 to 100"),
    (["info", "a.h5", "--plot", "p.xyz"], "--plot p.xyz: name a picture file"),
    (["study", "plan.toml", "--deadline", "nan", "-o", "s"], "--deadline nan"),
    (["bench", "--model", "ds2-shortcut", "--batch-sizes", "1,,2"], "--batch-sizes 1,,2"),
    (["bench", "--model", "ds2-shortcut", "--batch-sizes", str(10 ** 9)], "needs about"),
    (["train", "--data", "a.h5", "--preset", "tiny", "--set", "train.batch_size=1000000000", "-o", "r"],
     "train.batch_size=1000000000"),
    (["train", "--data", "a.h5", "--preset", "tiny", "--set", "train.showers=1e13", "-o", "r"], "train.showers="),
])
def test_absurd_values_are_refused_before_any_work(tmp_path, monkeypatch, capsys, args, match):
    monkeypatch.chdir(tmp_path)
    _refused(args, match, capsys, tmp_path)


def test_outputs_refuse_links(tmp_path, capsys):
    """--force replaces regular files only: not a link to one, nor a dangling link (which is not 'no file')."""
    target = tmp_path / "keep.h5"
    target.write_bytes(b"keep")
    (tmp_path / "link.h5").symlink_to(target)
    (tmp_path / "dangling.h5").symlink_to(tmp_path / "nowhere.h5")
    _refused(["gflash", "--n", "2", "--force", "-o", tmp_path / "link.h5"], "not a regular file", capsys, tmp_path)
    _refused(["gflash", "--n", "2", "-o", tmp_path / "dangling.h5"], "not a regular file", capsys, tmp_path)


def test_generate_checks_its_inputs_against_each_other(work, capsys):
    tmp, bundle, data, _ = work
    gen = ["generate", "--model", bundle]
    _refused(gen + ["--n", "3", "--energy-sampler", "heun:4", "-o", tmp / "z.h5"], "no energy stage", capsys, tmp)
    _refused(gen + ["--n", "65", "--energies-from", data, "-o", tmp / "z.h5"], "holds only 64 events", capsys, tmp)
    _refused(gen + ["--energies-from", data, "--force", "-o", data], "is the --energies-from file itself", capsys, tmp)
    _refused(gen + ["--n", "3", "--shard", "1/10", "-o", tmp / "z.h5"], "holds none", capsys, tmp)
    _refused(["generate", "--model", bundle.parent, "--n", "3", "-o", tmp / "z.h5"], "give a file in it", capsys, tmp)


def test_merge_refuses_a_missing_last_part(work, capsys):
    tmp, bundle, _, _ = work
    parts = [tmp / f"p{k}.h5" for k in range(2)]
    for k, part in enumerate(parts):
        if not part.exists():
            assert main(["generate", "--model", str(bundle), "--n", "6", "--steps", "2", "--shard", f"{k}/2",
                         "-o", str(part)]) == 0
    capsys.readouterr()
    _refused(["merge", parts[0], "-o", tmp / "m.h5"], "the parts end at event 3 of the run's 6", capsys, tmp)
    _refused(["merge", *parts, "--force", "-o", parts[1]], "is one of the part files", capsys, tmp)
    assert main(["merge", str(parts[0]), str(parts[1]), "-o", str(tmp / "m.h5")]) == 0
    with h5py.File(tmp / "m.h5") as f:
        assert f["showers"].shape[0] == 6 and f.attrs["total_events"] == 6
    (tmp / "m.h5").unlink()


def test_evaluate_keeps_an_earlier_evaluation_unless_forced(work, capsys):
    tmp, _, a, b = work
    ev = ["evaluate", "--generated", a, "--reference", b, "--geometry", tiny_xml(tmp), "--fast", "--min-events",
          "64", "--classifiers", "", "-o", tmp / "ev"]
    assert main([str(x) for x in ev]) == 0
    first = (tmp / "ev" / "metrics.json").stat().st_ino
    capsys.readouterr()
    _refused(ev, "holds an evaluation already (metrics.json, report.html)", capsys, tmp)
    assert main([str(x) for x in ev + ["--force"]]) == 0
    assert (tmp / "ev" / "metrics.json").stat().st_ino != first          # replaced: a new file renamed over it


def test_an_interrupted_evaluation_leaves_no_folder(work, monkeypatch):
    import calofast.evaluate as ev
    tmp, _, a, b = work

    def interrupt(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "file_features", interrupt)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate_files(a, b, get_geometry(str(tiny_xml(tmp))), tmp / "cut", min_events=64, classifiers=())
    assert not (tmp / "cut").exists()


def test_refused_runs_leave_no_folder(work, capsys):
    """Bad data found while reading it (train) or a teacher that cannot be distilled so: no run folder is made."""
    tmp, bundle, data, _ = work
    bad = tmp / "zero.h5"
    with h5py.File(bad, "w") as f:
        f["incident_energies"] = np.zeros((8, 1), "f4")
        f["showers"] = np.zeros((8, 36), "f4")
    _refused(["train", "--data", bad, "--preset", "tiny", "--set", f"geometry={tiny_xml(tmp)}", "-o", tmp / "r1"],
             "non-positive incident energy", capsys, tmp)
    _refused(["distill", "shortcut", "--teacher", bundle, "--data", data, "-o", tmp / "r2"],
             "fine-tuned from a flow-matching teacher", capsys, tmp)
    plan = tmp / "plan.toml"
    plan.write_text(f'[reference]\nfile = "{data}"\nn = 64\n[[rows]]\nlabel = "a"\nmodel = "{tmp}/none.safetensors"\n')
    _refused(["study", plan, "-o", tmp / "s"], "no such model bundle", capsys, tmp)
    plan.unlink()


def test_ctrl_c_reaches_gflash_workers_without_tracebacks(tmp_path):
    """A terminal's Ctrl-C goes to the whole process group: the workers leave it to the main process, which stops
    them and removes its temporary (exit 130, one line, no traceback, nothing left)."""
    proc = subprocess.Popen([sys.executable, "-m", "calofast", "gflash", "--n", "2000000", "--workers", "2",
                             "--chunk", "500", "-o", str(tmp_path / "g.h5")], env={**os.environ, "PYTHONPATH": SRC},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".g.h5.*.tmp")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)                   # the workers are starting (importing) or simulating
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("calofast:")] == \
        ["calofast: interrupted (SIGINT); no partial output was kept"]
    assert list(tmp_path.iterdir()) == []


def test_a_file_declaring_unwritten_events_is_refused_before_reading(tmp_path, capsys):
    """A 2 KB file declaring 10^9 events (chunks never written: they would read as fill values) is refused at
    once by every reader, instead of being read for hours or allocated."""
    path = tmp_path / "forged.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("incident_energies", shape=(10 ** 9, 1), dtype="f4", chunks=(10 ** 5, 1), fillvalue=1e4)
        f.create_dataset("showers", shape=(10 ** 9, 6480), dtype="f4", chunks=(10, 6480))
    for args in (["info", path], ["generate", "--model", "ds2-shortcut", "--energies-from", path, "-o", tmp_path / "z.h5"],
                 ["train", "--data", path, "--preset", "tiny", "-o", tmp_path / "r"]):
        _refused(args, "declares 1,000,000,000 events but stores 0 of its 10,000 chunks", capsys, tmp_path)


def test_training_data_that_cannot_fit_the_device_are_refused(work, monkeypatch):
    import calofast.train as train
    from calofast.checkpoint import load_bundle
    tmp, bundle, data, _ = work
    monkeypatch.setattr(train, "device_memory", lambda device: 1_000)         # bytes: 64 tiny showers need ~9.5 kB
    with pytest.raises(ValueError, match=r"its 64 events need .* set train.max_events=\d+ or fewer"):
        train.load_training_data(data, load_bundle(bundle).transform)


def test_a_message_keeps_its_closing_quotes(work, capsys):
    """The one-line error shows the fix exactly, down to the empty '' it ends with (only a KeyError's own quotes
    are stripped)."""
    tmp, _, a, _ = work
    small = tiny_data(tmp, n=32)
    _refused(["evaluate", "--generated", small, "--reference", a, "--geometry", tiny_xml(tmp), "--min-events", "2",
              "--classifiers", "high", "-o", tmp / "ev2"], "or give --classifiers ''\n", capsys, tmp)
