"""calofast generate: every sampler name, batch-size independence, NFE reported, energies from a file."""
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from calofast.checkpoint import load_bundle
from calofast.cli import main
from calofast.data import read_showers
from calofast.generate import compile_network, default_batch_size, is_compiled, make_sigmas, sample_batch
from calofast.train import train_model

from helpers import tiny_data
from test_train import _cfg


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    return train_model(_cfg(tmp, "train.showers=512"), tiny_data(tmp), tmp / "run")


@pytest.mark.parametrize("sampler, steps, nfe", [("ddpm", 400, 400), ("ddpm", 50, 50), ("ddim", 10, 10),
                                                  ("euler", 8, 8), ("heun", 5, 9), ("dpmpp-2m", 10, 10),
                                                  ("dpmpp-2m-sde", 10, 10), ("consistency", 2, 2)])
def test_generate_each_sampler(tmp_path, bundle_path, capsys, sampler, steps, nfe):
    out = tmp_path / "g.h5"
    assert main(["generate", "--model", str(bundle_path), "--sampler", sampler, "--steps", str(steps), "--n", "12",
                 "--energies", "log-uniform:1GeV:100GeV", "--seed", "3", "--batch-size", "5", "-o", str(out)]) == 0
    assert f"NFE {nfe}," in capsys.readouterr().out
    e, s = read_showers(out)
    assert s.shape == (12, 36) and np.all(np.isfinite(s)) and np.all(s >= 0)
    assert e.min() >= 1e3 and e.max() <= 1e5


def test_progress_reports_every_network_call_within_a_batch(tmp_path, bundle_path, capsys, monkeypatch):
    """Long batches are not silent: each network call is reported as it starts (stage, its number), and the
    generate bar shows which batch, stage and call is running (issue 18: a teacher batch sat at 0 % for minutes)."""
    import calofast.generate as gen
    calls = []
    bundle = load_bundle(bundle_path)
    _, nfe, _ = sample_batch(bundle, torch.full((3,), 1e4), 0, range(3), sampler="heun", steps=4,
                             on_call=lambda stage, k: calls.append((stage, k)))
    for stage, total in nfe.items():
        assert [k for s, k in calls if s == stage] == list(range(1, total + 1))
    monkeypatch.setattr(gen, "PROGRESS_INTERVAL_S", 0.0)
    assert main(["generate", "--model", str(bundle_path), "--sampler", "euler", "--steps", "6", "--n", "5",
                 "--batch-size", "2", "-o", str(tmp_path / "p.h5")]) == 0
    err = capsys.readouterr().err
    assert "batch 3/3: shower stage, network call 6" in err


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp-2m-sde"])
def test_batch_size_independence_through_cli(tmp_path, bundle_path, sampler):
    outs = []
    for bs in (1, 4, 10):
        out = tmp_path / f"b{bs}.h5"
        eta = ["--eta", "1"] if sampler != "ddpm" else []
        assert main(["generate", "--model", str(bundle_path), "--sampler", sampler, "--steps", "8", *eta,
                     "--n", "10", "--seed", "11", "--batch-size", str(bs), "-o", str(out)]) == 0
        outs.append(read_showers(out)[1])
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-5, atol=1e-5)
    other = tmp_path / "seed.h5"
    main(["generate", "--model", str(bundle_path), "--sampler", sampler, "--steps", "8", "--n", "10", "--seed", "12",
          "-o", str(other)])
    assert not np.allclose(read_showers(other)[1], outs[0])


def test_energies_from_reference_match_event_by_event(tmp_path, bundle_path):
    ref = tiny_data(tmp_path, n=30, seed=4)
    out = tmp_path / "g.h5"
    assert main(["generate", "--model", str(bundle_path), "--energies-from", str(ref), "-o", str(out)]) == 0
    np.testing.assert_array_equal(read_showers(out)[0], read_showers(ref)[0])


