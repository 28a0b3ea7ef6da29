"""Self-describing model bundles (one .safetensors file) and resumable training state.

A bundle holds the EMA network weights of every stage (`<stage>.net.*`: one stage "shower" for a plain
model, "energy" and "shape" for a factorised one) and the fitted transform constants (`transform.*`);
its metadata holds everything needed to rebuild the model with nothing but the file: format version,
full config (JSON), each stage's parameterisation and default sampler (a distilled student's own),
transform spec, geometry, code version and git commit, training seed, showers seen,
sha256 of the training data and the parent bundle for distilled students. Weights may be stored in
bf16 or fp16 (`weights_dtype`) and are loaded as float32. Two sha256 sums, one over all tensor bytes and one
over the metadata, detect tampering. No pickle is involved in bundles; the resume state (`state.pt`)
is separate and never shipped. Format 1 bundles (one stage, `net.*`) still load.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .config import Config, check_config, from_dict, to_dict
from .data import claim_output, temporary_for
from .diffusion import Preconditioned, parameterisation_from_dict, parameterisation_to_dict
from .geometry import Geometry, Layer, PRESETS, SamplingMaterial, check_layers
from .interval import IntervalDenoiser
from .nn import build_network
from .transforms import ShowerTransform, transform_from_spec

__all__ = ["Stage", "Bundle", "save_bundle", "load_bundle", "shipped_models", "SHIPPED", "save_state",
           "load_state", "file_sha256", "git_commit", "atomic_write_bytes", "stage_network"]

FORMAT = "calofast/2"
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def file_sha256(path: "str | Path") -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary in the same folder and rename; never replaces anything but a regular file.

    On any failure (a full disk, an interrupt) the temporary is removed and the file at `path`, if any, is
    untouched; an OSError names `path`."""
    path = Path(path)
    claim_output(path, force=True)
    path.parent.mkdir(parents=True, exist_ok=True)       # every output's folder is made, as for the HDF5 files
    tmp = temporary_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(f"{path}: cannot write it ({err.strerror or err})") from None
        raise


def _geometry_to_json(g: Geometry) -> str:
    return json.dumps({"name": g.name, "particle": g.particle, "threshold_mev": g.threshold_mev,
                       "layer_thickness_mm": g.layer_thickness_mm,
                       "layers": [[l.id, list(l.r_edges), l.n_alpha] for l in g.layers]})


def _geometry_from_json(text: str) -> Geometry:
    d = json.loads(text)
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise ValueError("geometry: expected an object with a name")
    if d["name"] in PRESETS:
        return PRESETS[d["name"]]
    rows = d.get("layers")
    if not (isinstance(rows, list) and all(isinstance(r, list) and len(r) == 3 and isinstance(r[1], list) for r in rows)):
        raise ValueError("geometry: layers must be [id, r_edges, n_alpha] rows")
    layers = tuple(Layer(i, tuple(e), a) for i, e, a in rows)
    check_layers(layers, "geometry")
    thick, thr = d.get("layer_thickness_mm"), d.get("threshold_mev")
    if not (isinstance(thr, (int, float)) and math.isfinite(thr) and thr >= 0) or \
            not (thick is None or isinstance(thick, (int, float)) and math.isfinite(thick) and thick > 0):
        raise ValueError(f"geometry: threshold {thr!r} MeV or layer thickness {thick!r} mm out of range")
    return Geometry(d["name"], str(d.get("particle")), layers, float(thr), thick, SamplingMaterial() if thick else None)


