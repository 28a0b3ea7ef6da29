"""The MeanFlow loss on the interval network: its target is the exact average velocity on the Gaussian oracle
(to the finite difference's second order), and a MeanFlow student of a tiny teacher trains, samples with any
number of jumps and moves its one-jump map towards the teacher's ODE."""
import json
import math

import numpy as np
import pytest
import torch

from calofast.checkpoint import load_bundle
from calofast.config import apply_overrides
from calofast.distill import distill_shortcut
from calofast.distill.meanflow import meanflow_target
from calofast.generate import sample_batch
from calofast.interval import IntervalDenoiser

from helpers import tiny_data, tiny_teacher
from oracle import GaussianDenoiser


class ExactAverageVelocity:
    """s(x_t, t, h) of the Gaussian oracle's probability-flow ODE behind the interval denoiser call: the exact
    average velocity (x_t - x_{t-h}) / h, and the marginal velocity at h = 0."""

    def __init__(self, oracle: GaussianDenoiser):
        self.oracle = oracle

    def __call__(self, x, sigma, cond, interval):
        sig = sigma.double()
        z, t = x.double() / (1 + sig[:, None]), (sig / (1 + sig))[:, None]
        h = interval.double()[:, None]
        r = t - h
        s_r = r / (1 - r)
        z_r = torch.stack([self.oracle.ode(x[i].double(), float(sig[i]), float(s_r[i])) for i in range(len(x))]) \
            / (1 + s_r)
        v = (z - self.oracle(x.double(), sig, cond)) / t
        u = torch.where(h > 0, (z - z_r) / h.clamp_min(1e-300), v)
        return (z - t * u).float()


def test_meanflow_target_is_the_exact_average_velocity_on_the_gaussian_oracle():
    """With the exact s and the marginal velocity v (the conditional one's mean: the target is linear in v), the
    MeanFlow identity holds: v - h ds/dt = s. The central difference's error falls ~4x when its step halves."""
    oracle = GaussianDenoiser(mu=0.3, s=0.7)
    model = ExactAverageVelocity(oracle)
    g = torch.Generator().manual_seed(0)
    n = 64
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    h = t * (0.1 + 0.85 * torch.rand(n, generator=g, dtype=torch.float64))
    z = 0.3 + torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.sqrt((1 - t) ** 2 * 0.49 + t ** 2)[:, None]
    sig = t / (1 - t)
    exact = (z - model(z * (1 + sig[:, None]), sig, None, h).double()) / t[:, None]
    v = (z - oracle(z * (1 + sig[:, None]), sig, None)) / t[:, None]
    errors = [float((meanflow_target(model, z, t, h, v, None, eps).double() - exact).abs().max()) for eps in (0.02, 0.01)]
    scale = float(exact.abs().max())
    assert errors[1] < 1e-3 * scale and 2.5 < errors[0] / errors[1] < 5.5, (errors, scale)
    # h -> 0: the target is the velocity itself
    zero = meanflow_target(model, z, t, torch.zeros_like(h), v, None, 0.01).double()
    assert torch.allclose(zero, v, atol=1e-5)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mf")
    return tiny_teacher(tmp, "train.showers=6000"), tmp


def test_meanflow_student_trains_samples_and_nears_the_teacher_ode(teacher, tmp_path):
    path, tmp = teacher
    b = load_bundle(path)
    # lr 3e-4: at the shortcut test's 1e-3 the MeanFlow loss (p = 1) made this tiny model's one jump worse
    # (docs/distillation.md, the CPU pilot)
    cfg = apply_overrides(b.config, ["distill.sc_loss=meanflow", "distill.sc_showers=8000", "distill.sc_max_steps=8",
                                     "distill.lr=3e-4", "train.batch_size=64", "train.checkpoint_showers=8000",
                                     "distill.sc_steps=1"])
    out = distill_shortcut(path, tiny_data(tmp), tmp_path / "mf", cfg)
    student = load_bundle(out)
    assert isinstance(student.denoiser, IntervalDenoiser) and student.config.distill.sc_loss == "meanflow"
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "mf" / "stats.jsonl")]
    assert losses and all(np.isfinite(losses))
    for steps in (1, 2):
        showers, nfe, clipped = sample_batch(student, torch.tensor([2e3, 5e4], dtype=torch.float64), 0, range(2),
                                             steps=steps)
        assert nfe["shape"] == steps and torch.isfinite(showers).all() and not clipped.any()
    # Paired over the same noise and conditions: one jump of the student is closer to the teacher's ODE than one
    # Euler step of the teacher (the same test as the shortcut loss's).
    from test_shortcut import one_jump_errors
    before, after = one_jump_errors(b, student, cfg)
    diff = before - after
    assert float(diff.mean()) > 5 * float(diff.std()) / math.sqrt(len(diff)), (float(before.mean()), float(after.mean()))
