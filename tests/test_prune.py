"""Structural pruning: keeping every channel changes nothing, the Taylor importance finds channels that do nothing
(pruning them leaves the network's output as it was), and the CLI writes an ordinary, smaller bundle that samples
and trains on; bad options are refused in one line before any work."""
import pytest
import torch

from calofast.checkpoint import load_bundle
from calofast.cli import main
from calofast.config import apply_overrides, get_preset
from calofast.diffusion import Flow, Preconditioned
from calofast.generate import sample_batch
from calofast.prune import mlp_importance, prune_mlp
from calofast.train import train_model

from helpers import awake_transformer, tiny_data, tiny_xml


def _denoiser():
    return Preconditioned(awake_transformer(3), Flow())


def _batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 3, 4, 3, generator=g), torch.rand(n, 1, generator=g)


def test_keeping_every_channel_changes_nothing_and_dead_channels_are_pruned_first():
    den = _denoiser()
    x0, cond = _batch()
    sigma = torch.full((len(x0),), 0.7)
    with torch.no_grad():
        before = den(x0, sigma, cond)
    scores = mlp_importance(den, x0, cond, batches=2, batch_size=32)
    hidden = den.net.blocks[0].mlp[0].out_features
    assert [s.shape for s in scores] == [(hidden,)] * 3 and all((s > 0).all() for s in scores)
    prune_mlp(den.net, scores, hidden)
    with torch.no_grad():
        torch.testing.assert_close(den(x0, sigma, cond), before, rtol=1e-6, atol=1e-6)
    # Half of every block's channels made dead (no input, no output): importance 0, pruned first, output unchanged.
    den = _denoiser()
    dead = torch.arange(0, hidden, 2)
    with torch.no_grad():
        for block in den.net.blocks:
            block.mlp[0].weight[dead] = 0
            block.mlp[0].bias[dead] = 0
            block.mlp[2].weight[:, dead] = 0
        before = den(x0, sigma, cond)
    scores = mlp_importance(den, x0, cond, batches=2, batch_size=32)
    assert all(torch.equal(s[dead], torch.zeros(len(dead))) for s in scores)
    prune_mlp(den.net, scores, hidden // 2)
    assert den.net.blocks[0].mlp[0].out_features == hidden // 2
    with torch.no_grad():
        torch.testing.assert_close(den(x0, sigma, cond), before, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in den.parameters())


@pytest.fixture(scope="module")
def factorised(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prune")
    cfg = apply_overrides(get_preset("tiny-factorised"), [f"geometry={tiny_xml(tmp)}", "train.bundle_dtype=fp16"])
    return train_model(cfg, tiny_data(tmp), tmp / "run"), tmp


def test_cli_prune_writes_a_smaller_bundle_that_samples_and_trains(factorised, tmp_path, capsys):
    path, tmp = factorised
    data = str(tiny_data(tmp))
    out = tmp_path / "pruned.safetensors"
    assert main(["prune", "--model", str(path), "--data", data, "--keep", "0.5", "--batches", "2",
                 "--batch-size", "32", "-o", str(out)]) == 0
    assert "parameters" in capsys.readouterr().out
    a, b = load_bundle(path), load_bundle(out)
    width = a.config.network.width
    assert b.config.network.mlp_hidden == 2 * width and b.meta["weights_dtype"] == "fp16" and "pruned" in b.meta
    assert b.meta["parent"] == a.meta["tensors_sha256"]
    assert sum(p.numel() for p in b.denoiser.parameters()) < sum(p.numel() for p in a.denoiser.parameters())
    for va, vb in zip(a.stages[0].denoiser.state_dict().values(), b.stages[0].denoiser.state_dict().values()):
        assert torch.equal(va, vb)                                   # the energy stage is untouched
    e = torch.tensor([2e3, 4e4], dtype=torch.float64)
    showers, nfe, clipped = sample_batch(b, e, 3, range(2), sampler="euler", steps=2)
    assert torch.isfinite(showers).all() and not clipped.any()
    assert main(["train", "--data", data, "--init", str(out), "--stages", "shape", "--set", "train.showers=64",
                 "-o", str(tmp_path / "ft")]) == 0
    assert load_bundle(tmp_path / "ft/model.safetensors").config.network.mlp_hidden == 2 * width
    capsys.readouterr()
    for args, msg in ((["--keep", "0"], "--keep 0.0"), (["--keep", "0.5", "--batches", "0"], "--batches 0"),
                      (["--keep", "0.5"], "exists already")):
        assert main(["prune", "--model", str(path), "--data", data, *args, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err
