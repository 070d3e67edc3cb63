"""``flow.kind = "fisher_rao"``: the Fisher-Rao flow, continuous-time policy mirror descent (theory.md §6).

For every state, ``d_t log(p / mu) = Q^{pi_t} - tau log(p / mu) - V^{pi_t}``, i.e. ``d_t p = p A^{pi_t}`` with the
soft advantage ``A = Q - tau log(p / mu) - V`` (``sum_j w_j p_j A_j = 0`` exactly, so mass is conserved). The
exponential ("implicit-in-log") step with ``Q`` frozen over the step is

    p_{n+1} ∝ p_n^{1/(1 + tau dt)} (mu exp(Q^{pi_n} / tau))^{tau dt / (1 + tau dt)},

computed in log space as ``log p_{n+1} = (log p_n + dt Q + tau dt log mu) / (1 + tau dt) - log Z`` with a
log-sum-exp normalisation ``Z = sum_j w_j exp(.)``: no ``exp(Q / tau)`` is ever formed, so small ``tau`` cannot
overflow. Mass, positivity and the fixed point ``pi*`` are exact for every ``dt``; ``V^{pi_n}`` is non-decreasing
at every state (the step moves along the geometric path towards ``G^{pi_n}``, theory.md §6, lemma 4 of §2). The
predicted ``dJ/dt = rho^T (I - gamma P^pi)^{-1} sum_j w_j p A^2`` (exact for the semi-discrete ODE, by the
performance-difference lemma); asymptotic gap rate ``2 tau``, and ``2 log(1 + tau dt) / dt`` for the
exponential step.
"""

from __future__ import annotations

import math

import numpy as np

from .. import bellman
from ..mdp import MDP
from .base import Flow, FlowState


def fisher_rao_log_step(mdp: MDP, log_p: np.ndarray, Q: np.ndarray, dt: float) -> np.ndarray:
    """One exponential Fisher-Rao step in log space (theory.md §6).

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
    """Asymptotic Fisher-Rao gap rate: ``2 tau``, or ``2 log(1 + tau dt) / dt`` for the exponential step.

    >>> fisher_rao_rate(0.5)
    1.0
    """
    return 2.0 * tau if dt is None else 2.0 * math.log1p(tau * dt) / dt


class FisherRao(Flow):
    """The exponential-step Fisher-Rao flow (module docstring).

    The log-density is carried from step to step, so parts of the policy that underflow to zero in ``p`` keep
    their (finite) log and can recover.
    """

    kind = "fisher_rao"

    def start(self, p0: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):  # log 0 = -inf stays -inf: the Fisher-Rao flow keeps zeros
            self._log_p = np.log(p0)
        return p0

    def advance(self, state: FlowState, t_end: float) -> tuple[np.ndarray, float, int]:
        t_new = self.fixed_time(state, t_end)
        self._log_p = fisher_rao_log_step(self.mdp, self._log_p, state.evaluation.Q, t_new - state.t)
        return np.exp(self._log_p), t_new, 0

    def checkpoint(self) -> dict[str, np.ndarray]:
        return {"log_p": self._log_p}

    def restore(self, p: np.ndarray, data: dict[str, np.ndarray]) -> None:
        self._log_p = data["log_p"]

    def dissipation(self, state: FlowState) -> np.ndarray:
        return fisher_rao_dissipation(self.mdp, state.p, state.evaluation)

    def predicted_rate(self, ell_min: float) -> float:
        return fisher_rao_rate(self.mdp.tau, self.config.dt)
