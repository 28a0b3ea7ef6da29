"""The shortcut model (interval denoiser + single-stage training) on the tiny factorised model, on CPU:
the widened network starts as its teacher, the bound grid turns Euler steps into exact jumps, training
makes one jump land closer to the teacher's many-step ODE, and the bundle generates and exports with any
number of steps."""
import numpy as np
import pytest
import torch

from calofast.checkpoint import load_bundle
from calofast.cli import main
from calofast.config import apply_overrides
from calofast.data import read_showers
from calofast.distill import distill_shortcut, distill_sigma_range
from calofast.generate import sample_batch, sampling_plan
from calofast.interval import IntervalDenoiser, bind, interval_code, uniform_grid, velocity, widen_condition
from calofast.rng import EventRNG
from calofast.samplers import euler, euler_step

from helpers import tiny_data, tiny_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sc")
    return tiny_teacher(tmp, "train.showers=6000"), tmp


def _inputs(b, n=64, seed=0):
    energies = torch.exp(torch.linspace(np.log(1e3), np.log(1e5), n, dtype=torch.float64))
    rng = EventRNG(seed, range(n))
    x_e = rng.randn(b.transform.stage_shapes[0])
    cond = b.transform.stage_condition(1, energies, [x_e])
    return rng.randn(b.event_shape), cond.float()


def one_jump_errors(b, student, cfg, n=512):
    """Per event, the squared error against the teacher's 64-step Euler ODE of one Euler step of the teacher and
    of one jump of the student, from the same noise and conditions."""
    _, s_max = distill_sigma_range(b, cfg)
    noise, cond = _inputs(b, n=n, seed=4)
    x = noise * s_max
    with torch.no_grad():
        ode = euler(b.denoiser, x, uniform_grid(64, s_max), cond)
        g1 = uniform_grid(1, s_max)
        before = (euler(b.denoiser, x, g1, cond) - ode).pow(2).flatten(1).mean(1)
        after = (euler(student.denoiser.on_grid(g1), x, g1, cond) - ode).pow(2).flatten(1).mean(1)
    return before, after


def test_widened_network_is_the_teacher_whatever_the_interval(teacher):
    b = load_bundle(teacher[0])
    noise, cond = _inputs(b)
    den = IntervalDenoiser(widen_condition(b.denoiser.net), b.denoiser.param, 0.99, 8).eval()
    sigma = torch.full((noise.shape[0],), 3.0)
    with torch.no_grad():
        ref = b.denoiser(3 * noise, sigma, cond)
        for h in (None, torch.zeros(len(noise)), torch.full((len(noise),), 0.5)):
            assert torch.equal(den(3 * noise, sigma, cond, interval=h), ref)


def test_interval_code_spreads_the_trained_jumps_evenly():
    h = 0.9 / torch.tensor([1.0, 2, 4, 8, 16], dtype=torch.float64)
    code = interval_code(torch.cat([h, torch.zeros(1)]), 0.9, 16)
    assert torch.allclose(code, torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="power of two"):
        interval_code(h, 0.9, 12)


def test_bound_grid_makes_each_euler_step_one_exact_jump(teacher):
    b = load_bundle(teacher[0])
    noise, cond = _inputs(b, n=8)
    s_max = 160.0
    den = IntervalDenoiser(widen_condition(b.denoiser.net), b.denoiser.param, s_max / (1 + s_max), 8)
    torch.nn.init.normal_(den.net.emb.cond_mlp[0].weight)            # the interval now matters
    grid = uniform_grid(4, s_max)
    t = grid / (1 + grid)
    assert torch.allclose(t[:-1] - t[1:], torch.full((4,), t[0] / 4, dtype=torch.float64))
    bound = bind(den, "euler", grid)
    assert bind(den, "dpmpp-2m", grid) is den                     # a multistep solver gets the one-jump x0
    sig = torch.full((8,), float(grid[1]))
    assert torch.allclose(bound.jump(sig), torch.full((8,), float(t[1] - t[2]), dtype=torch.float64))
    assert torch.allclose(bound.jump(torch.full((8,), 0.37)), torch.full((8,), 0.37 / 1.37, dtype=torch.float64))
    with torch.no_grad():
        x = float(grid[1]) * noise
        x_next, _ = euler_step(bound, x, float(grid[1]), float(grid[2]), cond)
        x_t = x / (1 + grid[1]).float()
        h = torch.full((8,), float(t[1] - t[2]))
        s = velocity(den, x_t, torch.full((8,), float(t[1])), h, cond)
        jumped = (x_t - float(t[1] - t[2]) * s) * (1 + grid[2]).float()     # back to sigma-space
    assert torch.allclose(x_next, jumped, atol=1e-4, rtol=1e-4)


