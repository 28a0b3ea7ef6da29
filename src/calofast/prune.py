"""Structural pruning of a transformer stage by Taylor importance (Diff-Pruning, Fang et al. 2023, arXiv:2305.10924;
importance as Molchanov et al. 2019): the hidden channels of every block's MLP, two thirds of a block's weights
and FLOPs at the usual 4 x width.

Gradients of the stage's own denoising loss (its training distribution of noise levels, so the informative
noise levels weigh as in training) are accumulated over `batches` batches of training showers; the importance
of hidden channel j of a block is the first-order Taylor estimate of the loss change when the channel is
removed, sum |theta * dL/dtheta| over its parameters (the row of the first linear layer with its bias, the
column of the second). Every block keeps its `keep` most important channels (the same count in every block,
so the pruned network is the config's `network.mlp_hidden`) and the pruned bundle is an ordinary bundle:
sample it, benchmark it, export it, and fine-tune it with `calofast train --init PRUNED` (Diff-Pruning's
short fine-tuning restores most of what pruning costs).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from .checkpoint import Bundle, save_bundle
from .diffusion import denoising_loss
from .nn.transformer import Transformer3D

__all__ = ["mlp_importance", "prune_mlp", "prune_bundle", "check_keep"]


def mlp_importance(denoiser: nn.Module, x0: torch.Tensor, cond: torch.Tensor, batches: int, batch_size: int,
                   seed: int = 0, loss_data=None) -> list[torch.Tensor]:
    """Taylor importance [hidden] of every block's MLP channels of the stage's transformer, from the gradients
    of its denoising loss accumulated over `batches` random batches of (x0, cond). `loss_data(x, c, g)` maps a
    batch's codes to the loss's (the transform's training noise; identity by default)."""
    net = denoiser.net
    if not isinstance(net, Transformer3D):
        raise ValueError(f"pruning needs a transformer stage (this one is a {type(net).__name__})")
    g = torch.Generator(device=x0.device).manual_seed(seed)
    params = list(denoiser.parameters())
    saved = [p.requires_grad for p in params]
    denoiser.train().requires_grad_(True)
    denoiser.zero_grad(set_to_none=True)
    for _ in range(batches):
        idx = torch.randint(0, len(x0), (min(batch_size, len(x0)),), generator=g, device=x0.device)
        x, c = x0[idx], cond[idx]
        if loss_data is not None:
            x = loss_data(x, c, g)
        denoising_loss(denoiser, denoiser.param, x, c, g).backward()
    scores = []
    for block in net.blocks:
        fc1, fc2 = block.mlp[0], block.mlp[2]
        s = (fc1.weight * fc1.weight.grad).abs().sum(1) + (fc1.bias * fc1.bias.grad).abs() + \
            (fc2.weight * fc2.weight.grad).abs().sum(0)
        scores.append(s.detach())
    denoiser.zero_grad(set_to_none=True)
    for p, r in zip(params, saved):
        p.requires_grad_(r)
    denoiser.eval()
    return scores


def prune_mlp(net: Transformer3D, scores: list[torch.Tensor], keep: int) -> Transformer3D:
    """The same network with each block's MLP cut to its `keep` most important hidden channels, in place."""
    for block, s in zip(net.blocks, scores):
        fc1, act, fc2 = block.mlp
        idx = torch.sort(torch.topk(s, keep).indices).values
        new1 = nn.Linear(fc1.in_features, keep).to(fc1.weight)
        new2 = nn.Linear(keep, fc2.out_features).to(fc2.weight)
        with torch.no_grad():
            new1.weight.copy_(fc1.weight[idx])
            new1.bias.copy_(fc1.bias[idx])
            new2.weight.copy_(fc2.weight[:, idx])
            new2.bias.copy_(fc2.bias)
        block.mlp = nn.Sequential(new1, act, new2)
    return net


def check_keep(keep: float) -> None:
    if not 0 < keep <= 1:
        raise ValueError(f"--keep {keep}: the share of MLP channels kept must be in (0, 1]")


def prune_bundle(bundle: Bundle, data_path: "str | Path", output: "str | Path", keep: float, *, batches: int = 32,
                 batch_size: int = 256, max_events: int = 20_000, seed: int = 0) -> Path:
    """Prune the main stage's MLP channels to the share `keep` (Taylor importance on `data_path`), write the
    pruned bundle (same weights dtype, its config's `network.mlp_hidden` set), return its path."""
    from .train import load_training_data
    check_keep(keep)
    den = bundle.stages[-1].denoiser
    net = den.net
    if not isinstance(net, Transformer3D):
        raise ValueError(f"pruning needs a transformer main stage (this one is a {type(net).__name__})")
    hidden = net.blocks[0].mlp[0].out_features
    n_keep = max(1, round(keep * hidden))
    device = next(den.parameters()).device
    x0, cond = load_training_data(data_path, bundle.transform, max_events, device)[-1]
    on_device = bundle.transform.to(device)
    scores = mlp_importance(den, x0, cond, batches, batch_size, seed, on_device.dequantised)
    prune_mlp(net, scores, n_keep)
    config = dataclasses.replace(bundle.config, network=dataclasses.replace(bundle.config.network, mlp_hidden=n_keep))
    return save_bundle(output, bundle.stages, bundle.transform, config, train_seed=int(bundle.meta.get("train_seed", 0)),
                       events_seen=int(bundle.meta.get("train_events_seen", 0)), parent=bundle.meta["tensors_sha256"],
                       extra={"pruned": f"MLP channels {hidden} -> {n_keep} per block (Taylor importance, {batches} "
                              f"batches of {batch_size})", "preset": bundle.meta.get("preset", "")},
                       weights_dtype=bundle.meta.get("weights_dtype", "fp32"))
