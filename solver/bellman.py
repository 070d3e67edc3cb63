"""Soft policy evaluation and soft Bellman optimality on the discretised MDP (math.md §2).

Policies are densities w.r.t. Lebesgue measure at the action DOFs, ``p: (N, M)`` with
``sum_j w_j p_ij = 1``; their masses are ``m_ij = w_j p_ij``. Convention ``0 log 0 = 0``.

* :func:`evaluate`: ``(I - gamma P^pi) V = r^pi`` (one sparse LU), ``Q = R + gamma T V``.
* :func:`gibbs`: ``G_ij = mu_j exp(Q_ij / tau) / Z_i`` by log-sum-exp (no overflow for small ``tau``).
* :func:`soft_bellman`: ``(T V)_i = tau log sum_j w_j mu_j exp((R_ij + gamma (T V)_ij) / tau)``.
* :func:`soft_policy_iteration`: ``p <- G^{pi}`` until ``V`` stops moving (Newton's method for
  ``V = T V``; monotone, converges quadratically near ``pi*``).

Exact discrete identities, used as tests: ``T V^pi - V^pi = tau KL(p || G^pi)`` per state, and the soft
performance-difference lemma.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .mdp import MDP


@dataclass
class Evaluation:
    """Soft policy evaluation of one policy.

    Attributes:
        V: ``(N,)`` soft value ``V^pi``.
        Q: ``(N, M)`` soft state-action value ``Q^pi``.
        lu: sparse LU of ``I - gamma P^pi``, reused for the adjoint (occupancy/resolvent) solves.
    """

    V: np.ndarray
    Q: np.ndarray
    lu: "ResolventLU"

    def resolvent_adjoint(self, rho: np.ndarray) -> np.ndarray:
        """``x = (I - gamma P^pi)^{-T} rho``, so that ``rho^T (I - gamma P^pi)^{-1} D = x . D``.

        ``(1 - gamma) x`` is the discounted occupancy ``d^pi_rho`` (math.md §2).
        """
        return self.lu.solve(rho, trans="T")


#: Below this many states ``I - gamma P^pi`` is factorised densely (LAPACK beats SuperLU's overhead).
DENSE_STATES = 1500


class ResolventLU:
    """LU factorisation of ``I - gamma P^pi`` with ``solve(b, trans="N" | "T")``; dense or sparse by size."""

    def __init__(self, P: sp.csr_matrix, gamma: float):
        n = P.shape[0]
        if n <= DENSE_STATES:
            self._dense = sla.lu_factor(np.eye(n) - gamma * P.toarray(), check_finite=False)
        else:
            self._dense = None
            self._sparse = spla.splu(sp.identity(n, format="csc") - gamma * P.tocsc())

    def solve(self, b: np.ndarray, trans: str = "N") -> np.ndarray:
        if self._dense is not None:
            return sla.lu_solve(self._dense, b, trans=0 if trans == "N" else 1, check_finite=False)
        return self._sparse.solve(b, trans=trans)


def evaluate(mdp: MDP, p: np.ndarray, partition=None) -> Evaluation:
    """Soft policy evaluation: ``V^pi`` from ``(I - gamma P^pi) V = r^pi`` and ``Q^pi = R + gamma T V^pi``.

    With a :class:`solver.parallel.Partition` (MPI over states) each rank computes ``r^pi``, ``P^pi`` and
    ``Q`` on its own rows and gathers them; the LU and the solve for ``V`` are replicated on every rank.
    """
    rows = slice(None) if partition is None else partition.rows
    local = p[rows]
    masses = local * mdp.weights
    r_pi = np.einsum("ij,ij->i", masses, mdp.reward[rows]) - mdp.tau * kl_divergence(mdp, local, mdp.log_mu)
    if partition is None:
        lu = ResolventLU(mdp.kernel.policy_matrix(masses), mdp.gamma)
        V = lu.solve(r_pi)
        return Evaluation(V=V, Q=q_values(mdp, V), lu=lu)
    lu = ResolventLU(partition.gather_csr(mdp.kernel.policy_matrix(masses, rows)), mdp.gamma)
    V = lu.solve(partition.gather(r_pi))
    Q = partition.gather(mdp.reward[rows] + mdp.gamma * mdp.kernel.expect(V, rows))
    return Evaluation(V=V, Q=Q, lu=lu)


def q_values(mdp: MDP, V: np.ndarray) -> np.ndarray:
    """``Q_ij = R_ij + gamma sum_k T_ijk V_k``."""
    return mdp.reward + mdp.gamma * mdp.kernel.expect(V)


def log_gibbs(mdp: MDP, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-density of the discrete Gibbs policy and ``tau log Z``.

    Returns:
        ``(log G, tau log Z)`` with ``log G_ij = log mu_j + Q_ij / tau - log Z_i``, ``(N, M)`` and ``(N,)``;
        ``tau log Z`` is the soft Bellman operator applied to the ``V`` that produced ``Q``.
    """
    logits = Q / mdp.tau + mdp.log_mu
    shift = logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits - shift) @ mdp.weights)[:, None] + shift
    return logits - log_z, mdp.tau * log_z[:, 0]


