"""The CaloChallenge classifier test (`evaluate.py`, spec `calochallenge.md` section 6), seeded.

A DNN (Linear(d, 2048), LeakyReLU, 2 x [Linear(2048, 2048), LeakyReLU], Linear(2048, 1); dropout 0;
float64) separates generated (label 0) from reference (label 1) showers. Each class is shuffled and
cut into train/test/val (60/20/20 %, the official 60k/20k/20k for DS2/DS3 at 100k events); Adam
(lr 2e-4), batch 1000, 50 epochs, BCE with logits; after every epoch the test accuracy decides the kept
checkpoint (stop early at accuracy 1). Isotonic regression fitted on the test outputs calibrates the
val outputs; reported: AUC of the calibrated val probabilities and JSD = (ln 2 - BCE) / ln 2.
ROC AUC and isotonic regression (pool adjacent violators) are implemented here.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .features import apply_threshold

__all__ = ["ClassifierConfig", "FULL", "FAST", "low_level_inputs", "classifier_test", "roc_auc", "IsotonicCalibrator",
           "energy_groups", "group_names"]


@dataclass(frozen=True)
class ClassifierConfig:
    hidden: int = 2048
    layers: int = 2               # hidden-to-hidden layers after the first
    lr: float = 2e-4
    batch_size: int = 1000
    epochs: int = 50
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    dtype: str = "float64"
    seed: int = 0


FULL = ClassifierConfig()
FAST = ClassifierConfig(hidden=256, epochs=10, lr=1e-3)   # smoke runs only: not comparable to published numbers


def low_level_inputs(showers: np.ndarray, energies: np.ndarray, threshold: float) -> np.ndarray:
    """`cls-low`: [log10 E_inc, E_v / E_inc] of thresholded showers."""
    s = apply_threshold(showers, threshold)
    e = np.asarray(energies, np.float64).reshape(-1, 1)
    return np.concatenate([np.log10(e), s / e], axis=1)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + P(tie)/2 (Mann-Whitney, average ranks)."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores)[order]
    ranks = np.empty(len(s))
    # Average rank over tied scores.
    bounds = np.flatnonzero(np.diff(s)) + 1
    starts, ends = np.concatenate([[0], bounds]), np.concatenate([bounds, [len(s)]])
    for a, b in zip(starts, ends):
        ranks[a:b] = 0.5 * (a + b - 1) + 1
    r = np.empty(len(s))
    r[order] = ranks
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both classes")
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class IsotonicCalibrator:
    """Increasing isotonic regression (PAV) with y clipped to [y_min, y_max], interpolating and
    clipping outside the fitted range (scikit-learn's out_of_bounds='clip')."""

    def __init__(self, y_min: float = 1e-6, y_max: float = 1 - 1e-6):
        self.y_min, self.y_max = y_min, y_max

    def fit(self, x: np.ndarray, y: np.ndarray) -> "IsotonicCalibrator":
        order = np.argsort(x, kind="mergesort")
        x, y = np.asarray(x, np.float64)[order], np.asarray(y, np.float64)[order]
        ux, inv = np.unique(x, return_inverse=True)
        w = np.bincount(inv).astype(np.float64)
        v = np.bincount(inv, weights=y) / w
        # Pool adjacent violators on the tie-aggregated points.
        vals, wts, sizes = [], [], []
        for vi, wi in zip(v, w):
            vals.append(vi)
            wts.append(wi)
            sizes.append(1)
            while len(vals) > 1 and vals[-2] > vals[-1]:
                wsum = wts[-2] + wts[-1]
                vals[-2] = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / wsum
                wts[-2] = wsum
                sizes[-2] += sizes[-1]
                vals.pop(), wts.pop(), sizes.pop()
        self.x_ = ux
        self.y_ = np.clip(np.repeat(vals, sizes), self.y_min, self.y_max)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(x, np.float64), self.x_, self.y_)


def _net(d: int, cfg: ClassifierConfig) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d, cfg.hidden), nn.LeakyReLU()]
    for _ in range(cfg.layers):
        layers += [nn.Linear(cfg.hidden, cfg.hidden), nn.LeakyReLU()]
    return nn.Sequential(*layers, nn.Linear(cfg.hidden, 1))


def _split(n: int, frac: tuple[float, float, float], rng: np.random.Generator) -> list[np.ndarray]:
    idx = rng.permutation(n)
    a = int(round(frac[0] * n))
    b = a + int(round(frac[1] * n))
    return [idx[:a], idx[a:b], idx[b:]]


def energy_groups(energies: np.ndarray) -> np.ndarray:
    """Incident energies [N] (MeV) -> the index of their decade from 1 GeV (0: 1-10 GeV, ...), clipped to >= 0."""
    return np.clip(np.floor(np.log10(np.asarray(energies, np.float64).reshape(-1) / 1e3)), 0, None).astype(np.int64)


def group_names(groups: np.ndarray) -> dict[int, str]:
    """Decade indices of `energy_groups` -> labels such as '1-10 GeV'."""
    return {int(g): f"{10 ** int(g):g}-{10 ** (int(g) + 1):g} GeV" for g in np.unique(groups)}