def test_training_brings_one_jump_closer_to_the_teacher_ode(teacher, tmp_path):
    path, tmp = teacher
    b = load_bundle(path)
    cfg = apply_overrides(b.config, ["distill.sc_showers=8000", "distill.sc_max_steps=8", "distill.lr=1e-3",
                                     "train.batch_size=64", "train.checkpoint_showers=8000", "distill.sc_steps=1"])
    out = distill_shortcut(path, tiny_data(tmp), tmp_path / "sc", cfg)
    student = load_bundle(out)
    assert isinstance(student.denoiser, IntervalDenoiser) and student.sampler["method"] == "shortcut"
    assert student.stages[0].sampler == b.stages[0].sampler           # the energy stage is the teacher's
    before, after = one_jump_errors(b, student, cfg)
    diff = before - after                                             # paired over the same noise and conditions
    assert float(diff.mean()) > 5 * float(diff.std()) / len(diff) ** 0.5, (float(before.mean()), float(after.mean()))


def test_shortcut_bundle_generates_with_any_steps_and_exports(teacher, tmp_path, capsys):
    path, tmp = teacher
    assert main(["distill", "shortcut", "--teacher", str(path), "--data", str(tiny_data(tmp)), "--set",
                 "distill.sc_showers=256", "--set", "distill.sc_max_steps=4", "--set", "distill.sc_energy_steps=2",
                 "--set", "energy.train.showers=512", "-o", str(tmp_path / "sc")]) == 0
    out = tmp_path / "sc/shortcut.safetensors"
    for steps, flags in ((2, []), (1, ["--steps", "1"]), (3, ["--steps", "3"])):
        g = tmp_path / f"sc{steps}.h5"
        assert main(["generate", "--model", str(out), "--n", "6", "-o", str(g), *flags]) == 0
        assert f"sampler euler, {steps} step{'s' * (steps > 1)}, NFE {steps} (+2 energy)" in capsys.readouterr().out
        s = read_showers(g)[1]
        assert np.all(np.isfinite(s)) and np.all(s >= 0)
    student = load_bundle(out)
    assert all(isinstance(s.denoiser, IntervalDenoiser) for s in student.stages)
    name, steps, grid = sampling_plan(student, steps=4)[-1]
    assert (name, steps) == ("euler", 4) and torch.allclose(grid, uniform_grid(4, student.sampler["sigma_max"]))
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    from calofast.export import export_onnx
    onnx_path = export_onnx(student, tmp_path / "sc1.onnx", steps=1)
    e = torch.tensor([2e3, 7e4], dtype=torch.float64)
    ref, nfe, _ = sample_batch(student, e, 5, range(2), steps=1)
    r = EventRNG(5, range(2))
    noise = torch.cat([r.randn(shape).reshape(2, -1) for shape in student.transform.stage_shapes], 1)
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"conditions": e.float()[:, None].numpy(), "noise": noise.numpy()})[0]
    assert nfe == {"energy": 2, "shape": 1}
    assert np.linalg.norm(got - ref.numpy()) <= 1e-4 * np.linalg.norm(ref.numpy()) + 1e-6