def gibbs(mdp: MDP, Q: np.ndarray) -> np.ndarray:
    """Discrete Gibbs policy ``G_ij = mu_j exp(Q_ij / tau) / Z_i`` (density, ``(N, M)``)."""
    return np.exp(log_gibbs(mdp, Q)[0])


def soft_bellman(mdp: MDP, V: np.ndarray) -> np.ndarray:
    """Soft Bellman operator ``(T V)_i = tau log sum_j w_j mu_j exp(Q_ij / tau)``, ``Q = R + gamma T V``."""
    return log_gibbs(mdp, q_values(mdp, V))[1]


def kl_divergence(mdp: MDP, p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """``KL_i(p || q) = sum_j w_j p_ij log(p_ij / q_ij)`` per state, ``0 log 0 = 0``."""
    positive = p > 0
    log_p = np.log(np.where(positive, p, 1.0))
    integrand = np.multiply(p, log_p - log_q, out=np.zeros(p.shape), where=positive)
    return integrand @ mdp.weights


def uniform_policy(mdp: MDP) -> np.ndarray:
    """``p_ij = 1 / |A|``."""
    return np.full((mdp.n_states, mdp.n_actions), 1.0 / mdp.space.volume)


@dataclass
class Optimum:
    """``V*``, ``Q*``, ``pi*`` of the discrete problem, and the number of SPI iterations used."""

    V: np.ndarray
    Q: np.ndarray
    p: np.ndarray
    iterations: int
    residual: float


class ConvergenceError(RuntimeError):
    """Soft policy iteration did not reach its tolerance."""


def soft_policy_iteration(mdp: MDP, p0: np.ndarray | None = None, tol: float = 1e-12,
                          max_iter: int = 200) -> Optimum:
    """Soft policy iteration ``p_{k+1} = G^{pi_k}`` (math.md §2), from ``p0`` (default: uniform).

    Stops when ``||V_{k+1} - V_k||_inf <= tol * max(1, ||V_k||_inf)``. Monotone: ``V_{k+1} >= V_k``.
    ``residual`` is ``||T V* - V*||_inf``.
    """
    p = uniform_policy(mdp) if p0 is None else p0
    ev = evaluate(mdp, p)
    for k in range(1, max_iter + 1):
        p = gibbs(mdp, ev.Q)
        new = evaluate(mdp, p)
        change = np.max(np.abs(new.V - ev.V))
        ev = new
        if not np.isfinite(change):
            raise ConvergenceError("soft policy iteration produced non-finite values")
        if change <= tol * max(1.0, np.max(np.abs(ev.V))):
            residual = float(np.max(np.abs(soft_bellman(mdp, ev.V) - ev.V)))
            return Optimum(V=ev.V, Q=ev.Q, p=gibbs(mdp, ev.Q), iterations=k, residual=residual)
    raise ConvergenceError(f"soft policy iteration did not converge in {max_iter} iterations")