def _check_specs(specs: list) -> None:
    """Each stage spec's types and ranges, before anything is built (a bundle's metadata are data, not trusted)."""
    from .generate import MAX_STEPS
    from .samplers import SAMPLERS
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not isinstance(specs, list) or not 1 <= len(specs) <= 8:
        raise ValueError("stages: expected a list of 1 to 8 stage specs")
    for s in specs:
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("parameterisation"), dict)):
            raise ValueError("a stage spec is not {name, parameterisation, sampler}")
        name, sp, iv = s["name"], s.get("sampler"), s.get("interval")
        if sp is not None:
            if not (isinstance(sp, dict) and sp.get("name") in SAMPLERS and is_int(sp.get("steps"))
                    and 1 <= sp["steps"] <= MAX_STEPS):
                raise ValueError(f"stage {name}: sampler {str(sp)[:120]} is not a known sampler with 1 to {MAX_STEPS} steps")
            for key in ("sigmas", "grid"):
                g = sp.get(key)
                if g is not None and not (isinstance(g, list) and 2 <= len(g) <= MAX_STEPS + 1
                                          and all(num(v) and v >= 0 for v in g) and all(b <= a for a, b in zip(g, g[1:]))):
                    raise ValueError(f"stage {name}: its sampler's {key} is not a decreasing list of finite sigmas")
            if "sigmas" in sp and len(sp["sigmas"]) != sp["steps"] + 1:
                raise ValueError(f"stage {name}: sampler steps {sp['steps']} but a grid of {len(sp['sigmas']) - 1} steps")
        if iv is not None and not (isinstance(iv, dict) and num(iv.get("t_max")) and 0 < iv["t_max"] < 1
                                   and is_int(iv.get("max_steps")) and 1 <= iv["max_steps"] <= 2 ** 16
                                   and not iv["max_steps"] & (iv["max_steps"] - 1)):
            raise ValueError(f"stage {name}: interval {str(iv)[:120]} is not t_max in (0, 1) and a power-of-two max_steps")


def _check_weights(net: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, stage: str) -> None:
    """The file's tensors under `prefix` against the state dict of `net` (built on the meta device: no memory)."""
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    have = {k[len(prefix):]: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix)}
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    other = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    if missing or extra or other:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
                 f"{len(other)} of another shape (e.g. {other[0]}: {have[other[0]]} in the file, {want[other[0]]} "
                 "in the network)" if other else ""]
        raise ValueError(f"the {stage} stage's weights do not fit the network its metadata describe: "
                         + ", ".join(p for p in parts if p))


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _meta_sha256(meta: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "meta_sha256"},
                                     sort_keys=True).encode()).hexdigest()


@dataclass
class Stage:
    """One generative stage: its name, denoiser D(x, sigma, cond) and default sampler spec ({"name",
    "steps"} and, for distilled students, their own "sigmas"/"grid"), or None. The event shape and the
    condition come from the bundle's transform."""

    name: str
    denoiser: Preconditioned
    sampler: dict | None = None

    def with_denoiser(self, denoiser: Preconditioned, sampler: dict | None) -> "Stage":
        return Stage(self.name, denoiser, sampler)


@dataclass
class Bundle:
    """A loaded model: its stages (the last is the main, expensive one), transform, config and metadata."""

    stages: list[Stage]
    transform: ShowerTransform
    config: Config
    meta: dict[str, str]
    path: Path | None = None

    @property
    def denoiser(self) -> Preconditioned:
        return self.stages[-1].denoiser

    @property
    def sampler(self) -> dict | None:
        return self.stages[-1].sampler

    @property
    def geometry(self) -> Geometry:
        return self.transform.geometry

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.transform.event_shape

    def to(self, device) -> "Bundle":
        for stage in self.stages:
            stage.denoiser.to(device)
        self.transform.to(device)
        return self


def stage_network(config: Config, transform: ShowerTransform, k: int, extra_cond: int = 0) -> nn.Module:
    """The raw network of stage k: the energy stage from `config.energy`, the main stage from `config`;
    `extra_cond` more condition entries (an interval model's jump length)."""
    net_cfg, _, _ = config.stage(transform.stages[k])
    return build_network(net_cfg, transform.geometry, transform.cond_dims[k] + extra_cond, transform.stage_shapes[k])


def _interval_spec(denoiser: Preconditioned) -> dict | None:
    if not isinstance(denoiser, IntervalDenoiser):
        return None
    return {"t_max": denoiser.t_max, "max_steps": denoiser.max_steps}


