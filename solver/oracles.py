"""Closed forms the solver is checked against (theory.md §7). Independent of the discretisation.

* :func:`lqr_optimum`: discounted entropy-regularised scalar LQR (theory.md §7.1);
* :func:`ou_moments` and :func:`ou_gap`: the one-state (bandit) Ornstein-Uhlenbeck flow (theory.md §7.3);
* :func:`lqr2_optimum`: scalar state, action in R^2 (derived like theory.md §7.1, see its docstring);
* :func:`ou2_moments` and :func:`ou2_gap`: the isotropic 2D Ornstein-Uhlenbeck bandit;
* :func:`lqr_state2_optimum`: state and action in R^2 (a discounted discrete algebraic Riccati equation).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import scipy.linalg


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
    """Closed-form optimum of theory.md §7.1 (Lebesgue reference if ``reference_std`` is None, else Gaussian).

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


@dataclass(frozen=True)
class LQR2Optimum:
    """``V*(s) = -P s^2 + c``, ``pi*(.|s) = N(-K s, Sigma)`` with ``K`` a 2-vector, ``alpha = R~ + gamma P b b^T``."""

    P: float
    K: np.ndarray
    Sigma: np.ndarray
    alpha: np.ndarray
    c: float

    def value(self, s):
        return -self.P * s ** 2 + self.c

    def mean(self, s):
        """Policy mean ``-K s``: ``(..., 2)`` for states ``s`` of shape ``(...)``."""
        return -np.multiply.outer(s, self.K)

    def wpg_rate(self, dt: float | None = None) -> float:
        """Asymptotic WPG gap rate ``4 lambda_min(alpha)``; ``2 log(1 + 2 lambda_min dt) / dt`` for implicit Euler.

        The Gibbs policy has precision ``2 alpha / tau``; its slowest mean mode relaxes at ``2 lambda_min(alpha)``
        and ``J* - J`` is quadratic in it (theory.md §7.2, per eigendirection of ``alpha``).
        """
        lam = float(np.linalg.eigvalsh(self.alpha)[0])
        return 4 * lam if dt is None else 2 * math.log1p(2 * lam * dt) / dt

    def as_dict(self) -> dict:
        return {"P": self.P, "K": self.K.tolist(), "Sigma": self.Sigma.tolist(), "alpha": self.alpha.tolist(),
                "c": self.c}


def lqr2_optimum(A: float, B, q: float, r, sigma: float, gamma: float, tau: float,
                 reference_std: float | None = None) -> LQR2Optimum:
    """Closed-form optimum for ``s' = A s + b . a + sigma xi``, ``r = -(q s^2 + a^T R a)``, ``a`` in R^2.

    Derivation (as theory.md §7.1, ansatz ``V*(s) = -P s^2 + c``)::

        Q*(s, a) = -q s^2 - a^T R~ a - gamma P (A s + b.a)^2 - gamma P sigma^2 + gamma c + c_mu
                 = -a^T alpha a - 2 gamma P A s b.a + (terms without a),     alpha = R~ + gamma P b b^T,

    so the Gibbs policy is ``N(-K s, Sigma)`` with ``K = gamma P A alpha^{-1} b`` and ``Sigma = (tau/2) alpha^{-1}``;
    ``tau log int exp(Q*/tau) da = max_a Q* + (tau/2) log det(2 pi Sigma)`` gives the Riccati equation
    ``P = q + gamma A^2 P - (gamma A P)^2 b^T alpha^{-1} b`` and
    ``c = (-gamma P sigma^2 + (tau/2) log det(2 pi Sigma) + c_mu) / (1 - gamma)``. With the Gaussian reference
    ``N(0, std^2 I)``: ``R~ = R + tau/(2 std^2) I``, ``c_mu = -(tau d / 2) log(2 pi std^2)``, ``d = 2``; else
    ``R~ = R``, ``c_mu = 0``. Sherman-Morrison, ``b^T alpha^{-1} b = beta / (1 + gamma P beta)`` with
    ``beta = b^T R~^{-1} b``, turns the Riccati equation into the quadratic
    ``gamma beta P^2 + (1 - gamma A^2 - gamma q beta) P - q = 0``, whose root ``P >= 0`` is taken in the
    cancellation-free form. (For ``b = (B, 0)`` this is theory.md §7.1 with ``r~``.)

    Args:
        A: scalar state coefficient.
        B: ``b``, a 2-vector.
        q: state cost ``>= 0``.
        r: action cost ``R``: a number (``r I``), a 2-vector (diagonal) or a symmetric positive 2x2 matrix.
        sigma: noise standard deviation.
        gamma: discount factor.
        tau: temperature.
        reference_std: None for the Lebesgue reference, else ``std`` of the Gaussian reference.

    Raises:
        ValueError: if no stabilising solution ``P >= 0`` exists (``beta = 0`` and ``gamma A^2 >= 1``).
    """
    b = np.asarray(B, dtype=float).reshape(2)
    R = np.asarray(r, dtype=float)
    R = R * np.eye(2) if R.ndim < 2 else R
    R_eff = R if reference_std is None else R + tau / (2 * reference_std ** 2) * np.eye(2)
    c_mu = 0.0 if reference_std is None else -tau * math.log(2 * math.pi * reference_std ** 2)
    beta = float(b @ np.linalg.solve(R_eff, b))
    lin = 1 - gamma * A ** 2 - gamma * q * beta
    root = math.sqrt(lin ** 2 + 4 * gamma * beta * q)
    if lin > 0:
        P = 2 * q / (lin + root)
    elif beta > 0:
        P = (root - lin) / (2 * gamma * beta)
    else:
        raise ValueError(f"no stabilising solution: b = 0 and gamma A^2 = {gamma * A ** 2} >= 1")
    alpha = R_eff + gamma * P * np.outer(b, b)
    K = gamma * P * A * np.linalg.solve(alpha, b)
    Sigma = 0.5 * tau * np.linalg.inv(alpha)
    c = (-gamma * P * sigma ** 2 + 0.5 * tau * math.log(np.linalg.det(2 * math.pi * Sigma)) + c_mu) / (1 - gamma)
    return LQR2Optimum(P=P, K=K, Sigma=Sigma, alpha=alpha, c=c)