def classifier_test(x_gen: np.ndarray, x_ref: np.ndarray, cfg: ClassifierConfig = FULL,
                    device: "str | torch.device | None" = None, progress: bool = False, name: str = "",
                    groups: "tuple[np.ndarray, np.ndarray] | None" = None) -> dict:
    """Train the protocol classifier on generated (0) vs reference (1) inputs; AUC and JSD on val.

    `groups` (one integer label per event of each class, e.g. `energy_groups` of the incident energies) adds
    `auc_by_group`: the calibrated val AUC within each label (the classifier is the one trained on all events)."""
    from tqdm import tqdm

    if x_gen.shape[1] != x_ref.shape[1]:
        raise ValueError("generated and reference inputs differ in dimension")
    if min(len(x_gen), len(x_ref)) < 50:
        raise ValueError("the classifier test needs at least 50 events per class")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, cfg.dtype)
    if groups is not None and (len(groups[0]) != len(x_gen) or len(groups[1]) != len(x_ref)):
        raise ValueError("groups need one label per event of each class")
    rng = np.random.default_rng(cfg.seed)
    parts = {}                   # indices only: each part's rows are gathered once, straight onto the device
    for label, x in ((0, x_gen), (1, x_ref)):
        g = np.zeros(len(x), np.int64) if groups is None else np.asarray(groups[label], np.int64)
        for part, idx in zip(("train", "test", "val"), _split(len(x), cfg.split, rng)):
            parts.setdefault(part, []).append((x, idx, g[idx]))
    data, val_groups = {}, None
    for part, chunks in parts.items():   # row i of a part: row perm[i] of [generated rows; reference rows]
        perm = rng.permutation(sum(len(c[1]) for c in chunks))
        label = np.concatenate([np.full(len(c[1]), k) for k, c in enumerate(chunks)])[perm]   # 0 generated, 1 reference
        rows = np.concatenate([c[1] for c in chunks])[perm]
        x = torch.empty((len(perm), x_gen.shape[1]), dtype=dtype, device=device)
        for k, c in enumerate(chunks):    # one class at a time: a class's share of the part is the largest copy
            at = np.flatnonzero(label == k)
            x[torch.as_tensor(at, device=device)] = torch.as_tensor(c[0][rows[at]], dtype=dtype, device=device)
        data[part] = (x, torch.as_tensor(label, dtype=dtype, device=device))
        if part == "val":
            val_groups = np.concatenate([c[2] for c in chunks])[perm]
    torch.manual_seed(cfg.seed)
    net = _net(x_gen.shape[1], cfg).to(device=device, dtype=dtype)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([net(x[i:i + 10_000]).reshape(-1) for i in range(0, len(x), 10_000)])

    best_acc, best_state, epochs_run = -1.0, None, 0
    x_tr, y_tr = data["train"]
    for _ in tqdm(range(cfg.epochs), desc=f"classifier {name}".strip(), disable=not progress):
        net.train()
        perm = torch.randperm(len(x_tr), generator=gen).to(device)
        for i in range(0, len(x_tr), cfg.batch_size):
            b = perm[i:i + cfg.batch_size]
            loss = loss_fn(net(x_tr[b]).reshape(-1), y_tr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epochs_run += 1
        net.eval()
        acc = float(((predict(data["test"][0]) > 0).to(dtype) == data["test"][1]).to(torch.float64).mean())
        if acc > best_acc:
            best_acc, best_state = acc, copy.deepcopy(net.state_dict())
        if acc >= 1.0:
            break
    net.load_state_dict(best_state)
    net.eval()
    p_test = torch.sigmoid(predict(data["test"][0])).double().cpu().numpy()
    p_val = torch.sigmoid(predict(data["val"][0])).double().cpu().numpy()
    y_test, y_val = data["test"][1].double().cpu().numpy(), data["val"][1].double().cpu().numpy()
    calibrated = IsotonicCalibrator().fit(p_test, y_test).predict(p_val)

    def jsd(p: np.ndarray) -> float:
        p = np.clip(p, 1e-15, 1 - 1e-15)
        bce = -np.mean(y_val * np.log(p) + (1 - y_val) * np.log(1 - p))
        return float((math.log(2) - bce) / math.log(2))

    result = {"auc": roc_auc(y_val, calibrated), "jsd": jsd(calibrated),
              "auc_uncalibrated": roc_auc(y_val, p_val), "jsd_uncalibrated": jsd(p_val),
              "best_test_accuracy": best_acc, "epochs_run": epochs_run,
              "n_train": int(len(x_tr)), "n_val": int(len(y_val)), "config": asdict(cfg), "device": str(device)}
    if groups is not None:
        by_group = {}
        for g in np.unique(val_groups):
            m = val_groups == g
            if 0 < y_val[m].sum() < m.sum():            # both classes present
                by_group[str(int(g))] = {"auc": roc_auc(y_val[m], calibrated[m]), "n_val": int(m.sum())}
        result["auc_by_group"] = by_group
    return result