def save_bundle(path: "str | Path", stages: list[Stage], transform: ShowerTransform, config: Config, *,
                train_seed: int = 0, events_seen: int = 0, data: list[dict] | None = None,
                parent: str | None = None, extra: dict | None = None, weights_dtype: str = "fp32") -> Path:
    """Write the bundle atomically (temporary file, then rename); weights stored as `weights_dtype`."""
    from safetensors.torch import save

    path = Path(path)
    if [s.name for s in stages] != list(transform.stages):
        raise ValueError(f"stages {[s.name for s in stages]} do not match the transform's {list(transform.stages)}")
    dtype = WEIGHT_DTYPES[weights_dtype]
    tensors = {f"{s.name}.net.{k}": v.detach().to(dtype).cpu().contiguous()
               for s in stages for k, v in s.denoiser.net.state_dict().items()}
    tensors.update({f"transform.{k}": v.to(torch.float64).contiguous() for k, v in transform.constants().items()})
    meta = {
        "format": FORMAT,
        "config": json.dumps(to_dict(config), sort_keys=True),
        "stages": json.dumps([{"name": s.name, "parameterisation": parameterisation_to_dict(s.denoiser.param),
                               "sampler": s.sampler, **({"interval": iv} if (iv := _interval_spec(s.denoiser)) else {})}
                              for s in stages]),
        "transform": json.dumps(transform.spec()),
        "geometry": _geometry_to_json(transform.geometry),
        "weights_dtype": weights_dtype,
        "calofast_version": __version__,
        "git_commit": git_commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "train_seed": str(train_seed),
        "train_events_seen": str(events_seen),
        "data": json.dumps(data or []),
        "parent": parent or "",
        "tensors_sha256": _tensors_sha256(tensors),
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    meta["meta_sha256"] = _meta_sha256(meta)
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def set_stage_sampler(path: "str | Path", output: "str | Path", stage: str, sampler: str, steps: int,
                      force: bool = False) -> Path:
    """A copy of a bundle whose stage `stage` defaults to (sampler, steps): the weights and every other field
    unchanged byte for byte, the metadata checksum renewed, the change recorded in `edited`. A distilled
    stage (its own grid) cannot be changed: its sampler is part of what it learnt."""
    from safetensors import safe_open
    from safetensors.torch import save
    from .data import claim_output
    src = load_bundle(path).path                      # checks the bundle and resolves a shipped name
    output = Path(output)
    claim_output(output, force)
    with safe_open(str(src), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    specs = json.loads(meta["stages"])
    names = [s["name"] for s in specs]
    if stage not in names:
        raise ValueError(f"{src}: no stage {stage!r} (stages: {', '.join(names)})")
    spec = specs[names.index(stage)]
    if spec.get("sampler") and ({"sigmas", "grid"} & set(spec["sampler"])):
        raise ValueError(f"{src}: the {stage} stage is distilled for {spec['sampler']['name']} with "
                         f"{spec['sampler']['steps']} steps; its sampler cannot be changed")
    old = spec.get("sampler")
    spec["sampler"] = {"name": sampler, "steps": int(steps)}
    meta["stages"] = json.dumps(specs)
    meta["edited"] = (meta.get("edited", "") + f"; {stage} sampler {old} -> {spec['sampler']}").lstrip("; ")
    meta["meta_sha256"] = _meta_sha256(meta)                # the hash leaves out its own field
    atomic_write_bytes(output, save(tensors, metadata=meta))
    return output


SHIPPED = Path(__file__).parent / "models"


def shipped_models() -> list[str]:
    """Names of the bundles that ship inside the package (usable wherever a bundle path is)."""
    return sorted(p.stem for p in SHIPPED.glob("*.safetensors"))


def _stage_specs(meta: dict[str, str]) -> list[dict]:
    """Per-stage {name, parameterisation, sampler, prefix}; format 1 bundles hold one stage under `net.`."""
    if meta.get("format") == "calofast/1":
        return [{"name": "shower", "parameterisation": json.loads(meta["parameterisation"]),
                 "sampler": json.loads(meta["sampler"]) if meta.get("sampler") else None, "prefix": "net."}]
    return [{**s, "prefix": f"{s['name']}.net."} for s in json.loads(meta["stages"])]


def bundle_path(path: "str | Path") -> Path:
    """The file of a bundle given by path or by a shipped bundle's name (e.g. `ds2-factorised`)."""
    path = Path(path)
    shipped = SHIPPED / f"{path.name.removesuffix('.safetensors')}.safetensors"
    if not path.is_file() and len(path.parts) == 1 and shipped.is_file():
        path = shipped
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))
        raise ValueError(f"{path}: is a folder, not a bundle" +
                         (f"; give a file in it ({', '.join(inside)})" if inside else " (it holds no .safetensors)"))
    if not path.is_file():
        raise ValueError(f"{path}: no such model bundle (shipped: {', '.join(shipped_models())})")
    return path