def ou2_moments(t: float, k: float, center, tau: float, m0, v0) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(2,)`` and covariance ``(2, 2)`` at ``t`` of the isotropic 2D OU flow from ``N(m0, v0)``.

    ``d_t p = div(k (a - center) p) + tau Lap p``: ``m' = -k (m - center)``, ``V' = -2 k V + 2 tau I``, so
    ``m(t) = center + (m0 - center) e^{-kt}`` and ``V(t) = (tau/k) I + (v0 - (tau/k) I) e^{-2kt}``
    (``v0`` a number means ``v0 I``). With the Gaussian reference ``N(0, std^2 I)`` pass
    ``k~ = k + tau/std^2`` and ``center~ = k center / k~`` (theory.md §7.3).
    """
    c = np.asarray(center, dtype=float)
    mean = c + (np.asarray(m0, dtype=float) - c) * math.exp(-k * t)
    v0 = np.asarray(v0, dtype=float) * (np.eye(2) if np.ndim(v0) == 0 else 1.0)
    cov = tau / k * np.eye(2) + (v0 - tau / k * np.eye(2)) * math.exp(-2 * k * t)
    return mean, cov


def ou2_gap(mean, cov, k: float, center, tau: float, gamma: float) -> float:
    """``J* - J = tau/(1-gamma) KL(N(mean, cov) || N(center, (tau/k) I))`` for the 2D bandit (d = 2)."""
    d = np.asarray(mean, dtype=float) - np.asarray(center, dtype=float)
    cov = np.asarray(cov, dtype=float)
    kl_tau = k * np.trace(cov) + k * d @ d - 2 * tau + tau * math.log(tau ** 2 / (k ** 2 * np.linalg.det(cov)))
    return float(kl_tau / (2 * (1 - gamma)))


@dataclass(frozen=True)
class LQRState2Optimum:
    """``V*(s) = -s^T P s + c``, ``pi*(.|s) = N(-K s, Sigma)`` for ``s`` in R^2; ``alpha = R~ + gamma B^T P B``."""

    P: np.ndarray
    K: np.ndarray
    Sigma: np.ndarray
    alpha: np.ndarray
    c: float

    def value(self, s):
        """``V*`` at states ``s`` of shape ``(..., 2)``."""
        s = np.asarray(s, dtype=float)
        return -np.einsum("...i,ij,...j->...", s, self.P, s) + self.c

    def mean(self, s):
        """Policy mean ``-K s``: ``(..., 2)`` for states ``s`` of shape ``(..., 2)``."""
        return -np.asarray(s, dtype=float) @ self.K.T

    wpg_rate = LQR2Optimum.wpg_rate  # the same per-state Gibbs precision 2 alpha / tau

    def as_dict(self) -> dict:
        return {"P": self.P.tolist(), "K": self.K.tolist(), "Sigma": self.Sigma.tolist(),
                "alpha": self.alpha.tolist(), "c": self.c}


def lqr_state2_optimum(A, B, q: float, r, sigma: float, gamma: float, tau: float,
                       reference_std: float | None = None) -> LQRState2Optimum:
    """Closed-form optimum for ``s' = A s + B a + sigma xi``, ``r = -(q |s|^2 + a^T R a)``, ``s, a`` in R^2.

    Derivation (as :func:`lqr2_optimum`, ansatz ``V*(s) = -s^T P s + c``)::

        Q*(s, a) = -a^T alpha a - 2 gamma s^T A^T P B a + (terms without a),    alpha = R~ + gamma B^T P B,

    so ``pi*(.|s) = N(-K s, Sigma)`` with ``K = gamma alpha^{-1} B^T P A``, ``Sigma = (tau/2) alpha^{-1}``, and
    ``P = q I + gamma A^T P A - gamma^2 A^T P B alpha^{-1} B^T P A``: the discrete algebraic Riccati equation of
    ``(sqrt(gamma) A, sqrt(gamma) B, q I, R~)``, solved by :func:`scipy.linalg.solve_discrete_are`. The
    isotropic noise contributes ``sigma^2 tr P``: ``c = (-gamma sigma^2 tr P + (tau/2) log det(2 pi Sigma) + c_mu)
    / (1 - gamma)``; ``R~`` and ``c_mu`` as in :func:`lqr2_optimum`. For diagonal ``A``, ``B`` and ``R`` the
    problem splits into two scalar ones: ``V* = V*_1(s_1) + V*_2(s_2)`` (theory.md §7.1 per axis).

    Args:
        A: a number (``A I``) or a 2x2 matrix.
        B: a 2x2 matrix.
        q: state cost ``>= 0``.
        r: action cost, a number (``r I``) or a 2-vector (diagonal).
        sigma, gamma, tau, reference_std: as :func:`lqr2_optimum`.

    Raises:
        ValueError: if the Riccati equation has no stabilising solution.
    """
    A = np.asarray(A, dtype=float) * (np.eye(2) if np.ndim(A) == 0 else 1.0)
    B = np.asarray(B, dtype=float).reshape(2, 2)
    R = np.diag(np.asarray(r, dtype=float) * np.ones(2))
    R_eff = R if reference_std is None else R + tau / (2 * reference_std ** 2) * np.eye(2)
    c_mu = 0.0 if reference_std is None else -tau * math.log(2 * math.pi * reference_std ** 2)
    root_gamma = math.sqrt(gamma)
    try:
        P = scipy.linalg.solve_discrete_are(root_gamma * A, root_gamma * B, q * np.eye(2), R_eff)
    except (ValueError, np.linalg.LinAlgError) as err:
        raise ValueError(f"no stabilising solution of the discounted Riccati equation: {err}") from None
    P = 0.5 * (P + P.T)
    alpha = R_eff + gamma * B.T @ P @ B
    K = gamma * np.linalg.solve(alpha, B.T @ P @ A)
    Sigma = 0.5 * tau * np.linalg.inv(alpha)
    c = (-gamma * sigma ** 2 * np.trace(P) + 0.5 * tau * math.log(np.linalg.det(2 * math.pi * Sigma)) + c_mu) \
        / (1 - gamma)
    return LQRState2Optimum(P=P, K=K, Sigma=Sigma, alpha=alpha, c=float(c))


def lqr_closed_form(params: dict, gamma: float, tau: float,
                    reference_std: float | None = None) -> LQROptimum | LQR2Optimum | LQRState2Optimum:
    """The closed form for the ``lqr`` model's ``[mdp.params]`` (defaults of :func:`solver.models.lqr`).

    ``B`` a number: :func:`lqr_optimum` (needs ``r`` a number); ``B`` a 2-vector: :func:`lqr2_optimum`; ``B`` 2x2
    (2D state): :func:`lqr_state2_optimum`. All results have ``value(s)``, ``wpg_rate(dt)`` and ``as_dict()``.
    """
    p = {"A": 0.9, "B": 0.5, "q": 1.0, "r": 0.5, "sigma": 0.3} | dict(params)
    shape = np.shape(p["B"])
    if shape == ():
        return lqr_optimum(**{k: float(v) for k, v in p.items()}, gamma=gamma, tau=tau, reference_std=reference_std)
    if shape == (2,):
        return lqr2_optimum(float(p["A"]), p["B"], float(p["q"]), p["r"], float(p["sigma"]), gamma, tau, reference_std)
    return lqr_state2_optimum(p["A"], p["B"], float(p["q"]), p["r"], float(p["sigma"]), gamma, tau, reference_std)
