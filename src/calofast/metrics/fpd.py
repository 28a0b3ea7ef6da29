"""Frechet and kernel physics distances (Kansal et al., arXiv:2211.10295) as the CaloChallenge calls
them (jetnet 0.2.5 defaults with fpd(min_samples=10000), kpd(batch_size=10000); spec section 7).

Both normalise every feature of X (reference) and Y (generated) by max|X| of that feature.
FPD: for 10 batch sizes N equally spaced in 1/N between 1/10000 and 1/50000, the mean Frechet distance
of 20 bootstrap draws (with replacement, numpy default_rng(42)); FD(N) = FPD_inf + b/N fitted with both
parameters >= 0; FPD = intercept, error = its fitted standard deviation.
KPD: 10 batches of 10000 rows (rng 42 + 1000 i), unbiased MMD^2 with the kernel (x.y/d + 1)^4;
median, error = half the 16.275-83.725 percentile spread.
"""
from __future__ import annotations

import logging

import numpy as np
from scipy import linalg
from scipy.optimize import curve_fit

__all__ = ["normalise_features", "frechet_distance", "fpd", "mmd2_unbiased", "kpd"]

log = logging.getLogger("calofast.metrics")


def normalise_features(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.max(np.abs(x), axis=0)
    scale = np.where(scale == 0, 1.0, scale)
    return x / scale, y / scale


def frechet_distance(mu1, c1, mu2, c2, eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)); eps I added if the square root is not finite."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(c1 @ c2)
    if not np.isfinite(covmean).all():
        offset = np.eye(c1.shape[0]) * eps
        covmean = linalg.sqrtm((c1 + offset) @ (c2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            log.warning("Frechet distance: imaginary component %.3g", np.max(np.abs(covmean.imag)))
        covmean = covmean.real
    return float(diff @ diff + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


def _mean_cov(a, device):
    """Mean and covariance (ddof 1) of the rows of a; on a torch device in float64 when one is given."""
    if device is None:
        return a.mean(0), np.cov(a, rowvar=False)
    import torch
    t = torch.as_tensor(a, dtype=torch.float64, device=device)
    mu = t.mean(0)
    c = t - mu
    return mu.cpu().numpy(), (c.T @ c / (len(t) - 1)).cpu().numpy()


def fpd(x: np.ndarray, y: np.ndarray, min_samples: int = 10_000, max_samples: int = 50_000,
        num_batches: int = 20, num_points: int = 10, seed: int = 42, normalise: bool = True,
        device: str | None = None, progress: bool = False) -> tuple[float, float]:
    """(FPD, error) extrapolated to infinite sample size. `device`: compute covariances with torch there."""
    from tqdm import tqdm
    if normalise:
        x, y = normalise_features(x, y)
    bar = tqdm(total=num_points * num_batches, desc="FPD bootstrap", disable=not progress)
    rng = np.random.default_rng(seed)
    sizes = (1 / np.linspace(1 / min_samples, 1 / max_samples, num_points)).astype(np.int64)
    means = []
    for n in sizes:
        vals = []
        for _ in range(num_batches):
            a = x[rng.choice(len(x), size=n)]
            b = y[rng.choice(len(y), size=n)]
            vals.append(frechet_distance(*_mean_cov(a, device), *_mean_cov(b, device)))
            bar.update()
        means.append(np.mean(vals))
    bar.close()
    params, cov = curve_fit(lambda inv_n, c, m: c + m * inv_n, 1 / sizes, means, bounds=([0, 0], [np.inf, np.inf]))
    return float(params[0]), float(np.sqrt(np.diag(cov)[0]))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 4, device: str | None = None) -> float:
    """Unbiased MMD^2 with the polynomial kernel (x.y / d + 1)^degree (torch float64 on `device` if given)."""
    if device is not None:
        import torch
        x, y = (torch.as_tensor(v, dtype=torch.float64, device=device) for v in (x, y))
        trace = torch.trace
    else:
        trace = np.trace
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** degree
    kyy = (y @ y.T / d + 1) ** degree
    kxy = (x @ y.T / d + 1) ** degree
    m, n = len(x), len(y)
    return float((kxx.sum() - trace(kxx)) / (m * (m - 1)) + (kyy.sum() - trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kpd(x: np.ndarray, y: np.ndarray, num_batches: int = 10, batch_size: int = 10_000, seed: int = 42,
        normalise: bool = True, device: str | None = None, progress: bool = False) -> tuple[float, float]:
    """(KPD, error): median over bootstrap batches and half the 68 % spread."""
    from tqdm import tqdm
    if normalise:
        x, y = normalise_features(x, y)
    vals = []
    for i in tqdm(range(num_batches), desc="KPD bootstrap", disable=not progress):
        rng = np.random.default_rng(seed + 1000 * i)
        a = x[rng.choice(len(x), size=batch_size)]
        b = y[rng.choice(len(y), size=batch_size)]
        vals.append(mmd2_unbiased(a, b, device=device))
    vals = np.array(vals)
    return float(np.median(vals)), float((np.percentile(vals, 83.725) - np.percentile(vals, 16.275)) / 2)
