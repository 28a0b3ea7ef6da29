"""Run under torchrun: a few DDP training steps of a tiny model; each rank saves its final weights."""
import sys
from dataclasses import replace
from pathlib import Path

import torch

from calofast.config import apply_overrides, get_preset
from calofast.diffusion import Preconditioned, build_parameterisation, denoising_loss
from calofast.geometry import get_geometry
from calofast.nn import build_network
from calofast.train import fit, setup_distributed

out, xml = Path(sys.argv[1]), sys.argv[2]
d = setup_distributed()
cfg = apply_overrides(get_preset("tiny"), [f"geometry={xml}"])
geo = get_geometry(cfg.geometry)
torch.manual_seed(0)                                   # same init on every rank (DDP also broadcasts)
model = Preconditioned(build_network(cfg.network, geo), build_parameterisation(cfg.diffusion))
g = torch.Generator().manual_seed(1)
x0, cond = torch.randn(256, 1, 3, 4, 3, generator=g), torch.rand(256, 1, generator=g) * 2 - 1
train = replace(cfg.train, showers=320, batch_size=32, checkpoint_showers=10**9, log_showers=160)
param = model.param
ema, _ = fit(lambda m, x, c, gen: denoising_loss(m, param, x, c, gen), model, (x0, cond), train, out, dist_info=d)
torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, out / f"rank{d.rank}.pt")
