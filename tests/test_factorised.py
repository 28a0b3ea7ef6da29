"""The factorised energy/shape model end to end on the tiny geometry: training, bundle, sampling, CLI,
ONNX export, distillation of its shape stage, and the time budget of the training loop."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from calofast.checkpoint import load_bundle
from calofast.cli import main
from calofast.config import apply_overrides, get_preset
from calofast.data import file_attrs, read_showers
from calofast.generate import sample_batch, sampling_plan
from calofast.rng import EventRNG
from calofast.train import train_model
from calofast.transforms import MAX_RESPONSE

from helpers import tiny_data, tiny_teacher, tiny_xml


@pytest.fixture(scope="module")
def factorised(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fact")
    return tiny_teacher(tmp, "train.bundle_dtype=fp16"), tmp


def test_bundle_holds_both_stages_in_fp16(factorised):
    path, tmp = factorised
    b = load_bundle(path)
    assert [s.name for s in b.stages] == ["energy", "shape"] and b.meta["weights_dtype"] == "fp16"
    assert b.stages[0].sampler == {"name": "heun", "steps": 4} and b.stages[1].sampler is None
    with safe_open(str(path), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if ".net." in k}
    assert dtypes == {torch.float16}
    assert all(p.dtype == torch.float32 for s in b.stages for p in s.denoiser.parameters())   # loaded as fp32
    assert (tmp / "run/energy/stats.jsonl").exists() and (tmp / "run/shape/stats.jsonl").exists()


def test_sampling_both_stages(factorised):
    b = load_bundle(factorised[0])
    e = torch.tensor([1.5e3, 2e4, 9e4], dtype=torch.float64)
    showers, nfe, clipped = sample_batch(b, e, 3, range(3), sampler="euler", steps=5)
    assert nfe == {"energy": 7, "shape": 5} and not clipped.any()
    assert torch.isfinite(showers).all() and (showers >= 0).all()
    assert (showers.double().sum(1) <= MAX_RESPONSE * e).all()
    part, _, _ = sample_batch(b, e[1:], 3, range(1, 3), sampler="euler", steps=5)
    torch.testing.assert_close(part, showers[1:])             # event k does not depend on the batch
    assert sampling_plan(b, "heun", 3)[0][:2] == ("heun", 4) and sampling_plan(b, "heun", 3)[1][:2] == ("heun", 3)


def test_energy_stage_sampler_override(factorised, tmp_path, capsys):
    """--energy-sampler NAME:STEPS replaces the energy stage's own sampler (heun 4 = 7 NFE) and is recorded;
    a bad value is one clear line and exit code 2."""
    b = load_bundle(factorised[0])
    e = torch.tensor([1.5e3, 2e4], dtype=torch.float64)
    _, nfe, _ = sample_batch(b, e, 3, range(2), sampler="euler", steps=2, early=("dpmpp-2m", 3))
    assert nfe == {"energy": 3, "shape": 2}
    out = tmp_path / "e.h5"
    assert main(["generate", "--model", str(factorised[0]), "--n", "3", "--steps", "2", "--energy-sampler", "euler:5",
                 "-o", str(out)]) == 0
    assert json.loads(file_attrs(out)["nfe"]) == {"energy": 5, "shape": 2}
    assert file_attrs(out)["early_sampler"] == "euler:5"
    capsys.readouterr()
    assert main(["generate", "--model", str(factorised[0]), "--n", "3", "--energy-sampler", "dpmpp-2m",
                 "-o", str(tmp_path / "bad.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--energy-sampler 'dpmpp-2m'" in err[0] and not (tmp_path / "bad.h5").exists()


def test_set_sampler_rewrites_only_the_stage_default(factorised, tmp_path, capsys):
    out = tmp_path / "b.safetensors"
    assert main(["set-sampler", "--model", str(factorised[0]), "--stage", "energy", "--sampler", "dpmpp-2m:3",
                 "-o", str(out)]) == 0
    a, b = load_bundle(factorised[0]), load_bundle(out)
    assert b.stages[0].sampler == {"name": "dpmpp-2m", "steps": 3} and b.stages[1].sampler == a.stages[1].sampler
    assert b.meta["tensors_sha256"] == a.meta["tensors_sha256"] and "heun" in b.meta["edited"]
    e = torch.tensor([2e4], dtype=torch.float64)
    assert sample_batch(b, e, 0, range(1), sampler="euler", steps=2)[1] == {"energy": 3, "shape": 2}
    capsys.readouterr()
    for args, msg in ((["--stage", "energy"], "exists"), (["--stage", "nope", "--force"], "no stage 'nope'")):
        assert main(["set-sampler", "--model", str(factorised[0]), "--sampler", "euler:2", "-o", str(out), *args]) == 2
        assert msg in capsys.readouterr().err
    assert load_bundle(out).stages[0].sampler == {"name": "dpmpp-2m", "steps": 3}     # not overwritten


def test_cli_generate_reports_both_stages_and_clipping(factorised, tmp_path, capsys):
    out = tmp_path / "g.h5"
    assert main(["generate", "--model", str(factorised[0]), "--n", "7", "--steps", "4", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "NFE 4 (+7 energy)" in text and "0 clipped showers" in text
    attrs = file_attrs(out)
    assert json.loads(attrs["nfe"]) == {"energy": 7, "shape": 4} and attrs["clipped_showers"] == 0
    assert read_showers(out)[1].shape == (7, 36)


def test_onnx_export_runs_both_stages(factorised, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    from calofast.export import export_onnx
    b = load_bundle(factorised[0])
    path = export_onnx(b, tmp_path / "f.onnx", sampler="euler", steps=3)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert [s["stage"] for s in meta["stages"]] == ["energy", "shape"] and meta["stages"][0]["nfe"] == 7
    e = torch.tensor([3e3, 6e4], dtype=torch.float64)
    ref, _, _ = sample_batch(b, e, 4, range(2), sampler="euler", steps=3)
    r = EventRNG(4, range(2))
    noise = torch.cat([r.randn((3,)), r.randn((1, 3, 4, 3)).reshape(2, -1)], 1)     # energy stage first
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"conditions": e.float()[:, None].numpy(), "noise": noise.numpy()})[0]
    assert np.linalg.norm(out - ref.numpy()) <= 1e-4 * np.linalg.norm(ref.numpy())


def test_progressive_distillation_keeps_the_energy_stage(factorised, tmp_path):
    path, tmp = factorised
    assert main(["distill", "progressive", "--teacher", str(path), "--data", str(tiny_data(tmp)), "--start-steps", "4",
                 "--to-steps", "2", "--set", "distill.showers_per_stage=128", "-o", str(tmp_path / "pd")]) == 0
    teacher, student = load_bundle(path), load_bundle(tmp_path / "pd/pd-2step.safetensors")
    assert [s.name for s in student.stages] == ["energy", "shape"] and student.sampler["steps"] == 2
    for a, b in zip(teacher.stages[0].denoiser.state_dict().values(), student.stages[0].denoiser.state_dict().values()):
        assert torch.equal(a, b)
    _, nfe, _ = sample_batch(student, torch.tensor([1e4]), 0, range(1))
    assert nfe == {"energy": 7, "shape": 2}


def test_time_budget_ends_training_with_the_schedule_finished(tmp_path, monkeypatch):
    """train.budget_seconds: the run ends after that much training time, its cosine decay run to the end.
    The training loop's clock is a virtual one (10 ms per reading), so a loaded CI machine cannot turn the
    run into one long step (that made this test fail once: the only step took the whole budget)."""
    import calofast.train as train_mod

    class Clock:
        now = 1e9

        def time(self):
            Clock.now += 0.01
            return Clock.now

    monkeypatch.setattr(train_mod, "time", Clock())
    cfg = apply_overrides(get_preset("tiny"), [f"geometry={tiny_xml(tmp_path)}", "train.showers=100000000",
                                               "train.budget_seconds=2", "train.warmup_showers=0",
                                               "train.log_showers=64"])
    path = train_model(cfg, tiny_data(tmp_path), tmp_path / "run")
    stats = [json.loads(line) for line in (tmp_path / "run/stats.jsonl").read_text().splitlines()]
    assert 2 <= stats[-1]["elapsed_s"] < 2.1 and stats[-1]["showers"] < 100_000_000 and len(stats) > 10
    assert stats[-1]["lr"] < 0.1 * cfg.train.lr and stats[0]["lr"] > 0.9 * cfg.train.lr
    assert load_bundle(path).meta["train_events_seen"] == str(stats[-1]["showers"])


def test_shipped_factorised_model_is_bounded_even_with_hostile_weights():
    """The shipped bundle loads by name and samples; with its output layers scaled by 1e6 (a diverged or
    hostile network) every shower is still finite, non-negative and holds at most 2 x E_inc."""
    b = load_bundle("ds2-factorised")
    assert [s.name for s in b.stages] == ["energy", "shape"] and b.geometry.name == "ds2"
    e = torch.tensor([1e3, 3e4, 1e6], dtype=torch.float64)
    showers, nfe, clipped = sample_batch(b, e, 0, range(3), sampler="euler", steps=1)
    assert nfe == {"energy": 63, "shape": 1} and not clipped.any()
    assert (showers.double().sum(1) <= MAX_RESPONSE * e).all() and (showers.double().sum(1) > 0.3 * e).all()
    with torch.no_grad():
        b.stages[0].denoiser.net.out.weight.mul_(1e6)
        b.stages[1].denoiser.net.head.weight.mul_(1e6)
    showers, _, _ = sample_batch(b, e, 0, range(3), sampler="euler", steps=1)
    assert torch.isfinite(showers).all() and (showers >= 0).all()
    assert (showers.double().sum(1) <= MAX_RESPONSE * e * (1 + 1e-6)).all()


def test_cli_bench_counts_the_main_stage_and_records_every_stage(factorised, tmp_path):
    out = tmp_path / "bench.csv"
    assert main(["bench", "--model", str(factorised[0]), "--steps", "2", "--batch-sizes", "1,3", "--repeats", "2",
                 "-o", str(out)]) == 0
    import csv
    rows = list(csv.DictReader(open(out)))
    assert [int(r["batch"]) for r in rows] == [1, 3] and all(int(r["nfe"]) == 2 for r in rows)
    assert all(json.loads(r["nfe_stages"]) == {"energy": 7, "shape": 2} for r in rows)


def test_train_init_continues_from_the_bundle(factorised, tmp_path, capsys):
    """`train --init`: both stages start from the bundle's weights with its transform (lr 0 keeps them exactly),
    the showers add up, the parent is recorded; changing what the weights mean is refused in one line."""
    from calofast.checkpoint import save_bundle
    path, tmp = factorised
    data = str(tiny_data(tmp))
    a = load_bundle(path)                 # the start bundle, given a main-stage default sampler (as shipped ones have)
    path = save_bundle(tmp_path / "start.safetensors", [a.stages[0], a.stages[1].with_denoiser(
        a.stages[1].denoiser, {"name": "euler", "steps": 3})], a.transform, a.config,
        events_seen=int(a.meta["train_events_seen"]), weights_dtype="fp16")
    args = ["train", "--data", data, "--init", str(path), "--set", "train.lr=0", "--set", "energy.train.lr=0",
            "--set", "train.showers=64", "--set", "energy.train.showers=512"]
    assert main(args + ["-o", str(tmp_path / "cont")]) == 0
    a, b = load_bundle(path), load_bundle(tmp_path / "cont/model.safetensors")
    for sa, sb in zip(a.stages, b.stages):
        for (k, va), vb in zip(sa.denoiser.state_dict().items(), sb.denoiser.state_dict().values()):
            assert torch.equal(va, vb), k
    for k, v in a.transform.constants().items():
        assert torch.equal(v, b.transform.constants()[k])
    assert int(b.meta["train_events_seen"]) == int(a.meta["train_events_seen"]) + 64
    assert b.meta["parent"] == a.meta["tensors_sha256"] and b.config.network == a.config.network
    assert [s.sampler for s in b.stages] == [{"name": "heun", "steps": 4}, {"name": "euler", "steps": 3}]
    # The training distribution of sigma is no part of what the weights mean: it may change, and is used.
    assert main(args + ["--set", "diffusion.p_mean=-1", "--set", "diffusion.p_std=1.5", "-o", str(tmp_path / "pm")]) == 0
    c = load_bundle(tmp_path / "pm/model.safetensors")
    assert (c.stages[1].denoiser.param.m, c.stages[1].denoiser.param.s) == (-1.0, 1.5)
    assert (c.stages[0].denoiser.param.m, c.stages[0].denoiser.param.s) == (a.stages[0].denoiser.param.m, a.stages[0].denoiser.param.s)
    for va, vc in zip(a.stages[1].denoiser.state_dict().values(), c.stages[1].denoiser.state_dict().values()):
        assert torch.equal(va, vc)
    capsys.readouterr()
    assert main(args + ["--set", "network.width=48", "-o", str(tmp_path / "bad")]) == 2
    assert "network or diffusion differs" in capsys.readouterr().err
    assert main(args + ["--preset", "tiny", "-o", str(tmp_path / "bad2")]) == 2
    assert not (tmp_path / "bad/model.safetensors").exists()


def test_dequantised_training_noises_the_shape_codes_and_is_recorded(tmp_path, monkeypatch):
    """transform.dequantise=true: the loss sees dequantised shape codes (empty voxels moved), the bundle says so,
    and its showers decode bounded; a one-stage transform refuses the option in one line."""
    from calofast.factorised import FactorisedTransform
    seen = []
    original = FactorisedTransform.dequantised

    def spy(self, x, cond, generator=None):
        out = original(self, x, cond, generator)
        seen.append((x.dim(), bool((out != x).any())))
        return out
    monkeypatch.setattr(FactorisedTransform, "dequantised", spy)
    cfg = apply_overrides(get_preset("tiny-factorised"), [f"geometry={tiny_xml(tmp_path)}", "transform.dequantise=true",
                                                          "train.showers=64", "energy.train.showers=128"])
    b = load_bundle(train_model(cfg, tiny_data(tmp_path), tmp_path / "run"))
    assert b.transform.dequantise and (5, True) in seen and all(not moved for dim, moved in seen if dim == 2)
    e = torch.full((8,), 5e4, dtype=torch.float64)
    showers, _, clipped = sample_batch(b, e, 3, range(8), sampler="euler", steps=2)
    assert torch.isfinite(showers).all() and (showers >= 0).all() and not clipped.any()
    assert (showers.double().sum(1) <= MAX_RESPONSE * e).all()
    with pytest.raises(ValueError, match="dequantise needs transform.kind=layer"):
        apply_overrides(get_preset("tiny"), ["transform.dequantise=true"])


def test_train_only_some_stages_of_a_bundle(factorised, tmp_path, capsys):
    """--init B --stages energy: the shape stage is B's bit for bit; the energy stage continues from B's weights,
    or starts fresh when its network changes; the main stage's shower count is unchanged. Refusals in one line."""
    path, tmp = factorised
    data = str(tiny_data(tmp))
    base = ["train", "--data", data, "--init", str(path), "--set", "energy.train.showers=256"]
    assert main(base + ["--stages", "energy", "--set", "energy.train.lr=0", "-o", str(tmp_path / "e")]) == 0
    a, b = load_bundle(path), load_bundle(tmp_path / "e/model.safetensors")
    for sa, sb in zip(a.stages, b.stages):                 # lr 0: the continued energy stage is the bundle's too
        for (k, va), vb in zip(sa.denoiser.state_dict().items(), sb.denoiser.state_dict().values()):
            assert torch.equal(va, vb), k
    assert b.meta["train_events_seen"] == a.meta["train_events_seen"] and b.meta["stages_trained"] == "energy"
    assert not (tmp_path / "e/shape").exists()
    assert main(base + ["--stages", "energy", "--set", "energy.network.width=48", "-o", str(tmp_path / "w")]) == 0
    c = load_bundle(tmp_path / "w/model.safetensors")
    assert c.config.energy.network.width == 48 and c.config.network == a.config.network
    assert c.stages[0].denoiser.net.state_dict().keys() != a.stages[0].denoiser.net.state_dict().keys() or any(
        v.shape != w.shape for v, w in zip(c.stages[0].denoiser.net.state_dict().values(),
                                           a.stages[0].denoiser.net.state_dict().values()))
    for va, vb in zip(a.stages[1].denoiser.state_dict().values(), c.stages[1].denoiser.state_dict().values()):
        assert torch.equal(va, vb)
    e = torch.tensor([2e4, 9e4], dtype=torch.float64)
    showers, nfe, clipped = sample_batch(c, e, 3, range(2), sampler="euler", steps=2)
    assert nfe == {"energy": 7, "shape": 2} and torch.isfinite(showers).all() and not clipped.any()
    capsys.readouterr()
    assert main(base + ["--stages", "energy", "--set", "network.width=48", "-o", str(tmp_path / "x")]) == 2
    assert "shape stage's network or diffusion differs" in capsys.readouterr().err
    assert main(base + ["--stages", "nosuch", "-o", str(tmp_path / "y")]) == 2
    assert "--stages nosuch" in capsys.readouterr().err
    assert main(base + ["--stages", " , ", "-o", str(tmp_path / "y")]) == 2
    assert "name at least one stage" in capsys.readouterr().err
    assert main(["train", "--data", data, "--preset", "tiny-factorised", "--stages", "energy", "-o",
                 str(tmp_path / "z")]) == 2
    assert "--stages needs --init" in capsys.readouterr().err