def load_bundle(path: "str | Path", device: "str | torch.device" = "cpu") -> Bundle:
    """Rebuild stages and transform from the file alone; strict loading, integrity checked.

    `path` is a file, or the name of a shipped bundle (e.g. `ds2-factorised`)."""
    from safetensors import safe_open

    path = bundle_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers
        raise ValueError(f"{path}: not a readable safetensors bundle (truncated or corrupt: {err})") from None
    if meta.get("format") not in ("calofast/1", FORMAT):
        raise ValueError(f"{path}: not a calofast bundle (format {meta.get('format')!r}, expected {FORMAT!r})")
    if _tensors_sha256(tensors) != meta.get("tensors_sha256"):
        raise ValueError(f"{path}: tensor checksum mismatch: the weights were modified or damaged")
    if "meta_sha256" in meta and _meta_sha256(meta) != meta["meta_sha256"]:
        raise ValueError(f"{path}: metadata checksum mismatch: the metadata were modified or damaged")
    try:   # every field is checked for type and range before anything is built or allocated
        config = from_dict(json.loads(meta["config"]))
        check_config(config)
        geometry = _geometry_from_json(meta["geometry"])
        specs = _stage_specs(meta)
        _check_specs(specs)
        consts = {k[len("transform."):]: v for k, v in tensors.items() if k.startswith("transform.")}
        spec_t = json.loads(meta["transform"])
        if not isinstance(spec_t, dict):
            raise ValueError("transform: expected an object")
        transform = transform_from_spec(geometry, spec_t, consts)
        if [s["name"] for s in specs] != list(transform.stages):
            raise ValueError(f"stages {[s['name'] for s in specs]} do not fit a {transform.spec()['kind']} transform")
        stages = []
        for k, spec in enumerate(specs):
            iv = spec.get("interval")
            with torch.device("meta"):
                _check_weights(stage_network(config, transform, k, extra_cond=1 if iv else 0), tensors,
                               spec["prefix"], spec["name"])
            net = stage_network(config, transform, k, extra_cond=1 if iv else 0)
            net.load_state_dict({key[len(spec["prefix"]):]: v.float() for key, v in tensors.items()
                                 if key.startswith(spec["prefix"])}, strict=True)
            param = parameterisation_from_dict(spec["parameterisation"])
            den = IntervalDenoiser(net, param, float(iv["t_max"]), int(iv["max_steps"])) if iv else \
                Preconditioned(net, param)
            stages.append(Stage(spec["name"], den.eval().requires_grad_(False), spec["sampler"]))
    except Exception as err:   # noqa: BLE001 -- whatever a damaged or edited file provokes: one line, never a traceback
        text = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ValueError(f"{path}: inconsistent bundle metadata or weights ({text})") from None
    return Bundle(stages, transform, config, meta, path).to(device)


def save_state(path: "str | Path", state: dict) -> None:
    """Resume state (weights, EMA, optimiser, step, RNG), written atomically with torch.save."""
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_state(path: "str | Path") -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
