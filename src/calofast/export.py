"""Export a bundle and a deterministic few-step sampler to one ONNX file (or TorchScript) for Geant4.

The graph holds the preprocessing of the condition, the unrolled K-step sampler of every stage (the
samplers' own step functions, traced with a fixed sigma grid; a factorised model's energy stage, then its
shape stage conditioned on the energies) and the inverse transform to voxel energies.

* `reproducible` flavour: inputs `conditions` [B, 1] (incident energy, MeV) and `noise` [B, D]
  (D = the sum over stages of draws x event size: K draws for a K-step consistency sampler, else one;
  the energy stage's noise first); output `showers` [B, V] in MeV, CaloChallenge order. The host draws
  the noise from its own random engine and reproduces showers.
* `par04` flavour, a drop-in for Par04's `setModelType CaloDiT-2`: one input [B, 8] = (E [GeV], phi,
  theta, 5-slot detector one-hot; index 3 = Par04's SiW detector), noise drawn inside the graph, output
  [B, 6480] in GeV in Par04 cell order (r, phi, z; z fastest). phi, theta and the one-hot are accepted
  and ignored (the DS2 model is conditioned on the energy only).

ONNX: opset 17, IR version 8, float32, dynamic batch axis; metadata inside the file plus a sidecar JSON.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import warnings
from io import BytesIO
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from . import __version__
from .checkpoint import Bundle, atomic_write_bytes, file_sha256
from .data import claim_output
from .generate import sampling_plan
from .interval import bind
from .samplers import SAMPLERS

__all__ = ["UnrolledSampler", "Par04Model", "export_onnx", "export_torchscript", "DETERMINISTIC"]

MAX_EXPORT_NFE = 256       # each evaluation is traced into the graph: 32 take 30 s on a CPU, 256 a few minutes
DETERMINISTIC = ("euler", "ddim", "heun", "dpmpp-2m", "consistency")


@contextlib.contextmanager
def _quiet_trace():
    """Silence exactly the warnings that tracing this graph raises by design: TracerWarnings (the sampler grid,
    loop lengths and event shapes become constants: the export unrolls a fixed sampler on purpose, and
    tests/test_export.py checks the graph's showers against PyTorch's) and the exporter's note that a strided
    Slice is not constant-folded (an optimisation it skips, not an error)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        yield
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
    """conditions [B, 1] MeV, noise [B, noise_size] -> showers [B, V] MeV, all float32.

    Runs the library's own sampler function of every stage with a fixed grid; tracing unrolls the loops."""

    def __init__(self, bundle: Bundle, plan: list[tuple[str, int, torch.Tensor]]):
        super().__init__()
        for name, steps, _ in plan:
            if SAMPLERS[name].nfe(steps) > MAX_EXPORT_NFE:
                raise ValueError(f"{name} with {steps} steps: {SAMPLERS[name].nfe(steps)} network evaluations; the "
                                 f"export unrolls the sampler, so at most {MAX_EXPORT_NFE} per stage (use fewer "
                                 "steps or a student)")
            if name not in DETERMINISTIC:
                raise ValueError(f"export needs a deterministic sampler ({', '.join(DETERMINISTIC)}), not {name!r}")
        self.denoisers = nn.ModuleList([bind(stage.denoiser, name, grid)
                                        for stage, (name, _, grid) in zip(bundle.stages, plan)])
        self.transform, self.plan = bundle.transform, [(name, [float(s) for s in grid]) for name, _, grid in plan]
        self.n_voxels = bundle.geometry.n_voxels
        # Per stage: noise draws (a K-step consistency sampler re-noises K - 1 times) and event shape.
        self.draws = [(len(grid) - 1 if name == "consistency" else 1, shape)
                      for (name, grid), shape in zip(self.plan, bundle.transform.stage_shapes)]
        self.noise_size = sum(k * math.prod(shape) for k, shape in self.draws)

    def forward(self, conditions: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        energies = conditions[:, 0]
        xs, offset = [], 0
        for k, (denoiser, (name, grid), (draws, shape)) in enumerate(zip(self.denoisers, self.plan, self.draws)):
            size = draws * math.prod(shape)
            z = noise[:, offset:offset + size].reshape(noise.shape[0], draws, *shape)
            offset += size
            cond = self.transform.stage_condition(k, energies, xs, dtype=torch.float32)
            xs.append(SAMPLERS[name].fn(denoiser, z[:, 0], torch.tensor(grid, dtype=torch.float64), cond,
                                        rng=_NoiseFeed(z[:, 1:])))
        return self.transform.decode(xs, energies, dtype=torch.float32)[0]


class Par04Model(nn.Module):
    """[B, 8] Par04 input -> [B, V] GeV in Par04 cell order; Gaussian noise drawn inside the graph."""

    def __init__(self, core: UnrolledSampler, bundle: Bundle, energy_scale: float = 1.0):
        super().__init__()
        self.core, self.geometry, self.energy_scale = core, bundle.geometry, energy_scale
        self.noise_size = core.noise_size

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        energies_mev = inputs[:, :1] * 1000.0
        template = inputs[:, :1].expand(inputs.shape[0], self.noise_size)
        showers = self.core(energies_mev, torch.randn_like(template))
        return self.geometry.to_par04(showers) * (self.energy_scale / 1000.0)


def _metadata(bundle: Bundle, plan, flavour: str, io: dict) -> dict:
    lo, hi = bundle.transform.energy_range
    name, steps, sigmas = plan[-1]
    stages = [{"stage": stage.name, "sampler": n, "steps": k, "nfe": SAMPLERS[n].nfe(k)}
              for stage, (n, k, _) in zip(bundle.stages, plan)]
    return {"producer": f"calofast {__version__}", "flavour": flavour, "model": bundle.path.name if bundle.path else "",
            "model_sha256": file_sha256(bundle.path) if bundle.path else "", "sampler": name,
            "steps": steps, "sigmas": [float(s) for s in sigmas], "nfe": SAMPLERS[name].nfe(steps), "stages": stages,
            "geometry": bundle.geometry.name, "grid": list(bundle.geometry.grid_shape),
            "incident_energy_range_mev": [lo, hi], **io}


def _claim(paths: list[Path], force: bool) -> None:
    """Check every output before any work (`claim_output`; the writes make their folder)."""
    for path in paths:
        claim_output(path, force)


@contextlib.contextmanager
def _tracing(core: UnrolledSampler, bundle: Bundle, plan, what: str, progress: bool):
    """A progress bar over the network calls being traced (a forward hook on each stage's denoiser: Python that
    touches no tensor, so nothing of it enters the graph), then a note on it while the graph is built."""
    if not progress:
        yield
        return
    from tqdm import tqdm
    stages = ", ".join(f"{stage.name}: {name} {steps} step{'s' if steps != 1 else ''}"
                       for stage, (name, steps, _) in zip(bundle.stages, plan))
    total = sum(SAMPLERS[name].nfe(steps) for name, steps, _ in plan)
    with tqdm(total=total, unit="call", desc=f"tracing into {what} ({stages})", file=sys.stderr) as bar:
        def tick(*args) -> None:       # returns None: a forward hook's result would replace the output
            if bar.n < total:          # (torch.jit.trace runs the module again to check the trace)
                bar.update(1)
            if bar.n == total:
                bar.set_postfix_str(f"traced; now building the {what} graph (about as long again)")
        hooks = [d.register_forward_hook(tick) for d in core.denoisers]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()


def export_onnx(bundle: Bundle, output: "str | Path", *, sampler: str | None = None, steps: int | None = None,
                flavour: Flavour = "reproducible", par04_energy_scale: float = 1.0, force: bool = False,
                progress: bool = False) -> Path:
    """Write model.onnx and model.json (sidecar), each atomically; returns the ONNX path. `progress`: say on
    stderr what is being traced before the (for a many-step teacher, minutes-long) trace starts."""
    import onnx

    output = Path(output)
    if not (math.isfinite(par04_energy_scale) and par04_energy_scale > 0):
        raise ValueError(f"--par04-energy-scale {par04_energy_scale}: must be finite and > 0")
    _claim([output, output.with_suffix(".json")], force)
    if not bundle.geometry.is_regular:
        raise ValueError("ONNX export supports regular geometries (ds2, ds3)")
    plan = sampling_plan(bundle, sampler, steps)
    bundle.to("cpu")
    core = UnrolledSampler(bundle, plan).eval()
    V = core.n_voxels
    if flavour == "reproducible":
        module, args = core, (torch.full((2, 1), 1e4), torch.zeros(2, core.noise_size))
        names, outs = ["conditions", "noise"], ["showers"]
        axes = {"conditions": {0: "batch"}, "noise": {0: "batch"}, "showers": {0: "batch"}}
        io = {"inputs": "conditions [B,1] incident energy MeV; noise [B,%d] standard normal" % core.noise_size,
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
    buf = BytesIO()
    with torch.no_grad(), _quiet_trace(), _tracing(core, bundle, plan, "ONNX", progress):
        torch.onnx.export(module, args, buf, input_names=names, output_names=outs, dynamic_axes=axes,
                          opset_version=17, dynamo=False, do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    model.ir_version = 8
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = V   # [B, V]: a traced factorised decode leaves V open
    meta = _metadata(bundle, plan, flavour, io)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value) if not isinstance(value, str) else value
    model.producer_name, model.producer_version = "calofast", __version__
    onnx.checker.check_model(model)
    atomic_write_bytes(output, model.SerializeToString())
    atomic_write_bytes(output.with_suffix(".json"), json.dumps(meta, indent=1).encode())
    return output


def export_torchscript(bundle: Bundle, output: "str | Path", *, sampler: str | None = None, steps: int | None = None,
                       force: bool = False, progress: bool = False) -> Path:
    """Secondary path: a traced TorchScript module with the reproducible-flavour signature."""
    output = Path(output)
    _claim([output], force)
    plan = sampling_plan(bundle, sampler, steps)
    core = UnrolledSampler(bundle.to("cpu"), plan).eval()
    with torch.no_grad(), _quiet_trace(), _tracing(core, bundle, plan, "TorchScript", progress):
        traced = torch.jit.trace(core, (torch.full((2, 1), 1e4), torch.zeros(2, core.noise_size)))
    buf = BytesIO()
    torch.jit.save(traced, buf)
    atomic_write_bytes(output, buf.getvalue())
    return output