def test_teacher_targets_are_the_exact_ode_jumps_on_the_gaussian_oracle():
    """TeacherTargets on the analytic Gaussian: the level points sit at t_max k / 4, every jump t_max / 2^j
    (j < 3) between them is a pair, and the targets (x_a - x_b) / h converge to the exact ODE's at Heun's
    second order (error / 4 per doubling of the steps)."""
    from calofast.distill.shortcut import TeacherTargets
    from oracle import GaussianDenoiser
    oracle, t_max = GaussianDenoiser(mu=0.3, s=0.7, sigma_max=80.0), 80.0 / 81.0
    g = torch.Generator().manual_seed(0)
    x0 = 0.3 + 0.7 * torch.randn(200, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(200, 3, generator=g, dtype=torch.float64)
    errors = []
    for steps in (48, 96):
        tt = TeacherTargets(oracle, t_max=t_max, fraction=0.5, levels=3, steps=steps, sigma_min=oracle.sigma_min)
        grid, marks = tt.grid()
        assert all(a > b for a, b in zip(grid, grid[1:])) and grid[-1] == 0 and len(marks) == 5
        assert np.allclose([grid[m] / (1 + grid[m]) for m in marks], [t_max * k / 4 for k in (4, 3, 2, 1, 0)])
        x_a, t_a, h, target, cond = tt.pairs(x0, torch.zeros(200, 1), noise)
        assert x_a.shape == (7 * 200, 3) and cond.shape == (7 * 200, 1)
        assert sorted({round(float(v), 6) for v in h}) == [round(t_max / 4, 6), round(t_max / 2, 6), round(t_max, 6)]
        x_start = x0 + float(grid[0]) * noise                          # sigma-space start of every trajectory
        s_a, s_b = (t.double() / (1 - t.double()) for t in (t_a, t_a - h))
        ends = [torch.stack([oracle.ode(x_start[i % 200], float(grid[0]), float(s)) for i, s in enumerate(sv)])
                / (1 + sv[:, None]) for sv in (s_a, s_b)]                # exact t-space states
        errors.append(float((target.double() - (ends[0] - ends[1]) / h.double()[:, None]).abs().max()))
    assert 3.0 < errors[0] / errors[1] < 5.5 and errors[1] < 2e-3 * 3, errors


def test_teacher_target_buffer_serves_each_pair_once_then_refills():
    from calofast.distill.shortcut import TeacherTargets
    from oracle import GaussianDenoiser
    oracle = GaussianDenoiser()
    tt = TeacherTargets(oracle, t_max=0.98, fraction=0.5, levels=2, steps=4, sigma_min=oracle.sigma_min)
    g = torch.Generator().manual_seed(1)
    x0, cond = torch.randn(8, 3, generator=g), torch.zeros(8, 1)
    drawn = [tt.draw(x0, cond, g) for _ in range(6)]                    # 4 pairs per step from 3 x 8 = 24
    assert all(d[0].shape == (4, 3) for d in drawn)
    first = torch.cat([d[3] for d in drawn])                          # one buffer: 24 distinct targets
    assert len({tuple(r.tolist()) for r in first}) == 24
    refill = tt.draw(x0, cond, g)[3]                                  # a new buffer, new noise
    assert not any(torch.equal(r, q) for r in refill for q in first)
    assert TeacherTargets(oracle, t_max=0.98, fraction=0.0).draw(x0, cond, g) is None


def test_shortcut_with_teacher_targets_trains_and_samples(teacher, tmp_path):
    path, tmp = teacher
    cfg = apply_overrides(load_bundle(path).config, [
        "distill.sc_showers=640", "distill.sc_max_steps=8", "train.batch_size=64", "train.checkpoint_showers=640",
        "distill.sc_teacher_fraction=0.25", "distill.sc_teacher_levels=2", "distill.sc_teacher_steps=4"])
    student = load_bundle(distill_shortcut(path, tiny_data(tmp), tmp_path / "sct", cfg))
    # 64-event batches: 16 pairs per step from a buffer of 3 x 64 pairs (one batch's trajectories)
    showers, nfe, clipped = sample_batch(student, torch.tensor([2e3, 5e4], dtype=torch.float64), 0, range(2))
    assert nfe["shape"] == 2 and torch.isfinite(showers).all() and not clipped.any()
    import json
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "sct" / "stats.jsonl")]
    assert losses and all(np.isfinite(losses))


def test_student_trained_further_takes_its_targets_from_the_named_teacher(teacher, tmp_path, monkeypatch):
    """`targets_from`: a shortcut student continued with the original teacher's ODE as the target source (not its
    own h = 0 velocity); the source is recorded, and a bundle with another fitted transform is refused."""
    from calofast.checkpoint import file_sha256, save_bundle
    from calofast.distill import shortcut as sc_mod
    path, tmp = teacher
    sets = ["distill.sc_showers=128", "distill.sc_max_steps=8", "train.batch_size=64", "train.checkpoint_showers=128",
            "distill.sc_teacher_fraction=0.25", "distill.sc_teacher_levels=2", "distill.sc_teacher_steps=4"]
    cfg = apply_overrides(load_bundle(path).config, sets)
    first = distill_shortcut(path, tiny_data(tmp), tmp_path / "a", cfg)
    seen = []
    real_of = sc_mod.TeacherTargets.of.__func__
    monkeypatch.setattr(sc_mod.TeacherTargets, "of",
                        classmethod(lambda cls, den, *a, **k: seen.append(den) or real_of(cls, den, *a, **k)))
    cont = load_bundle(distill_shortcut(first, tiny_data(tmp), tmp_path / "b", cfg, targets_from=path))
    assert len(seen) == 1 and not isinstance(seen[0], IntervalDenoiser)      # the plain teacher, not the student
    assert cont.sampler["targets"] == file_sha256(path)
    assert isinstance(cont.denoiser, IntervalDenoiser)
    own = load_bundle(distill_shortcut(first, tiny_data(tmp), tmp_path / "c", cfg))
    assert isinstance(seen[1], IntervalDenoiser) and "targets" not in own.sampler   # default: its own velocity
    b = load_bundle(path)
    b.transform.log_e_max += 0.1                                          # another fitted energy range
    other = save_bundle(tmp_path / "other.safetensors", b.stages, b.transform, b.config)
    with pytest.raises(ValueError, match="transform"):
        distill_shortcut(first, tiny_data(tmp), tmp_path / "d", cfg, targets_from=other)
    with pytest.raises(ValueError, match="sc_teacher_fraction"):
        distill_shortcut(first, tiny_data(tmp), tmp_path / "e", apply_overrides(cfg, ["distill.sc_teacher_fraction=0"]),
                         targets_from=path)
