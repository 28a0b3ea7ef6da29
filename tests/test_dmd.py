"""Distribution matching (distill/dmd.py): the student's jumps are the generate pipeline's, the gradient is zero
when the critic is the teacher and points the right way on the Gaussian oracle, DMD training of a one-parameter
generator finds the teacher's width, and a tiny shortcut student trains with it, records it and resumes."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from calofast.checkpoint import load_bundle
from calofast.config import apply_overrides
from calofast.diffusion import Flow
from calofast.distill import distill_shortcut
from calofast.distill.dmd import DistributionMatching, jump_sample
from calofast.interval import IntervalDenoiser, uniform_grid, widen_condition
from calofast.samplers import euler

from helpers import tiny_data, tiny_teacher


class Gaussian(nn.Module):
    """The ideal denoiser of x0 ~ N(0, exp(log_var)) in sigma-space, a flow-parameterised stage (the critic's
    form in the oracle test); `learn` makes the variance a parameter."""

    def __init__(self, var: float, learn: bool = False):
        super().__init__()
        self.param = Flow()
        self.log_var = nn.Parameter(torch.tensor(float(np.log(var))), requires_grad=learn)

    def forward(self, x, sigma, cond):
        v = self.log_var.exp()
        return v / (v + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2) * x


class Scaled(nn.Module):
    """A one-parameter 'student' behind the interval call: one jump from sigma_max gives a * noise."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x, sigma, cond, interval=None):
        return self.a * x / sigma.reshape(-1, *([1] * (x.ndim - 1)))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dmd")
    return tiny_teacher(tmp, "train.showers=3000"), tmp


def test_jumps_are_the_euler_sampler_on_the_bound_grid(teacher):
    b = load_bundle(teacher[0])
    s_max = 160.0
    den = IntervalDenoiser(widen_condition(b.denoiser.net), b.denoiser.param, s_max / (1 + s_max), 8).eval()
    torch.nn.init.normal_(den.net.emb.cond_mlp[0].weight)            # the interval now matters
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(16, *b.event_shape, generator=g)
    cond = torch.randn(16, b.transform.cond_dims[-1], generator=g)
    with torch.no_grad():
        for steps in (1, 2, 4):
            grid = uniform_grid(steps, s_max)
            ref = euler(den.on_grid(grid), noise, grid, cond)            # the sampler scales unit noise
            got = jump_sample(den, noise, cond, s_max / (1 + s_max), steps)
            assert torch.allclose(got, ref, atol=2e-5, rtol=1e-4), (steps, float((got - ref).abs().max()))


def _matching(real_var, critic_var, learn=False, **kw):
    return DistributionMatching(Gaussian(real_var), Gaussian(critic_var, learn), t_max=160 / 161, jumps=(1,), **kw)


def test_gradient_is_zero_when_the_critic_is_the_teacher_and_shrinks_a_too_wide_student():
    g = torch.Generator().manual_seed(1)
    x0, cond = torch.zeros(512, 4), torch.zeros(512, 1)
    for critic_var, sign in ((1.0, 0), (2.0, 1), (0.5, -1)):           # the student's width against the teacher's 1
        dm = _matching(1.0, critic_var, updates=1, fraction=1.0, lr=0.0)   # lr 0: the critic stays as built
        student = Scaled(critic_var ** 0.5)
        loss = dm.loss(student, x0, cond, g)
        loss.backward()
        if sign == 0:
            assert float(student.a.grad) == 0.0 and float(loss.detach()) == 0.0
        else:                                                         # descent moves a towards 1
            assert sign * float(student.a.grad) > 0, (critic_var, float(student.a.grad))


@pytest.mark.parametrize("a0", [2.0, 0.5])
def test_distribution_matching_finds_the_teachers_width(a0):
    """A student a * noise and a learnable Gaussian critic, from a0 against a teacher N(0, 1): a -> 1. With the
    critic at the student's own width at all times the fixed point is a = 1 exactly; the tolerance 0.1 is about
    8 times the Adam noise of a at this learning rate (seen: |a - 1| <= 0.013 over seeds 0-2)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    dm = _matching(1.0, a0 ** 2, learn=True, updates=4, fraction=1.0, lr=0.05, grad_clip=0.0)
    student = Scaled(a0)
    opt = torch.optim.Adam(student.parameters(), lr=0.02)
    x0, cond = torch.zeros(256, 8), torch.zeros(256, 1)
    for _ in range(400):
        loss = dm.loss(student, x0, cond, g)
        opt.zero_grad()
        (1e3 * loss).backward()                   # Adam is scale-free; the factor keeps the gradient off eps
        opt.step()
    a = float(student.a.detach())
    assert abs(a - 1.0) < 0.1, a
    assert abs(float(dm.critic.log_var.detach().exp()) - a ** 2) < 0.2
    stats = dm.stats()
    assert set(stats) == {"critic_loss", "dmd_grad"} and dm.stats() == {}


def test_needs_a_plain_flow_teacher():
    with pytest.raises(ValueError, match="plain flow-matching teacher"):
        DistributionMatching.of(object(), t_max=0.99)


def test_shortcut_student_with_distribution_matching_trains_records_and_resumes(teacher, tmp_path):
    path, tmp = teacher
    sets = ["distill.sc_showers=256", "distill.sc_max_steps=8", "train.batch_size=64", "train.checkpoint_showers=128",
            "train.log_showers=64", "distill.dmd_weight=1", "distill.dmd_jumps=1,2", "distill.dmd_updates=1",
            "distill.dmd_warmup=2"]
    cfg = apply_overrides(load_bundle(path).config, sets)
    out = distill_shortcut(path, tiny_data(tmp), tmp_path / "d", cfg)
    student = load_bundle(out)
    assert student.sampler["dmd"] == {"weight": 1.0, "jumps": [1, 2]} and student.sampler["steps"] == 2
    recs = [json.loads(line) for line in open(tmp_path / "d" / "stats.jsonl")]
    assert recs and all(np.isfinite([r["loss"], r["critic_loss"], r["dmd_grad"]]).all() for r in recs)
    assert recs[-1]["showers"] == 256
    state = torch.load(tmp_path / "d" / "state.pt", weights_only=True)
    assert set(state["extra"]["dmd"]) == {"critic", "opt", "calls"} and state["extra"]["dmd"]["calls"] == 4
    longer = apply_overrides(cfg, ["distill.sc_showers=384"])       # resumes from 256 with the critic's state
    distill_shortcut(path, tiny_data(tmp), tmp_path / "d", longer)
    recs = [json.loads(line) for line in open(tmp_path / "d" / "stats.jsonl")]
    assert [r["showers"] for r in recs][-2:] == [320, 384]
    with pytest.raises(ValueError, match="plain flow-matching teacher"):   # a shortcut teacher needs --targets-from
        distill_shortcut(out, tiny_data(tmp), tmp_path / "e", cfg)
    with pytest.raises(ValueError, match="shortcut loss"):
        distill_shortcut(path, tiny_data(tmp), tmp_path / "f", apply_overrides(cfg, ["distill.sc_loss=meanflow"]))
