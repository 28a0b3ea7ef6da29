"""Distillation on CPU: a PD stage gets closer to the teacher's two steps; the CD loss falls; bundles work."""
import copy

import numpy as np
import pytest
import torch

from calofast.checkpoint import load_bundle
from calofast.cli import main
from calofast.config import apply_overrides
from calofast.data import read_showers
from calofast.diffusion import Boundary, Preconditioned
from calofast.distill import distill_consistency, distill_progressive, distill_sigma_range
from calofast.distill.consistency import consistency_loss
from calofast.distill.progressive import student_grid
from calofast.rng import EventRNG
from calofast.samplers import euler
from calofast.schedules import karras_consistency
from calofast.train import load_training_data, train_model

from helpers import tiny_data, tiny_xml
from test_train import _cfg


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    tiny_xml(tmp)
    return train_model(_cfg(tmp, "train.showers=3000"), tiny_data(tmp), tmp / "run"), tmp


def _gap(student, teacher_den, grid_student, grid_teacher, cond, noise):
    """Per-event squared distance between the N-step student's and the 2N-step teacher's samples."""
    with torch.no_grad():
        d = euler(student, noise, grid_student, cond) - euler(teacher_den, noise, grid_teacher, cond)
        return d.pow(2).flatten(1).mean(1)


def test_progressive_stage_matches_teacher_two_steps_better(teacher, tmp_path):
    path, tmp = teacher
    b = load_bundle(path)
    cfg = apply_overrides(b.config, ["distill.start_steps=4", "distill.to_steps=2", "distill.showers_per_stage=6000",
                                     "distill.lr=5e-4", "train.batch_size=64", "train.checkpoint_showers=6000"])
    bundles = distill_progressive(path, tiny_data(tmp), tmp_path / "pd", cfg)
    assert [p.name for p in bundles] == ["pd-2step.safetensors"]
    student = load_bundle(bundles[0])
    s_min, s_max = distill_sigma_range(b, cfg)
    g2, g4 = student_grid(2, s_min, s_max), student_grid(4, s_min, s_max)
    n = 512
    cond = b.transform.condition(torch.exp(torch.linspace(np.log(1e3), np.log(1e5), n, dtype=torch.float64)))
    noise = EventRNG(0, range(n)).randn(b.event_shape)
    before = _gap(b.denoiser, b.denoiser, g2, g4, cond, noise)
    after = _gap(student.denoiser, b.denoiser, g2, g4, cond, noise)
    diff = before - after                             # paired over the same noise and energies
    assert float(diff.mean()) > 5 * float(diff.std()) / n ** 0.5, (float(before.mean()), float(after.mean()))
    assert student.sampler["steps"] == 2 and student.meta["parent"]


def test_consistency_loss_decreases_and_bundle_samples(teacher, tmp_path, capsys):
    path, tmp = teacher
    b = load_bundle(path)
    cfg = apply_overrides(b.config, ["distill.cm_showers=4000", "distill.cm_steps=10", "distill.lr=5e-4",
                                     "train.batch_size=64", "train.checkpoint_showers=4000"])
    s_min, s_max = distill_sigma_range(b, cfg)
    grid = karras_consistency(10, s_min, s_max)
    x0, cond = load_training_data(tiny_data(tmp, n=1024, seed=2), b.transform)[-1]
    start = Preconditioned(copy.deepcopy(b.denoiser.net), Boundary(b.denoiser.param, s_min)).eval()

    def loss(model):
        """Per-event consistency of the model with itself across one teacher step (fixed draws)."""
        with torch.no_grad():
            return consistency_loss(model, model, b.denoiser, x0, cond, grid, "l2", torch.Generator().manual_seed(3),
                                    reduce=False)

    out = distill_consistency(path, tiny_data(tmp), tmp_path / "cd", cfg)
    student = load_bundle(out)
    diff = loss(start) - loss(student.denoiser)
    assert float(diff.mean()) > 5 * float(diff.std()) / len(diff) ** 0.5, float(diff.mean())
    assert student.sampler["name"] == "consistency" and student.sampler["steps"] == 1
    for steps, flags in ((1, []), (2, ["--steps", "2"])):
        g = tmp_path / f"cd{steps}.h5"
        assert main(["generate", "--model", str(out), "--n", "6", "-o", str(g), *flags]) == 0
        assert f"NFE {steps}," in capsys.readouterr().out
        s = read_showers(g)[1]
        assert np.all(np.isfinite(s)) and np.all(s >= 0)
    # The two-step consistency sampler exports with its re-noising draw as part of the noise input.
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    from calofast.export import export_onnx
    from calofast.generate import sample_batch
    onnx_path = export_onnx(student, tmp_path / "cd2.onnx", steps=2)
    e = torch.tensor([2e3, 7e4], dtype=torch.float64)
    ref, nfe, _ = sample_batch(student, e, 5, range(2), steps=2)
    r = EventRNG(5, range(2))
    noise = torch.stack([r.randn(student.event_shape), r.randn(student.event_shape)], 1).reshape(2, -1)
    out = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"conditions": e.float()[:, None].numpy(), "noise": noise.numpy()})[0]
    assert nfe == {"shower": 2} and np.linalg.norm(out - ref.numpy()) <= 1e-4 * np.linalg.norm(ref.numpy()) + 1e-6


def test_cli_distill_progressive_needs_no_sampler_flags(teacher, tmp_path, capsys):
    path, tmp = teacher
    assert main(["distill", "progressive", "--teacher", str(path), "--data", str(tiny_data(tmp)), "--start-steps", "4",
                 "--to-steps", "1", "--set", "distill.showers_per_stage=256", "-o", str(tmp_path / "pd")]) == 0
    assert (tmp_path / "pd/pd-1step.safetensors").exists() and (tmp_path / "pd/pd-2step.safetensors").exists()
    out = tmp_path / "s.h5"
    assert main(["generate", "--model", str(tmp_path / "pd/pd-1step.safetensors"), "--n", "5", "-o", str(out)]) == 0
    assert "sampler euler, 1 step, NFE 1," in capsys.readouterr().out
    # Re-running skips finished stages.
    assert main(["distill", "progressive", "--teacher", str(path), "--data", str(tiny_data(tmp)), "--start-steps", "4",
                 "--to-steps", "1", "--set", "distill.showers_per_stage=256", "-o", str(tmp_path / "pd")]) == 0
    assert main(["distill", "progressive", "--teacher", str(path), "--data", str(tiny_data(tmp)), "--start-steps", "6",
                 "-o", str(tmp_path / "bad")]) == 2
