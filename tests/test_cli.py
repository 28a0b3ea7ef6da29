import os
import stat
import subprocess
import sys

import h5py
import numpy as np
import pytest

from calofast.cli import build_parser, main
from calofast.data import read_showers

from conftest import reference_dir


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    names = list(parser._subparsers._group_actions[0].choices)
    assert {"gflash", "info", "demo"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: calofast " + name in capsys.readouterr().out


def test_python_dash_m_entry():
    r = subprocess.run([sys.executable, "-m", "calofast", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "gflash" in r.stdout


def test_gflash_cli_writes_official_layout(tmp_path, capsys):
    out = tmp_path / "x.h5"
    assert main(["gflash", "--geometry", "ds2", "--n", "30", "--seed", "1", "--chunk", "7", "-o", str(out)]) == 0
    with h5py.File(out) as f:
        assert f["incident_energies"].shape == (30, 1) and f["showers"].shape == (30, 6480)
    # Same seed, other chunk size: identical file contents.
    out2 = tmp_path / "y.h5"
    assert main(["gflash", "--n", "30", "--seed", "1", "--chunk", "30", "-o", str(out2)]) == 0
    np.testing.assert_array_equal(read_showers(out)[1], read_showers(out2)[1])
    # Refuses to overwrite without --force: one line, exit code 2.
    assert main(["gflash", "--n", "5", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("calofast: error:") and "refusing to overwrite" in err


@pytest.mark.skipif(reference_dir() is None, reason="official binning XMLs not found")
def test_xml_geometry_gives_identical_file(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    main(["gflash", "--geometry", "ds2", "--n", "20", "--seed", "4", "-o", str(a)])
    main(["gflash", "--geometry", str(reference_dir() / "binning_dataset_2.xml"), "--n", "20", "--seed", "4", "-o", str(b)])
    for x, y in zip(read_showers(a), read_showers(b)):
        np.testing.assert_array_equal(x, y)


def test_force_never_replaces_a_non_regular_file(tmp_path, capsys):
    """--force overwrites regular files only: a directory or a FIFO (as /dev/full for root) stays."""
    fifo = tmp_path / "fifo.h5"
    os.mkfifo(fifo)
    (tmp_path / "dir.h5").mkdir()
    for target in (fifo, tmp_path / "dir.h5"):
        assert main(["gflash", "--n", "2", "--force", "-o", str(target)]) == 2
        assert "not a regular file" in capsys.readouterr().err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and (tmp_path / "dir.h5").is_dir()


@pytest.mark.parametrize("args, match", [
    (["info", "missing.h5"], "no such file"),
    (["gflash", "--geometry", "ds1-photons", "--n", "3", "-o", "z.h5"], "no material description"),
    (["gflash", "--energies", "log-uniform:1TeV:1GeV", "--n", "3", "-o", "z.h5"], "upper bound"),
    (["gflash", "--energies", "fixed:10MeV", "--n", "3", "-o", "z.h5"], "below the GFlash domain"),
    # issue 17, false success and garbage-making values: refused before any work, the option named
    (["gflash", "--n", "3", "--chunk", "-1", "-o", "z.h5"], "--chunk -1"),
    (["gflash", "--n", "3", "--energies", "", "-o", "z.h5"], "--energies ''"),
    (["generate", "--model", "ds2-shortcut", "--n", "3", "--energies", "", "-o", "z.h5"], "--energies ''"),
    (["generate", "--model", "ds2-shortcut", "--n", "3", "--energies", "foo", "-o", "z.h5"], "--energies 'foo'"),
    (["gflash", "--n", "0", "-o", "z.h5"], "--n 0"),
    (["gflash", "--n", "3", "--workers", "0", "-o", "z.h5"], "--workers 0"),
    (["gflash", "--n", "3", "--seed", str(2 ** 64), "-o", "z.h5"], "must be in [0, 2^63)"),
    (["generate", "--model", "ds2-shortcut", "--n", "3", "--seed", "-1", "-o", "z.h5"], "--seed -1"),
    (["info", "missing.h5", "--max-events", "0"], "--max-events 0"),
    (["generate", "--model", "ds2-shortcut", "--n", "3", "--batch-size", "-1", "-o", "z.h5"], "--batch-size -1"),
    (["generate", "--model", "ds2-shortcut", "--n", "-5", "-o", "z.h5"], "--n -5"),
    (["generate", "--model", "ds2-shortcut", "--n", "3", "--steps", "0", "-o", "z.h5"], "--steps 0"),
    (["generate", "--model", "ds2-shortcut", "--n", "3", "--device", "bogus", "-o", "z.h5"], "--device bogus"),
    (["generate", "--model", "ds2-shortcut", "--n", "3", "--device", "cuda:99", "-o", "z.h5"], "no such CUDA"),
    (["generate", "--model", "ds2-factorised", "--n", "3", "--steps", str(10 ** 11), "-o", "z.h5"], f"{10 ** 11} steps"),
    (["generate", "--model", "ds2-shortcut", "--n", "3", "--energy-sampler", "heun:0", "-o", "z.h5"], "--energy-sampler"),
    (["generate", "--model", "ds2-shortcut", "--n", "3", "--cuda-graph", "-o", "z.h5"], "--cuda-graph needs"),
    (["set-sampler", "--model", "ds2-shortcut", "--stage", "energy", "--sampler", "bogus:3", "-o", "z.h5"], "--sampler"),
    (["set-sampler", "--model", "ds2-shortcut", "--stage", "shape", "--sampler", "heun:3", "-o", "z.h5"], "distilled"),
    (["distill", "shortcut", "--teacher", "ds2-factorised", "--data", "z.h5", "--set",
      "distill.sc_teacher_fraction=2", "-o", "run"], "distill.sc_teacher_fraction=2"),
    (["bench", "--model", "ds2-shortcut", "--batch-sizes", "0", "-o", "z.h5"], "--batch-sizes 0"),
    (["bench", "--model", "ds2-shortcut", "--repeats", "0", "-o", "z.h5"], "--repeats 0"),
    (["bench", "--model", "ds2-shortcut", "--threads", "-1", "-o", "z.h5"], "--threads -1"),
    (["bench", "--model", "ds2-shortcut", "--threads", "100000", "-o", "z.h5"], "--threads 100000: this machine has"),
    (["generate", "--model", "ds2-factorised", "--n", "3", "--sampler", "ddim", "--eta", "nan", "-o", "z.h5"], "--eta nan"),
    (["generate", "--model", "ds2-factorised", "--n", "3", "--sampler", "ddim", "--eta", "1.5", "-o", "z.h5"], "--eta 1.5"),
    (["train", "--data", "z.h5", "--preset", "tiny", "--set", "train.showers=0", "-o", "run"], "train.showers=0"),
    (["train", "--data", "z.h5", "--preset", "tiny", "--set", "train.lr=inf", "-o", "run"], "train.lr=inf"),
    (["train", "--data", "z.h5", "--preset", "tiny", "--set", "train.batch_size=0", "-o", "run"], "batch_size=0"),
    (["train", "--data", "z.h5", "--preset", "tiny-transformer", "--set", "network.heads=0", "-o", "run"], "heads=0"),
    (["distill", "progressive", "--teacher", "ds2-factorised", "--data", "z.h5", "--start-steps", "4",
      "--to-steps", "8", "-o", "run"], "--to-steps 8"),
    (["distill", "shortcut", "--teacher", "ds2-factorised", "--data", "z.h5", "--set", "distill.sc_max_steps=12",
      "-o", "run"], "distill.sc_max_steps=12"),
    (["distill", "shortcut", "--teacher", "ds2-factorised", "--data", "z.h5", "--set", "distill.sc_fraction=1",
      "-o", "run"], "distill.sc_fraction=1"),
    (["evaluate", "--generated", "z.h5", "--reference", "z.h5", "--geometry", "ds2", "--classifiers", "bogus",
      "-o", "ev"], "unknown bogus"),
])
def test_bad_input_gives_one_line(tmp_path, monkeypatch, capsys, args, match):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("calofast: error:") and match in err and err.count("\n") == 1, err
    assert not (tmp_path / "z.h5").exists()


@pytest.mark.parametrize("args, match", [
    # `--energy 50` is a typo, not `--energy-sampler 50`: argparse's prefix matching is off
    (["generate", "--model", "ds2-shortcut", "--n", "3", "--energy", "50", "-o", "z.h5"],
     "unrecognized arguments: --energy 50"),
    (["generate", "--model", "ds2-shortcut", "--n", "abc", "-o", "z.h5"], "argument --n: invalid int value: 'abc'"),
    (["generate", "--n", "3", "-o", "z.h5"], "required: --model"),
    (["bogus"], "invalid choice: 'bogus'"),
])
def test_argument_errors_are_one_line(tmp_path, monkeypatch, capsys, args, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("calofast: error:") and match in err and err.count("\n") == 1, err
    assert not (tmp_path / "z.h5").exists()


def test_bench_refuses_to_overwrite_its_table(tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text("keep me")
    assert main(["bench", "--model", "ds2-shortcut", "--steps", "1", "--batch-sizes", "1", "--repeats", "1",
                 "-o", str(table)]) == 2
    assert "exists already" in capsys.readouterr().err and table.read_text() == "keep me"


def test_info_prints_summary_and_plot(tmp_path, capsys):
    out = tmp_path / "x.h5"
    main(["gflash", "--n", "40", "--seed", "2", "-o", str(out)])
    assert main(["info", str(out), "--plot", str(tmp_path / "x.png")]) == 0
    text = capsys.readouterr().out
    assert "E_tot/E_inc" in text and (tmp_path / "x.png").stat().st_size > 10_000
    # An existing plot is kept unless --force (then replaced whole); gflash --summary checks its plot before any work.
    keep = tmp_path / "keep.png"
    keep.write_text("keep me")
    assert main(["info", str(out), "--plot", str(keep)]) == 2
    assert "exists already" in capsys.readouterr().err and keep.read_text() == "keep me"
    assert main(["info", str(out), "--plot", str(keep), "--force"]) == 0 and keep.read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "y.png").write_text("keep me")
    assert main(["gflash", "--n", "40", "--seed", "2", "--summary", "-o", str(tmp_path / "y.h5")]) == 2
    assert "y.png: exists already" in capsys.readouterr().err and not (tmp_path / "y.h5").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_demo_summarises_its_truth_and_can_run_again(tmp_path, monkeypatch, capsys):
    """The demo's first steps (truth, its summary plot) run, twice into the same folder; the sampling after them is
    cut short here (the whole demo is the README's main job)."""
    import calofast.generate

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop
    monkeypatch.setattr(calofast.generate, "generate_file", stop)
    for _ in range(2):
        with pytest.raises(Stop):
            main(["demo", "--n", "20", "-o", str(tmp_path / "demo")])
        assert (tmp_path / "demo/ds2_gflash_truth.png").read_bytes()[:4] == b"\x89PNG"
    assert "E_tot/E_inc" in capsys.readouterr().out


def test_help_names_shipped_models_and_the_protocol_sizes(capsys):
    from calofast.checkpoint import shipped_models
    from calofast.evaluate import PROTOCOL_EVENTS
    for cmd in ("generate", "bench", "export", "set-sampler"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(name in text for name in shipped_models()), cmd
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(f"{n:,}" in text for n in PROTOCOL_EVENTS.values())


def test_an_interrupt_raised_where_python_ignores_it_is_not_lost(monkeypatch, capsys):
    """A SIGTERM whose handler runs inside a weakref callback (as during gflash's garbage collection) raises where
    Python can only print "Exception ignored"; the command must still end with 143, not work on."""
    import signal
    import time
    import weakref

    import calofast.cli as cli

    def busy(args):
        class Obj:
            pass
        obj = Obj()
        ref = weakref.ref(obj, lambda r: cli._on_sigterm(signal.SIGTERM, None))
        assert ref() is obj
        del obj                                    # the callback raises Terminated: ignored by Python
        end = time.time() + 5
        while time.time() < end:                   # the work that would go on
            pass
        return 0

    monkeypatch.setattr(cli, "cmd_info", busy)
    assert main(["info", "any.h5"]) == 143
    err = capsys.readouterr().err
    assert "interrupted (SIGTERM)" in err and "Exception ignored" not in err
