"""Shared test fixtures: a tiny 3 x 4 x 3 geometry as a binning XML and a small data file on it."""
from pathlib import Path

import numpy as np

from calofast.data import write_showers


def tiny_xml(folder: Path) -> Path:
    path = folder / "tiny.xml"
    if not path.exists():
        layers = "\n".join(f'<Layer id="{i}" r_edges="0,5,10,15" n_bin_alpha="4"/>' for i in range(3))
        path.write_text(f'<Bins><Bin pid="11" name="electron">\n{layers}\n</Bin></Bins>')
    return path


def tiny_data(folder: Path, n: int = 512, seed: int = 0) -> Path:
    """Toy showers on the tiny geometry: energy shared over layers/radii with a smooth mean profile."""
    path = folder / f"tiny_{n}_{seed}.h5"
    if not path.exists():
        rng = np.random.default_rng(seed)
        e = np.exp(rng.uniform(np.log(1e3), np.log(1e5), n))
        profile = np.outer(np.array([0.3, 0.5, 0.2]), np.array([0.7, 0.2, 0.1]))          # layers x radii
        frac = rng.dirichlet(np.repeat(profile[:, None, :], 4, axis=1).ravel() * 40, size=n)
        showers = frac * e[:, None] * rng.normal(1, 0.05, (n, 1))
        showers[rng.random(showers.shape) < 0.1] = 0
        write_showers(path, e, np.clip(showers, 0, None))
    return path


def awake_transformer(depth: int):
    """A small patch transformer on the tiny grid with random weights everywhere (adaLN-Zero would start it as
    the identity), in eval mode."""
    import torch
    from calofast.nn import Transformer3D
    torch.manual_seed(0)
    net = Transformer3D((3, 4, 3), (1, 2, 3), width=16, depth=depth, heads=2, emb_dim=16, cond_dim=1).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return net


def tiny_teacher(tmp: Path, *overrides: str) -> Path:
    """A tiny factorised model (preset tiny-factorised, `overrides` as --set) trained on `tiny_data(tmp)`."""
    from calofast.config import apply_overrides, get_preset
    from calofast.train import train_model
    cfg = apply_overrides(get_preset("tiny-factorised"), [f"geometry={tiny_xml(tmp)}", *overrides])
    return train_model(cfg, tiny_data(tmp), tmp / "run")
