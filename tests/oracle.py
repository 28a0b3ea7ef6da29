"""The analytic Gaussian oracle of spec `samplers.md` section 9: data x0 ~ N(mu, s^2 I)."""
import math

import torch


class GaussianDenoiser:
    """Ideal denoiser D*(x, sigma) = mu + s^2/(s^2 + sigma^2) (x - mu) (a Denoiser; counts nothing)."""

    def __init__(self, mu: float = 0.3, s: float = 0.7, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.mu, self.s = mu, s
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, s

    def __call__(self, x, sigma, cond):
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return self.mu + self.s ** 2 / (self.s ** 2 + sig ** 2) * (x - self.mu)

    def ode(self, x_a, sigma_a: float, sigma: float):
        """Exact probability-flow ODE solution from sigma_a to sigma."""
        return self.mu + (x_a - self.mu) * math.sqrt(self.s ** 2 + sigma ** 2) / math.sqrt(self.s ** 2 + sigma_a ** 2)

    def consistency(self, x, sigma, cond):
        """Exact consistency function f*(x, sigma) = ODE solution at sigma_min."""
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return self.mu + (x - self.mu) * math.sqrt(self.s ** 2 + self.sigma_min ** 2) / torch.sqrt(self.s ** 2 + sig ** 2)
