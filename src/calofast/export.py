"""Export a bundle and a deterministic few-step sampler to one ONNX file (or TorchScript) for Geant4.

The graph holds the preprocessing of the condition, the unrolled K-step sampler (the samplers' own
step functions, traced with a fixed sigma grid) and the inverse transform to voxel energies.

* `reproducible` flavour: inputs `conditions` [B, 1] (incident energy, MeV) and `noise` [B, D]
  (D = K x voxels for the multistep consistency sampler, else voxels); output `showers` [B, V] in MeV,
  CaloChallenge order. The host draws the noise from its own random engine and reproduces showers.
* `par04` flavour, a drop-in for Par04's `setModelType CaloDiT-2`: one input [B, 8] = (E [GeV], phi,
  theta, 5-slot detector one-hot; index 3 = Par04's SiW detector), noise drawn inside the graph, output
  [B, 6480] in GeV in Par04 cell order (r, phi, z; z fastest). phi, theta and the one-hot are accepted
  and ignored (the DS2 model is conditioned on the energy only).

ONNX: opset 17, IR version 8, float32, dynamic batch axis; metadata inside the file plus a sidecar JSON.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from . import __version__
from .checkpoint import Bundle, file_sha256
from .generate import resolve_sampler
from .samplers import SAMPLERS

__all__ = ["UnrolledSampler", "Par04Model", "export_onnx", "export_torchscript", "DETERMINISTIC"]

DETERMINISTIC = ("euler", "ddim", "heun", "dpmpp-2m", "consistency")
Flavour = Literal["par04", "reproducible"]


class _NoiseFeed:
    """Hands the graph's noise input to a stochastic step, draw by draw (stands in for an EventRNG)."""

    def __init__(self, draws: torch.Tensor):
        self.draws, self.k = draws, 0          # [B, K, ...]

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        out = self.draws[:, self.k]
        self.k += 1
        return out


