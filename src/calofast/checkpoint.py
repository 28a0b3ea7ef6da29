"""Self-describing model bundles (one .safetensors file) and resumable training state.

A bundle holds the EMA network weights (`net.*`) and the fitted transform constants (`transform.*`);
its metadata holds everything needed to rebuild the denoiser with nothing but the file: format
version, full config (JSON), parameterisation, transform spec, geometry, code version and git
commit, training seed, showers seen, sha256 of the training data, the parent bundle for distilled
students and the sampler a student was made for. A sha256 over all tensor bytes detects tampering.
No pickle is involved in bundles; the resume state (`state.pt`) is separate and never shipped.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .config import Config, from_dict, to_dict
from .diffusion import Preconditioned, parameterisation_from_dict, parameterisation_to_dict
from .geometry import Geometry, Layer, PRESETS, SamplingMaterial
from .nn import build_network
from .transforms import Transform

__all__ = ["Bundle", "save_bundle", "load_bundle", "shipped_models", "SHIPPED", "save_state", "load_state",
           "file_sha256", "git_commit", "atomic_write_bytes"]

FORMAT = "calofast/1"


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _geometry_to_json(g: Geometry) -> str:
    return json.dumps({"name": g.name, "particle": g.particle, "threshold_mev": g.threshold_mev,
                       "layer_thickness_mm": g.layer_thickness_mm,
                       "layers": [[l.id, list(l.r_edges), l.n_alpha] for l in g.layers]})


def _geometry_from_json(text: str) -> Geometry:
    d = json.loads(text)
    if d["name"] in PRESETS:
        return PRESETS[d["name"]]
    layers = tuple(Layer(i, tuple(e), a) for i, e, a in d["layers"])
    return Geometry(d["name"], d["particle"], layers, d["threshold_mev"], d["layer_thickness_mm"],
                    SamplingMaterial() if d["layer_thickness_mm"] else None)


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Bundle:
    """A loaded model: the denoiser D(x, sigma, cond), its transform, config and metadata."""

    denoiser: Preconditioned
    transform: Transform
    config: Config
    meta: dict[str, str]
    path: Path | None = None
    sampler: dict | None = field(default=None)     # for distilled students: {"name", "steps", ...}

    @property
    def geometry(self) -> Geometry:
        return self.transform.geometry

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.transform.event_shape

    def to(self, device) -> "Bundle":
        self.denoiser.to(device)
        self.transform.to(device)
        return self


def save_bundle(path: "str | Path", denoiser: Preconditioned, transform: Transform, config: Config, *,
                train_seed: int = 0, events_seen: int = 0, data: list[dict] | None = None,
                parent: str | None = None, sampler: dict | None = None, extra: dict | None = None) -> Path:
    """Write the bundle atomically (temporary file, then rename)."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {f"net.{k}": v.detach().float().cpu().contiguous() for k, v in denoiser.net.state_dict().items()}
    tensors.update({f"transform.{k}": torch.tensor(v, dtype=torch.float64) for k, v in transform.constants().items()})
    meta = {
        "format": FORMAT,
        "config": json.dumps(to_dict(config), sort_keys=True),
        "parameterisation": json.dumps(parameterisation_to_dict(denoiser.param)),
        "transform": json.dumps(transform.spec()),
        "geometry": _geometry_to_json(transform.geometry),
        "calofast_version": __version__,
        "git_commit": git_commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "train_seed": str(train_seed),
        "train_events_seen": str(events_seen),
        "data": json.dumps(data or []),
        "parent": parent or "",
        "sampler": json.dumps(sampler) if sampler else "",
        "tensors_sha256": _tensors_sha256(tensors),
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


SHIPPED = Path(__file__).parent / "models"


def shipped_models() -> list[str]:
    """Names of the bundles that ship inside the package (usable wherever a bundle path is)."""
    return sorted(p.stem for p in SHIPPED.glob("*.safetensors"))


def load_bundle(path: "str | Path", device: "str | torch.device" = "cpu") -> Bundle:
    """Rebuild denoiser and transform from the file alone; strict loading, integrity checked.

    `path` is a file, or the name of a shipped bundle (e.g. `ds2-teacher-ddpm400`)."""
    from safetensors import safe_open

    path = Path(path)
    shipped = SHIPPED / f"{path.name.removesuffix('.safetensors')}.safetensors"
    if not path.is_file() and len(path.parts) == 1 and shipped.is_file():
        path = shipped
    if not path.is_file():
        raise ValueError(f"{path}: no such model bundle (shipped: {', '.join(shipped_models())})")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers
        raise ValueError(f"{path}: not a readable safetensors bundle (truncated or corrupt: {err})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a calofast bundle (format {meta.get('format')!r}, expected {FORMAT!r})")
    if _tensors_sha256(tensors) != meta.get("tensors_sha256"):
        raise ValueError(f"{path}: tensor checksum mismatch: the weights were modified or damaged")
    try:
        config = from_dict(json.loads(meta["config"]))
        geometry = _geometry_from_json(meta["geometry"])
        param = parameterisation_from_dict(json.loads(meta["parameterisation"]))
        consts = {k[len("transform."):]: float(v) for k, v in tensors.items() if k.startswith("transform.")}
        transform = Transform.from_constants(geometry, json.loads(meta["transform"]), consts)
        net = build_network(config.network, geometry)
        net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
    except (KeyError, ValueError, RuntimeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: inconsistent bundle metadata or weights ({err})") from None
    denoiser = Preconditioned(net, param).eval().requires_grad_(False)
    sampler = json.loads(meta["sampler"]) if meta.get("sampler") else None
    return Bundle(denoiser, transform, config, meta, path, sampler).to(device)


def save_state(path: "str | Path", state: dict) -> None:
    """Resume state (weights, EMA, optimiser, step, RNG), written atomically with torch.save."""
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_state(path: "str | Path") -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