def test_bf16_runs_and_errors(tmp_path, bundle_path, capsys):
    out = tmp_path / "g.h5"
    assert main(["generate", "--model", str(bundle_path), "--n", "4", "--dtype", "bf16", "-o", str(out)]) == 0
    assert main(["generate", "--model", str(bundle_path), "--n", "4", "--sampler", "nope", "-o", str(tmp_path / "x.h5")]) == 2
    assert "unknown sampler" in capsys.readouterr().err
    assert main(["generate", "--model", str(bundle_path), "-o", str(tmp_path / "y.h5")]) == 2
    assert main(["generate", "--model", str(bundle_path), "--n", "2", "--sampler", "ddpm", "--eta", "0.5",
                 "-o", str(tmp_path / "z.h5")]) == 2
    assert "takes no option eta" in capsys.readouterr().err


def test_grids(bundle_path):
    b = load_bundle(bundle_path)
    g = make_sigmas(b.denoiser, "ddim", 10)
    assert len(g) == 11 and g[-1] == 0 and g[0] == pytest.approx(b.denoiser.sigma_max)
    k = make_sigmas(b.denoiser, "heun", 10)
    assert k[0] == pytest.approx(160.0) and k[-2] == pytest.approx(b.denoiser.sigma_min) and k[-1] == 0
    with pytest.raises(ValueError, match="exceeds"):
        make_sigmas(b.denoiser, "ddpm", 401)


def test_event_k_identical_within_library(bundle_path):
    b = load_bundle(bundle_path)
    e = torch.tensor([1e3, 3e3, 1e4, 3e4, 9e4], dtype=torch.float64)
    full, _, _ = sample_batch(b, e, 1, range(5), sampler="ddpm", steps=20)
    part, _, _ = sample_batch(b, e[2:4], 1, range(2, 4), sampler="ddpm", steps=20)
    torch.testing.assert_close(part, full[2:4], rtol=1e-5, atol=1e-5)


