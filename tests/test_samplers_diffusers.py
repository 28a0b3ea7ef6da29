"""Cross-check against an independent implementation: HuggingFace diffusers' DDIM, DPM-Solver++(2M) and UniPC.

The oracle denoiser is wrapped as an eps-prediction model for diffusers (VP variables) and used
directly by calofast (sigma-space). Both run the same cosine T=400 table with trailing spacing,
clip_sample off (diffusers' default clips x0 to [-1, 1], wrong for unbounded shower data).
"""
import math

import numpy as np
import pytest
import torch

from calofast import samplers as S
from calofast.schedules import table_grid, vp_sigmas

from oracle import GaussianDenoiser

diffusers = pytest.importorskip("diffusers", reason="diffusers not installed (pip install '.[test]')")

T = 400
D = GaussianDenoiser(mu=0.3, s=0.7)
ABAR = 1 / (1 + vp_sigmas("cosine", T) ** 2)


def _eps_model(sample: torch.Tensor, t: int) -> torch.Tensor:
    """eps prediction of the oracle at table index t, in VP variables (z = sqrt(abar) x)."""
    abar = float(ABAR[t])
    sigma = math.sqrt((1 - abar) / abar)
    x = sample / math.sqrt(abar)
    denoised = D(x, torch.full((x.shape[0],), sigma, dtype=x.dtype), None)
    return (x - denoised) / sigma


def _diffusers_run(scheduler, steps: int, z: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    scheduler.set_timesteps(steps)
    sample = z.clone()
    for t in scheduler.timesteps:
        sample = scheduler.step(_eps_model(sample, int(t)), t, sample).prev_sample
    return sample, scheduler.timesteps.numpy()


def _common():
    return dict(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                timestep_spacing="trailing")


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_ddim_matches_diffusers(steps):
    sched = diffusers.DDIMScheduler(**_common(), clip_sample=False, set_alpha_to_one=True)
    z = torch.randn(16, 30, generator=torch.Generator().manual_seed(steps), dtype=torch.float32)
    ref, timesteps = _diffusers_run(sched, steps, z)
    sig = table_grid(vp_sigmas("cosine", T), steps, "trailing")
    np.testing.assert_array_equal(np.argsort(-sig[:-1].numpy()), np.arange(steps))
    assert np.allclose(sig[:-1].numpy(), vp_sigmas("cosine", T)[timesteps])
    # diffusers starts from z ~ N(0, 1) in VP variables: x = z / sqrt(abar) = sigma_0 z (1 + 1/sigma_0^2)^(1/2).
    start = z.double() * math.sqrt(1 + 1 / float(sig[0]) ** 2)
    ours = S.ddim(D, start, sig, None, eta=0.0)
    torch.testing.assert_close(ours.float(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_matches_diffusers(steps):
    sched = diffusers.DPMSolverMultistepScheduler(**_common(), algorithm_type="dpmsolver++", solver_order=2,
                                                   solver_type="midpoint", lower_order_final=True,
                                                   final_sigmas_type="zero", thresholding=False)
    z = torch.randn(16, 30, generator=torch.Generator().manual_seed(100 + steps), dtype=torch.float32)
    ref, timesteps = _diffusers_run(sched, steps, z)
    sig = table_grid(vp_sigmas("cosine", T), steps, "trailing")
    assert np.allclose(sig[:-1].numpy(), vp_sigmas("cosine", T)[timesteps])
    start = z.double() * math.sqrt(1 + 1 / float(sig[0]) ** 2)
    # diffusers' 2nd-order solver takes only the last step first order (its lower_order_second applies
    # to order 3), and so does calofast's default.
    ours = S.dpmpp_2m(D, start, sig, None)
    torch.testing.assert_close(ours.float(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order, steps", [(2, 5), (2, 10), (2, 20), (3, 5), (3, 10)])
def test_unipc_matches_diffusers(order, steps):
    """UniPC bh2 with the corrector at every step but the first, lower-order warm-up and final step. Run in
    float64 (diffusers keeps its table in float32: agreement ~2e-5); the predictor alone differs far more."""
    sched = diffusers.UniPCMultistepScheduler(**_common(), solver_order=order, solver_type="bh2", predict_x0=True,
                                              lower_order_final=True, final_sigmas_type="zero", thresholding=False)
    z = torch.randn(16, 30, generator=torch.Generator().manual_seed(200 + steps), dtype=torch.float64)
    ref, timesteps = _diffusers_run(sched, steps, z)
    sig = table_grid(vp_sigmas("cosine", T), steps, "trailing")
    assert np.allclose(sig[:-1].numpy(), vp_sigmas("cosine", T)[timesteps])
    start = z * math.sqrt(1 + 1 / float(sig[0]) ** 2)
    err = float((S.unipc(D, start, sig, None, order=order) - ref).abs().max())
    err_predictor = float((S.unipc(D, start, sig, None, order=order, corrector=False) - ref).abs().max())
    assert err < 1e-4 and err_predictor > 10 * err, (err, err_predictor)
