"""Closed forms the solver is checked against (math.md §7). Independent of the discretisation.

* :func:`lqr_optimum`: discounted entropy-regularised scalar LQR (math.md §7.1);
* :func:`ou_moments` and :func:`ou_gap`: the one-state (bandit) Ornstein-Uhlenbeck flow (math.md §7.3).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LQROptimum:
    """``V*(s) = -P s^2 + c``, ``pi*(.|s) = N(-K s, Sigma)``, ``alpha = r~ + gamma P B^2``."""

    P: float
    K: float
    Sigma: float
    alpha: float
    c: float

    def value(self, s):
        return -self.P * s ** 2 + self.c

    def wpg_rate(self, dt: float | None = None) -> float:
        """Asymptotic WPG gap rate: ``4 alpha``, or ``2 log(1 + 2 alpha dt) / dt`` for implicit Euler."""
        return 4 * self.alpha if dt is None else 2 * math.log1p(2 * self.alpha * dt) / dt

    def as_dict(self) -> dict:
        return asdict(self)


def lqr_optimum(A: float, B: float, q: float, r: float, sigma: float, gamma: float, tau: float,
                reference_std: float | None = None) -> LQROptimum:
    """Closed-form optimum of math.md §7.1 (Lebesgue reference if ``reference_std`` is None, else Gaussian).

    >>> round(lqr_optimum(0.9, 0.5, 1.0, 0.5, 0.3, 0.9, 1.0).P, 10)
    1.702810101
    """
    r_eff = r if reference_std is None else r + tau / (2 * reference_std ** 2)
    c_mu = 0.0 if reference_std is None else -0.5 * tau * math.log(2 * math.pi * reference_std ** 2)
    b = r_eff * (1 - gamma * A ** 2) - gamma * q * B ** 2
    P = (-b + math.sqrt(b ** 2 + 4 * gamma * B ** 2 * q * r_eff)) / (2 * gamma * B ** 2)
    alpha = r_eff + gamma * P * B ** 2
    K = gamma * P * A * B / alpha
    Sigma = tau / (2 * alpha)
    c = (-gamma * P * sigma ** 2 + 0.5 * tau * math.log(2 * math.pi * Sigma) + c_mu) / (1 - gamma)
    return LQROptimum(P=P, K=K, Sigma=Sigma, alpha=alpha, c=c)


def ou_moments(t: float, k: float, center: float, tau: float, m0: float, v0: float) -> tuple[float, float]:
    """Mean and variance at ``t`` of ``d_t p = d_a(k (a - center) p) + tau d_a^2 p`` from ``N(m0, v0)``."""
    mean = center + (m0 - center) * math.exp(-k * t)
    var = tau / k + (v0 - tau / k) * math.exp(-2 * k * t)
    return mean, var


def ou_gap(mean: float, var: float, k: float, center: float, tau: float, gamma: float) -> float:
    """``J* - J`` for the bandit policy ``N(mean, var)``: ``tau/(1-gamma) KL(N(mean, var) || N(center, tau/k))``."""
    return (k * var + k * (mean - center) ** 2 - tau + tau * math.log(tau / (k * var))) / (2 * (1 - gamma))
