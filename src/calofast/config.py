"""Typed configuration: frozen dataclasses are the only defaults; presets are named Python values.

`Config` nests `NetworkConfig`, `TransformConfig`, `DiffusionConfig`, `TrainConfig` and `DistillConfig` for
the main stage (the showers, or the shape of a factorised model) and, for factorised models
(`transform.kind = "layer"`), a `StageConfig` for the energy stage.
`apply_overrides(cfg, ["train.lr=2e-4", ...])` parses each value to the field's annotated type and
raises on unknown keys; `to_dict` / `from_dict` round-trip through JSON.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, replace
from typing import Literal

__all__ = ["NetworkConfig", "TransformConfig", "DiffusionConfig", "TrainConfig", "DistillConfig", "StageConfig", "Config",
           "PRESETS", "get_preset", "apply_overrides", "check_config", "to_dict", "from_dict"]


@dataclass(frozen=True)
class NetworkConfig:
    arch: Literal["unet", "transformer", "mlp"] = "unet"
    channels: tuple[int, ...] = (32, 64, 128)      # U-Net: channels per level
    blocks: int = 1                                 # U-Net: residual blocks per level
    attention_levels: tuple[int, ...] = (2,)        # U-Net: levels with self-attention
    heads: int = 4
    emb_dim: int = 128
    dropout: float = 0.0
    patch: tuple[int, int, int] = (3, 4, 3)         # transformer: cells per token (L, A, R)
    width: int = 192                                # transformer: token width; mlp: residual width
    depth: int = 6                                  # transformer, mlp: blocks
    layer_cond: bool = False                        # transformer: per-token embedding of its layers' energies
    mlp_hidden: int = 0                             # transformer: MLP hidden width per block (0: 4 x width; pruning sets it)


@dataclass(frozen=True)
class TransformConfig:
    kind: Literal["log1p", "logit", "layer"] = "log1p"   # layer: factorised energy/shape model (two stages)
    scale_mev: float = 0.0                          # log1p scale; 0 = the geometry's voxel threshold
    alpha: float = 1e-6                             # logit regulariser
    standardise: Literal["global", "voxel"] = "global"   # one mean/std for all voxels, or one per voxel
    dequantise: bool = False                        # layer: empty voxels spread below the threshold in training


@dataclass(frozen=True)
class DiffusionConfig:
    param: Literal["eps", "v", "x0", "edm", "flow"] = "v"
    schedule: Literal["cosine", "linear"] = "cosine"   # discrete VP table (eps, v, x0)
    timesteps: int = 400                                # T of the discrete table
    sigma_data: float = 0.0                             # EDM: 0 = measure from the preprocessed data
    p_mean: float = -1.2                                # edm, flow: ln sigma ~ N(p_mean, p_std^2) in training
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0


@dataclass(frozen=True)
class TrainConfig:
    showers: int = 1_000_000             # training length, counted in showers seen
    batch_size: int = 256                # global batch (split over ranks)
    lr: float = 2e-4
    lr_min_ratio: float = 0.05           # cosine decay to lr * lr_min_ratio
    warmup_showers: int = 20_000
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_halflife_showers: int = 50_000   # EMA half-life (EDM style), ramped up early in training
    ema_rampup: float = 0.05
    bf16: bool = True                    # autocast on CUDA
    compile: bool = False                # torch.compile the network
    seed: int = 0
    checkpoint_showers: int = 100_000    # write resume state + bundle every this many showers
    log_showers: int = 10_000
    max_events: int = 0                  # use at most this many training showers (0 = all)
    max_seconds: float = 0.0             # stop cleanly (resumable) after this wall time (0 = no limit)
    budget_seconds: float = 0.0          # training length in seconds of training time, if reached before showers
    bundle_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"   # weights in the written bundle (fp16: half the size)


@dataclass(frozen=True)
class DistillConfig:
    method: Literal["progressive", "consistency", "shortcut"] = "progressive"
    start_steps: int = 128               # progressive: teacher grid of the first stage (student halves it)
    to_steps: int = 1                    # progressive: final student steps
    showers_per_stage: int = 500_000     # progressive: training length of each halving
    cm_showers: int = 2_000_000          # consistency: training length
    lr: float = 1e-4                     # learning rate of both methods (optimiser reset per PD stage)
    rho: float = 7.0                     # Karras grid exponent
    sigma_max: float = 0.0               # 0 = teacher's, capped at 160 sigma_data
    cm_steps: int = 40                   # consistency: Karras grid points N
    cm_ema: float = 0.95                 # consistency: target EMA decay mu
    cm_loss: Literal["l2", "pseudo_huber"] = "pseudo_huber"
    cm_sampler_steps: tuple[int, ...] = (1, 2)
    sc_showers: int = 2_000_000          # shortcut: training length
    sc_max_steps: int = 128              # shortcut: smallest trained jump t_max / sc_max_steps (a power of two)
    sc_fraction: float = 0.25            # shortcut: share of each batch on the self-consistency loss
    sc_steps: int = 2                    # shortcut: the steps the student bundle runs by default (any later)
    sc_energy_steps: int = 0             # shortcut: > 0 also trains a factorised energy stage, run with these steps
    sc_teacher_fraction: float = 0.0     # shortcut: teacher-ODE pairs appended to each batch, as a share of it
    sc_teacher_levels: int = 3           # shortcut: jumps t_max / 2^j, j < this, also learnt from those trajectories
    sc_teacher_steps: int = 32           # shortcut: Heun steps of a teacher trajectory (Karras grid + level points)
    sc_loss: Literal["shortcut", "meanflow"] = "shortcut"   # shortcut: self-consistency, or MeanFlow's identity
    mf_ratio: float = 0.25               # meanflow: share of each batch with r < t (the rest flow matching, r = t)
    mf_p: float = 1.0                    # meanflow: adaptive weight 1 / (|err|^2 + 1e-3)^p per event (0: plain)
    mf_eps: float = 2e-3                 # meanflow: finite-difference step in t of the total derivative (<= h / 2)
    dmd_weight: float = 0.0              # shortcut: weight of the distribution-matching term (distill/dmd.py; 0 = off)
    dmd_fraction: float = 0.25           # dmd: share of each batch whose conditions the student makes showers for
    dmd_jumps: tuple[int, ...] = (1, 2)  # dmd: the student's step counts whose showers are matched
    dmd_updates: int = 2                 # dmd: critic (fake-score) optimiser steps per student step
    dmd_lr: float = 0.0                  # dmd: the critic's learning rate (0 = distill.lr)
    dmd_warmup: int = 300                # dmd: student steps over which the term ramps up from 0 (the critic learns)


_FLOW = DiffusionConfig(param="flow", p_mean=0.0, p_std=1.0, sigma_max=160.0)


@dataclass(frozen=True)
class StageConfig:
    """The energy stage of a factorised model: layer energies [B, L] given E_inc (cheap: an MLP)."""

    network: NetworkConfig = field(default_factory=lambda: NetworkConfig(arch="mlp", width=256, depth=4, emb_dim=128))
    diffusion: DiffusionConfig = field(default_factory=lambda: _FLOW)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        showers=20_000_000, batch_size=4096, lr=1e-3, warmup_showers=400_000, ema_halflife_showers=1_000_000,
        checkpoint_showers=5_000_000, log_showers=500_000))
    sampler: str = "heun"                # the stage's default sampler and steps (63 NFE: cheap next to the shape)
    steps: int = 32


@dataclass(frozen=True)
class Config:
    geometry: str = "ds2"
    network: NetworkConfig = field(default_factory=NetworkConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    energy: StageConfig = field(default_factory=StageConfig)

    def stage(self, name: str) -> tuple[NetworkConfig, DiffusionConfig, TrainConfig]:
        """(network, diffusion, train) of a stage: the energy stage's from `energy`, the main stage's from here."""
        if name == "energy":
            return self.energy.network, self.energy.diffusion, self.energy.train
        return self.network, self.diffusion, self.train


_TINY_TRAIN = TrainConfig(showers=2_000, batch_size=32, lr=2e-3, warmup_showers=200, ema_halflife_showers=1_000,
                          checkpoint_showers=1_000, log_showers=500)
_TINY_ENERGY = StageConfig(NetworkConfig(arch="mlp", width=32, depth=2, emb_dim=32), _FLOW,
                           replace(_TINY_TRAIN, batch_size=64), "heun", 4)
# The factorised DS2 recipe (issue 12): MLP energy stage, DiT shape stage over (3, 16, 1) patches (15 x 9 = 135
# tokens of 48 voxels: one radial ring over three layers, as CaloDREAM), per-token layer energies, flow matching.
_DS2_SHAPE = NetworkConfig(arch="transformer", patch=(3, 16, 1), width=256, depth=8, heads=4, emb_dim=128,
                           layer_cond=True)

PRESETS: dict[str, Config] = {
    # Smoke runs on CPU: a ~70k-parameter U-Net, trains in under a minute.
    "tiny": Config(network=NetworkConfig(channels=(4, 8, 16), attention_levels=(2,), heads=2, emb_dim=32),
                   train=_TINY_TRAIN),
    "tiny-transformer": Config(network=NetworkConfig(arch="transformer", width=32, depth=2, heads=2, emb_dim=32),
                               train=_TINY_TRAIN),
    "tiny-factorised": Config(network=NetworkConfig(arch="transformer", patch=(1, 4, 1), width=32, depth=2, heads=2,
                                                    emb_dim=32, layer_cond=True),
                              transform=TransformConfig(kind="layer", standardise="voxel"), diffusion=_FLOW,
                              train=_TINY_TRAIN, energy=_TINY_ENERGY),
    # The first shipped DS2 teacher: 400-step DDPM cosine schedule, v-prediction, lean U-Net.
    "ds2-unet": Config(network=NetworkConfig(channels=(16, 32, 64), blocks=1, attention_levels=(2,))),
    "ds2-edm": Config(network=NetworkConfig(channels=(16, 32, 64)), diffusion=DiffusionConfig(param="edm")),
    "ds2-transformer": Config(network=NetworkConfig(arch="transformer", patch=(3, 4, 3), width=256, depth=8,
                                                    heads=8, emb_dim=256)),
    "ds2-factorised": Config(network=_DS2_SHAPE, transform=TransformConfig(kind="layer", standardise="voxel"),
                             diffusion=_FLOW,
                             train=TrainConfig(showers=10_000_000, batch_size=1024, lr=5e-4, warmup_showers=500_000,
                                               ema_halflife_showers=500_000, checkpoint_showers=2_000_000,
                                               log_showers=200_000)),
    "ds3-unet": Config(geometry="ds3", network=NetworkConfig(channels=(16, 32, 64), attention_levels=(2,)),
                       train=TrainConfig(batch_size=64)),
    # The DS2 recipe on DS3 (issue 16), not trained yet: (3, 10, 3) patches = 15 x 5 x 6 = 450 tokens of 90 voxels
    # (three radial bins per token), 8.1 M parameters, ~9 GFLOP per forward; 300,000 encoded showers take 49 GB.
    "ds3-factorised": Config(geometry="ds3", network=replace(_DS2_SHAPE, patch=(3, 10, 3)),
                             transform=TransformConfig(kind="layer", standardise="voxel"), diffusion=_FLOW,
                             train=TrainConfig(showers=10_000_000, batch_size=256, lr=5e-4, warmup_showers=200_000,
                                               ema_halflife_showers=500_000, checkpoint_showers=1_000_000,
                                               log_showers=100_000)),
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def _parse(value: str, typ, key: str):
    origin = typing.get_origin(typ)
    if origin is Literal:
        allowed = typing.get_args(typ)
        if value not in allowed:
            raise ValueError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is tuple:
        args = typing.get_args(typ)
        items = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        elem = args[0]
        if len(args) != 2 or args[1] is not Ellipsis:
            if len(items) != len(args):
                raise ValueError(f"{key}: expected {len(args)} comma-separated values, got {value!r}")
        return tuple(_parse(v.strip(), elem, key) for v in items)
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    try:
        if typ is int:
            number = float(value.replace("_", ""))
            if number != int(number):
                raise ValueError
            return int(number)
        if typ is float:
            return float(value)
    except ValueError:
        raise ValueError(f"{key}: cannot read {value!r} as {typ.__name__}") from None
    return value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.field=value` overrides (or `geometry=ds3`); unknown keys raise ValueError."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        cfg = _set(cfg, parts, value.strip(), key)
    check_config(cfg)
    return cfg


# (section.field, test, what it must be): values that would train nothing, or garbage, are refused up front.
MAX_TRAIN_SHOWERS = 10**12          # a training length beyond this (~300 GPU-days at 40,000 showers/s) is a typo
_LENGTH = (lambda v: 1 <= v <= MAX_TRAIN_SHOWERS, f"between 1 and {MAX_TRAIN_SHOWERS:.0e}")
_RULES = [
    ("batch_size", lambda v: 1 <= v <= 2**20, "between 1 and 1,048,576"), ("showers", *_LENGTH),
    ("checkpoint_showers", lambda v: v >= 1, "at least 1"), ("log_showers", lambda v: v >= 1, "at least 1"),
    ("lr", lambda v: math.isfinite(v) and v >= 0, "finite and >= 0"),
    ("grad_clip", lambda v: math.isfinite(v) and v >= 0, "finite and >= 0"),
    ("weight_decay", lambda v: math.isfinite(v) and v >= 0, "finite and >= 0"),
    ("budget_seconds", lambda v: math.isfinite(v) and v >= 0, "finite and >= 0"),
    ("max_seconds", lambda v: math.isfinite(v) and v >= 0, "finite and >= 0"),
    ("warmup_showers", lambda v: v >= 0, ">= 0"), ("ema_halflife_showers", lambda v: v >= 1, "at least 1"),
    ("heads", lambda v: 1 <= v <= 256, "in 1..256"), ("width", lambda v: 1 <= v <= 16384, "in 1..16384"),
    ("depth", lambda v: 1 <= v <= 256, "in 1..256"), ("emb_dim", lambda v: 1 <= v <= 16384, "in 1..16384"),
    ("mlp_hidden", lambda v: 0 <= v <= 65536, "in 0..65536 (0: 4 x width)"),
    ("blocks", lambda v: 1 <= v <= 64, "in 1..64"),
    ("channels", lambda v: 1 <= len(v) <= 16 and all(1 <= c <= 4096 for c in v), "1-16 levels of 1..4096"),
    ("patch", lambda v: all(p >= 1 for p in v), "at least 1 in each direction"),
    ("timesteps", lambda v: 2 <= v <= 100_000, "between 2 and 100,000"),
    ("sigma_min", lambda v: math.isfinite(v) and v > 0, "finite and > 0"),
    ("sigma_max", lambda v: math.isfinite(v) and v > 0, "finite and > 0"),
    ("p_std", lambda v: math.isfinite(v) and v > 0, "finite and > 0"),
    ("p_mean", math.isfinite, "finite"), ("alpha", lambda v: 0 < v < 0.5, "in (0, 0.5)"),
]


_DISTILL_RULES = [
    ("sc_showers", *_LENGTH), ("showers_per_stage", *_LENGTH), ("cm_showers", *_LENGTH),
    ("sc_steps", lambda v: v >= 1, "at least 1"),
    ("sc_energy_steps", lambda v: v >= 0, ">= 0"), ("sc_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
    ("sc_max_steps", lambda v: v >= 1 and not v & (v - 1), "a power of two"),
    ("sc_teacher_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"), ("sc_teacher_levels", lambda v: 1 <= v <= 6, "in 1..6"),
    ("sc_teacher_steps", lambda v: v >= 2, "at least 2"),
    ("mf_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"), ("mf_p", lambda v: math.isfinite(v) and v >= 0, "finite and >= 0"),
    ("mf_eps", lambda v: 0 < v <= 0.01, "in (0, 0.01]"),
    ("dmd_weight", lambda v: math.isfinite(v) and v >= 0, "finite and >= 0"),
    ("dmd_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("dmd_jumps", lambda v: 1 <= len(v) <= 8 and all(1 <= k <= 64 for k in v), "1-8 step counts of 1..64"),
    ("dmd_updates", lambda v: 1 <= v <= 16, "in 1..16"),
    ("dmd_lr", lambda v: math.isfinite(v) and v >= 0, "finite and >= 0"), ("dmd_warmup", lambda v: v >= 0, ">= 0"),
    ("lr", lambda v: math.isfinite(v) and v >= 0, "finite and >= 0"),
]


def check_config(cfg: "Config") -> None:
    """One clear error for the first out-of-range value (key named as in --set)."""
    for name, ok, what in _DISTILL_RULES:
        if not ok(getattr(cfg.distill, name)):
            raise ValueError(f"distill.{name}={getattr(cfg.distill, name)}: must be {what}")
    sections = {"train": cfg.train, "network": cfg.network, "diffusion": cfg.diffusion, "transform": cfg.transform,
                "energy.train": cfg.energy.train, "energy.network": cfg.energy.network,
                "energy.diffusion": cfg.energy.diffusion}
    for prefix, section in sections.items():
        for name, ok, what in _RULES:
            if hasattr(section, name) and not ok(getattr(section, name)):
                raise ValueError(f"{prefix}.{name}={getattr(section, name)}: must be {what}")
        if isinstance(section, DiffusionConfig) and section.sigma_max <= section.sigma_min:
            raise ValueError(f"{prefix}.sigma_max must exceed {prefix}.sigma_min")
        if isinstance(section, TransformConfig) and section.dequantise and section.kind != "layer":
            raise ValueError(f"{prefix}.dequantise needs {prefix}.kind=layer (it acts on layer-normalised voxels)")
        if isinstance(section, NetworkConfig) and section.arch == "transformer" and section.width % section.heads:
            raise ValueError(f"{prefix}.width={section.width} must be a multiple of {prefix}.heads={section.heads}")


def _set(obj, parts: list[str], value: str, key: str):
    hints = typing.get_type_hints(type(obj))
    name = parts[0]
    if name not in hints:
        raise ValueError(f"unknown config key {key!r} (no field {name!r} in {type(obj).__name__}; "
                         f"fields: {', '.join(hints)})")
    if len(parts) == 1:
        if dataclasses.is_dataclass(hints[name]):
            raise ValueError(f"{key!r} is a section; set one of its fields")
        return replace(obj, **{name: _parse(value, hints[name], key)})
    sub = getattr(obj, name)
    if not dataclasses.is_dataclass(sub):
        raise ValueError(f"unknown config key {key!r}")
    return replace(obj, **{name: _set(sub, parts[1:], value, key)})


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _typed(value, typ, key: str):
    """`value` (from JSON) as a field of type `typ`, or a ValueError naming the key: a file's config is data."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    if origin is typing.Literal:
        ok = value in args
    elif origin is tuple:
        ok = isinstance(value, list) and all(is_int(v) for v in value) and (
            len(args) == 2 and args[1] is Ellipsis or len(value) == len(args))
        value = tuple(value) if ok else value
    elif typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = is_int(value)
    elif typ is float:
        ok = (is_int(value) or isinstance(value, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, typ)
    if not ok:
        raise ValueError(f"config key {key!r}: {value!r} is not a valid {getattr(typ, '__name__', typ)}")
    return value


def from_dict(d: dict, cls=Config, prefix: str = ""):
    """Rebuild a config from `to_dict` output; unknown keys and values of the wrong type raise (the file is from
    another version, or edited)."""
    if not isinstance(d, dict):
        raise ValueError(f"config{' section ' + prefix.rstrip('.') if prefix else ''}: expected an object, got "
                         f"{type(d).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        if key not in hints:
            raise ValueError(f"unknown config key {key!r} for {cls.__name__}")
        typ = hints[key]
        kwargs[key] = from_dict(value, typ, f"{prefix}{key}.") if dataclasses.is_dataclass(typ) else \
            _typed(value, typ, prefix + key)
    return cls(**kwargs)


def dumps(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)