class UnrolledSampler(nn.Module):
    """conditions [B, 1] MeV, noise [B, K*V or V] -> showers [B, V] MeV, all float32.

    Runs the library's own sampler function with a fixed grid; tracing unrolls its loop."""

    def __init__(self, bundle: Bundle, sampler: str, sigmas: torch.Tensor):
        super().__init__()
        if sampler not in DETERMINISTIC:
            raise ValueError(f"export needs a deterministic sampler ({', '.join(DETERMINISTIC)}), not {sampler!r}")
        self.denoiser, self.transform, self.sampler = bundle.denoiser, bundle.transform, sampler
        self.sigmas = [float(s) for s in sigmas]
        self.event_shape = bundle.event_shape
        self.n_voxels = bundle.geometry.n_voxels
        self.noise_draws = len(self.sigmas) - 1 if sampler == "consistency" else 1

    def forward(self, conditions: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        energies = conditions[:, 0]
        cond = self.transform.condition(energies, dtype=torch.float32)
        z = noise.reshape(noise.shape[0], self.noise_draws, *self.event_shape)
        x0 = SAMPLERS[self.sampler].fn(self.denoiser, z[:, 0], torch.tensor(self.sigmas, dtype=torch.float64), cond,
                                       rng=_NoiseFeed(z[:, 1:]))
        return self.transform.inverse(x0, energies, dtype=torch.float32)


class Par04Model(nn.Module):
    """[B, 8] Par04 input -> [B, V] GeV in Par04 cell order; Gaussian noise drawn inside the graph."""

    def __init__(self, core: UnrolledSampler, bundle: Bundle, energy_scale: float = 1.0):
        super().__init__()
        self.core, self.geometry, self.energy_scale = core, bundle.geometry, energy_scale
        self.noise_size = core.noise_draws * core.n_voxels

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        energies_mev = inputs[:, :1] * 1000.0
        template = inputs[:, :1].expand(inputs.shape[0], self.noise_size)
        showers = self.core(energies_mev, torch.randn_like(template))
        return self.geometry.to_par04(showers) * (self.energy_scale / 1000.0)


def _metadata(bundle: Bundle, sampler: str, sigmas, flavour: str, io: dict) -> dict:
    lo, hi = bundle.transform.energy_range
    return {"producer": f"calofast {__version__}", "flavour": flavour, "model": bundle.path.name if bundle.path else "",
            "model_sha256": file_sha256(bundle.path) if bundle.path else "", "sampler": sampler,
            "steps": len(sigmas) - 1, "sigmas": [float(s) for s in sigmas], "nfe": SAMPLERS[sampler].nfe(len(sigmas) - 1),
            "geometry": bundle.geometry.name, "grid": list(bundle.geometry.grid_shape),
            "incident_energy_range_mev": [lo, hi], **io}


def export_onnx(bundle: Bundle, output: "str | Path", *, sampler: str | None = None, steps: int | None = None,
                flavour: Flavour = "reproducible", par04_energy_scale: float = 1.0, force: bool = False) -> Path:
    """Write model.onnx and model.json (sidecar); returns the ONNX path."""
    import onnx

    output = Path(output)
    if output.exists() and not force:
        raise ValueError(f"{output}: exists already; refusing to overwrite (use --force)")
    if not bundle.geometry.is_regular:
        raise ValueError("ONNX export supports regular geometries (ds2, ds3)")
    name, n_steps, sigmas = resolve_sampler(bundle, sampler, steps)
    bundle.to("cpu")
    core = UnrolledSampler(bundle, name, sigmas).eval()
    V = core.n_voxels
    if flavour == "reproducible":
        module, args = core, (torch.full((2, 1), 1e4), torch.zeros(2, core.noise_draws * V))
        names, outs = ["conditions", "noise"], ["showers"]
        axes = {"conditions": {0: "batch"}, "noise": {0: "batch"}, "showers": {0: "batch"}}
        io = {"inputs": "conditions [B,1] incident energy MeV; noise [B,%d] standard normal" % (core.noise_draws * V),
              "outputs": "showers [B,%d] MeV, CaloChallenge order (layer, alpha, r; r fastest)" % V}
    elif flavour == "par04":
        if bundle.geometry.name != "ds2":
            raise ValueError("the par04 flavour is defined for the DS2 mesh (9 x 16 x 45)")
        module = Par04Model(core, bundle, par04_energy_scale).eval()
        args = (torch.tensor([[10.0, 0, 1.5708, 1, 0, 0, 0, 0]] * 2),)
        names, outs = ["input"], ["output"]
        axes = {"input": {0: "batch"}, "output": {0: "batch"}}
        io = {"inputs": "input [B,8] = (E GeV, phi, theta, one-hot x5; index 3 = SiW); phi/theta/one-hot ignored",
              "outputs": f"output [B,{V}] GeV, Par04 order (r, phi, z; z fastest), energy scale x{par04_energy_scale}",
              "par04_energy_scale": par04_energy_scale}
    else:
        raise ValueError(f"unknown flavour {flavour!r} (par04, reproducible)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    with torch.no_grad():
        torch.onnx.export(module, args, str(tmp), input_names=names, output_names=outs, dynamic_axes=axes,
                          opset_version=17, dynamo=False, do_constant_folding=True)
    model = onnx.load(str(tmp))
    model.ir_version = 8
    meta = _metadata(bundle, name, sigmas, flavour, io)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value) if not isinstance(value, str) else value
    model.producer_name, model.producer_version = "calofast", __version__
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp))
    tmp.replace(output)
    output.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return output


def export_torchscript(bundle: Bundle, output: "str | Path", *, sampler: str | None = None, steps: int | None = None,
                       force: bool = False) -> Path:
    """Secondary path: a traced TorchScript module with the reproducible-flavour signature."""
    output = Path(output)
    if output.exists() and not force:
        raise ValueError(f"{output}: exists already; refusing to overwrite (use --force)")
    name, n_steps, sigmas = resolve_sampler(bundle, sampler, steps)
    core = UnrolledSampler(bundle.to("cpu"), name, sigmas).eval()
    with torch.no_grad():
        traced = torch.jit.trace(core, (torch.full((2, 1), 1e4), torch.zeros(2, core.noise_draws * core.n_voxels)))
    traced.save(str(output))
    return output