def test_bench_cli_writes_a_table(tmp_path, bundle_path, capsys):
    import csv
    out = tmp_path / "bench.csv"
    assert main(["bench", "--model", str(bundle_path), "--sampler", "ddim", "--steps", "3", "--batch-sizes", "1,4",
                 "--repeats", "2", "--threads", "1", "-o", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [int(r["batch"]) for r in rows] == [1, 4] and all(int(r["nfe"]) == 3 for r in rows)
    assert all(float(r["ms_per_shower"]) > 0 and r["threads"] == "1" for r in rows)
    assert "ms/shower" in capsys.readouterr().out


def test_bf16_gemm_weights_give_exactly_the_autocast_showers(bundle_path):
    """Linear/Conv weights stored in bf16 are what autocast feeds the GEMMs anyway: same showers, bit for bit."""
    from calofast.generate import gemm_weights_bf16
    a, b = load_bundle(bundle_path), gemm_weights_bf16(load_bundle(bundle_path))
    dtypes = {p.dtype for p in b.denoiser.parameters()}
    assert torch.bfloat16 in dtypes and all(p.dtype == torch.float32 for p in a.denoiser.parameters())
    e = torch.tensor([1e3, 1e4, 1e5, 8e5], dtype=torch.float64)
    x, _, _ = sample_batch(a, e, 3, range(4), sampler="ddim", steps=3, bf16=True)
    y, _, _ = sample_batch(b, e, 3, range(4), sampler="ddim", steps=3, bf16=True)
    assert torch.equal(x, y)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_network_gives_the_same_showers(bundle_path):
    """`--compile` compiles each denoiser (and the noise hashing, which stays bit-identical); the showers
    equal the eager ones to float32 rounding and the parameter names (what bundles store) are unchanged."""
    eager, compiled = load_bundle(bundle_path), compile_network(load_bundle(bundle_path))
    assert is_compiled(compiled) and not is_compiled(eager)
    assert list(compiled.denoiser.state_dict()) == list(eager.denoiser.state_dict())
    e = torch.tensor([1e3, 1e4, 1e5, 8e5], dtype=torch.float64)
    a, _, _ = sample_batch(eager, e, 3, range(4), sampler="ddim", steps=4)
    b, nfe, _ = sample_batch(compiled, e, 3, range(4), sampler="ddim", steps=4)
    assert nfe == {"shower": 4}
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3 * float(a.abs().max()))
    from calofast.rng import EventRNG
    plain, fused = EventRNG(7, range(5, 9)), EventRNG(7, range(5, 9), fused=True)
    for shape in [(3,), (2, 5)]:
        assert torch.equal(plain.randn(shape), fused.randn(shape))


def test_shards_merged_equal_one_run_bit_for_bit(tmp_path, bundle_path, capsys):
    """generate --shard K/N writes events K*n/N.. of the unsharded run; merge joins them (any order given) into
    the same file, bit for bit when the shards hold whole batches (else to float rounding: batch composition
    changes the kernels' summation order); gaps, overlaps and foreign parts are refused in one line."""
    common = ["generate", "--model", str(bundle_path), "--n", "24", "--sampler", "ddpm", "--steps", "5",
              "--seed", "4", "--batch-size", "4"]
    assert main(common + ["-o", str(tmp_path / "one.h5")]) == 0
    for k in range(3):
        assert main(common + ["--shard", f"{k}/3", "-o", str(tmp_path / f"p{k}.h5")]) == 0
    assert [read_showers(tmp_path / f"p{k}.h5")[0].shape[0] for k in range(3)] == [8, 8, 8]
    parts = [str(tmp_path / f"p{k}.h5") for k in (2, 0, 1)]
    assert main(["merge", *parts, "-o", str(tmp_path / "merged.h5")]) == 0
    for a, b in zip(read_showers(tmp_path / "one.h5"), read_showers(tmp_path / "merged.h5")):
        np.testing.assert_array_equal(a, b)
    capsys.readouterr()
    assert main(["merge", parts[0], parts[1], "-o", str(tmp_path / "gap.h5")]) == 2
    assert "expected 8" in capsys.readouterr().err and not (tmp_path / "gap.h5").exists()
    assert main(common[:-4] + ["--seed", "5", "--batch-size", "4", "--shard", "1/3", "-o", str(tmp_path / "q1.h5")]) == 0
    assert main(["merge", parts[1], str(tmp_path / "q1.h5"), parts[0], "-o", str(tmp_path / "mix.h5")]) == 2
    assert "differs" in capsys.readouterr().err
    assert main(["merge", *parts, "-o", str(tmp_path / "merged.h5")]) == 2          # no silent overwrite
    assert main(common + ["--shard", "3/3", "-o", str(tmp_path / "bad.h5")]) == 2
    assert main(common + ["--shard", "torchrun", "-o", str(tmp_path / "bad.h5")]) == 2


def test_a_student_run_with_another_sampler_is_warned(caplog):
    """A distilled student asked for another sampler runs (it is a denoiser) but says it was made for its own."""
    import logging

    from calofast.checkpoint import load_bundle
    from calofast.generate import resolve_sampler
    student = load_bundle("ds2-shortcut")
    with caplog.at_level(logging.WARNING, logger="calofast"):
        assert resolve_sampler(student, None, None)[:2] == ("euler", 2)
        assert not caplog.records
        name, steps, _ = resolve_sampler(student, "ddpm", None)
    assert (name, steps) == ("ddpm", 20)
    assert len(caplog.records) == 1 and "distilled for" in caplog.text and "2 steps;" in caplog.text


def test_default_batch_size_follows_the_device(monkeypatch):
    """100 on a CPU; on a GPU a quarter of its memory at 64 bytes per voxel, clamped to 100..10,000."""
    assert default_batch_size("cpu", 6480) == 100
    for total, voxels, want in [(80 * 10**9, 6480, 10_000), (80 * 10**9, 40_500, 7716), (4 * 10**9, 40_500, 385),
                                (10**8, 40_500, 100)]:
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev, t=total: SimpleNamespace(total_memory=t))
        assert default_batch_size("cuda", voxels) == want
