"""The command line's argument checks: each refuses a bad value in one line naming the option (ValueError), before
any work is done."""
from __future__ import annotations

import argparse
import os

__all__ = ["MAX_SHOWERS"]

MAX_SHOWERS = 10**9       # a billion DS2 showers are 26 TB of float32: any larger --n is a typo


def _positive(**values) -> None:
    """Refuse counts below 1, naming the option: --batch-size 0 must not 'succeed' writing nothing."""
    for name, v in values.items():
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} {v}: must be at least 1")


def _showers(n: int | None, option: str = "--n") -> None:
    _positive(n=n)
    if n is not None and n > MAX_SHOWERS:
        raise ValueError(f"{option} {n}: more than the {MAX_SHOWERS:.0e} showers one run may write (shard larger runs)")


def _cpus(option: str, value: int | None) -> None:
    """A process or thread count beyond the machine's CPU threads is a typo (torch crashes on 100,000 threads,
    exit 139; a pool of 100,000 workers never starts)."""
    if value and value > (os.cpu_count() or 1):
        raise ValueError(f"{option} {value}: this machine has {os.cpu_count()} CPU threads")


def _seed(seed: int) -> int:
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"--seed {seed}: must be in [0, 2^63)")
    return seed


def _device(text: str) -> str:
    import torch
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text}: not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {text}: no such CUDA device on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text}: only cpu and cuda are supported")
    return text


def _geometry(text: str):
    from .geometry import get_geometry
    return get_geometry(text)


def _spectrum(text: str):
    """--energies parsed, its errors naming the option (an empty value is an error, not the default)."""
    from .energies import parse_spectrum
    try:
        return parse_spectrum(text)
    except ValueError as e:
        raise ValueError(f"--energies {text!r}: {e}") from None


def _energies(a: argparse.Namespace, bundle):
    import numpy as np
    from .data import read_energies
    if a.energies_from:
        if a.n is None:
            from .data import inspect_file
            _showers(inspect_file(a.energies_from).n_events, f"--energies-from {a.energies_from}: its event count")
        energies = read_energies(a.energies_from, stop=a.n)
        if a.n is not None and len(energies) < a.n:
            raise ValueError(f"--n {a.n}: {a.energies_from} holds only {len(energies)} events (drop --n to use "
                             "them all)")
        return energies
    if a.n is None:
        raise ValueError("--n is required unless --energies-from gives the events")
    if a.energies is not None:
        return _spectrum(a.energies).sample(a.seed, range(a.n))
    lo, hi = bundle.transform.energy_range
    return np.exp(np.log(lo) + np.random.default_rng(a.seed).random(a.n) * np.log(hi / lo))


def _shard(text: str | None) -> tuple[int, int] | None:
    """--shard K/N, or 'torchrun' (K, N from RANK and WORLD_SIZE)."""
    if not text:
        return None
    if text == "torchrun":
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError("--shard torchrun: RANK and WORLD_SIZE are not set (start with torchrun)")
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
        raise ValueError(f"--shard {text}: expected K/N with 0 <= K < N, or torchrun")
    return int(k), int(n)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _model_side(bundle, a: argparse.Namespace):
    """The bundle with --deep-cache and --tome applied (its main stage), or unchanged."""
    from .tome import model_side
    return model_side(bundle, a.deep_cache, a.tome)


def _energy_stage(bundle, a: argparse.Namespace) -> None:
    if a.energy_sampler and len(bundle.stages) < 2:
        raise ValueError(f"--energy-sampler: {a.model} has one stage and no energy stage to sample")


def _graph_ok(wanted: bool, device: str) -> bool:
    if wanted and not str(device).startswith("cuda"):
        raise ValueError(f"--cuda-graph needs --device cuda (got {device})")
    return wanted
