"""Comparison flows (math.md §6): the Fisher-Rao flow (continuous-time policy mirror descent) and soft policy
iteration, as generators of :class:`solver.flows.FlowState` like :func:`solver.flows.wasserstein_flow`.

**Fisher-Rao.** For every state, ``d_t log(p / mu) = Q^{pi_t} - tau log(p / mu) - V^{pi_t}``, i.e.
``d_t p = p A^{pi_t}`` with the soft advantage ``A = Q - tau log(p / mu) - V`` (``sum_j w_j p_j A_j = 0``
exactly, so mass is conserved). The exponential ("implicit-in-log") step with ``Q`` frozen over the step is

    p_{n+1} ∝ p_n^{1/(1 + tau dt)} (mu exp(Q^{pi_n} / tau))^{tau dt / (1 + tau dt)},

computed in log space as ``log p_{n+1} = (log p_n + dt Q + tau dt log mu) / (1 + tau dt) - log Z`` with a
log-sum-exp normalisation ``Z = sum_j w_j exp(.)``: no ``exp(Q / tau)`` is ever formed, so small ``tau``
cannot overflow. Mass, positivity and the fixed point ``pi*`` are exact for every ``dt``; ``V^{pi_n}`` is
non-decreasing at every state (the step moves along the geometric path towards ``G^{pi_n}``, math.md §6,
lemma 4 of §2). The predicted ``dJ/dt = rho^T (I - gamma P^pi)^{-1} sum_j w_j p A^2`` (exact for the
semi-discrete ODE, by the performance-difference lemma); asymptotic gap rate ``2 tau``, and
``2 log(1 + tau dt) / dt`` for the exponential step.

**Soft policy iteration** ``p_{k+1} = G^{pi_k}`` (math.md §2) as a flow with one iteration per unit of
"time": ``dt = 1`` and ``t = k``. It is monotone and converges superlinearly (quadratically near ``pi*``),
so it has no linear rate and no ``dJ/dt``.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from . import bellman, flows
from .flows import FlowState
from .mdp import MDP


def fisher_rao_log_step(mdp: MDP, log_p: np.ndarray, Q: np.ndarray, dt: float) -> np.ndarray:
    """One exponential Fisher-Rao step in log space (math.md §6).

    Args:
        log_p: ``(N, M)`` log-density at ``t_n`` (``-inf`` where the density is zero).
        Q: ``(N, M)`` ``Q^{pi_n}``, frozen over the step.
        dt: step size.

    Returns:
        ``(N, M)`` normalised log-density at ``t_n + dt`` (``sum_j w_j exp(log p_j) = 1``).
    """
    a = mdp.tau * dt
    x = (log_p + dt * Q + a * mdp.log_mu) / (1.0 + a)
    shift = x.max(axis=1, keepdims=True)
    return x - (np.log(np.exp(x - shift) @ mdp.weights)[:, None] + shift)


def fisher_rao_dissipation(mdp: MDP, p: np.ndarray, evaluation: bellman.Evaluation) -> np.ndarray:
    """Statewise Fisher-Rao dissipation ``D(s) = sum_j w_j p_sj A_sj^2`` (``(N,)``, ``0 A^2 = 0`` where ``p = 0``).

    ``A = Q - tau log(p / mu) - V`` is the soft advantage of ``p``; ``dJ/dt = rho^T (I - gamma P^pi)^{-1} D``.
    """
    positive = p > 0
    log_p = np.log(np.where(positive, p, 1.0))
    advantage = evaluation.Q - mdp.tau * (log_p - mdp.log_mu) - evaluation.V[:, None]
    integrand = np.multiply(p, advantage ** 2, out=np.zeros(p.shape), where=positive)
    return integrand @ mdp.weights


def fisher_rao_rate(tau: float, dt: float | None = None) -> float:
    """Asymptotic Fisher-Rao gap rate: ``2 tau``, or ``2 log(1 + tau dt) / dt`` for the exponential step."""
    return 2.0 * tau if dt is None else 2.0 * math.log1p(tau * dt) / dt


def fisher_rao_flow(mdp: MDP, p0: np.ndarray, dt: float, t_end: float = math.inf) -> Iterator[FlowState]:
    """Yield the exponential-step Fisher-Rao flow ``p^0, p^1, ...`` from ``p0`` (forever, or until ``t_end``).

    The log-density is carried from step to step, so parts of the policy that underflow to zero in ``p`` keep
    their (finite) log and can recover.

    Raises:
        solver.flows.NumericalError: if a step produces non-finite values.
    """
    with np.errstate(divide="ignore"):  # log 0 = -inf stays -inf: the Fisher-Rao flow keeps zeros
        log_p = np.log(p0)
    p, t, n = p0, 0.0, 0
    ev = flows._evaluate_checked(mdp, p, n, t)
    yield FlowState(step=0, t=0.0, dt=0.0, p=p, evaluation=ev, g=flows.potential(mdp, ev.Q))
    while t < t_end * (1 - 1e-12):
        t_new = min((n + 1) * dt, t_end)  # lands on t = n dt exactly
        log_p = fisher_rao_log_step(mdp, log_p, ev.Q, t_new - t)
        p = np.exp(log_p)
        h, t, n = t_new - t, t_new, n + 1
        ev = flows._evaluate_checked(mdp, p, n, t)
        yield FlowState(step=n, t=t, dt=h, p=p, evaluation=ev, g=flows.potential(mdp, ev.Q))


def policy_iteration_flow(mdp: MDP, p0: np.ndarray, t_end: float = math.inf) -> Iterator[FlowState]:
    """Yield soft policy iteration ``p_{k+1} = G^{pi_k}`` from ``p0``, one iteration per unit time (``dt = 1``).

    Stops after ``floor(t_end)`` iterations (forever if ``t_end`` is infinite).

    Raises:
        solver.flows.NumericalError: if an iterate has non-finite values.
    """
    p, k = p0, 0
    ev = flows._evaluate_checked(mdp, p, k, 0.0)
    yield FlowState(step=0, t=0.0, dt=0.0, p=p, evaluation=ev, g=flows.potential(mdp, ev.Q))
    while k + 1 <= t_end:
        p = bellman.gibbs(mdp, ev.Q)
        k += 1
        ev = flows._evaluate_checked(mdp, p, k, float(k))
        yield FlowState(step=k, t=float(k), dt=1.0, p=p, evaluation=ev, g=flows.potential(mdp, ev.Q))

