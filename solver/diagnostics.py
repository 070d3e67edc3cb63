"""Diagnostics of a flow: energy, gap, dissipation, KL to Gibbs, conservation, rates (math.md §4, §5.3, §8.6).

* ``J = rho^T V^pi`` (mean over states), ``gap = J* - J``.
* ``dissipation``: the predicted ``dJ/dt = rho^T (I - gamma P^pi)^{-1} D`` (one adjoint solve with the LU
  of the policy evaluation), with the statewise ``D`` of the flow kind: ``D^h`` of the discrete Wasserstein
  generator (math.md §4), ``sum_j w_j p A^2`` for Fisher-Rao (math.md §6); NaN for ``policy_iteration`` (no
  time derivative) and ``particles`` (the Fisher information of a particle histogram is dominated by sampling
  noise). The plain ``rho . D`` is only a lower bound (math.md §4, pitfall).
* ``dissipation_ratio``: the measured ``(J_{n+1} - J_n) / dt_{n+1}`` over the previous row's ``dissipation``
  (the prediction at ``t_n``); it tends to 1 at first order in ``dt``. NaN on row 0.
* ``kl_gibbs_max = max_s KL(pi_s || G^pi_s)``; ``tau`` times it is the Bellman residual ``T V^pi - V^pi``.
* ``mass_error = max_s |sum_j w_j p_sj - 1|``, ``min_density = min p``.
* :func:`fit_rate`: least-squares slope of ``log gap`` against ``t`` on the window ``[1e-10, 1e-5]``.
* :func:`generator_gaps`: the smallest non-zero eigenvalue ``ell_s`` of ``-L_s`` per state; the asymptotic
  rate of implicit Euler is ``2 log(1 + dt ell_min) / dt`` (math.md §5.3(e)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from . import bellman, comparison, flows
from .mdp import MDP

HISTORY_COLUMNS = ("t", "dt", "J", "gap", "dissipation", "kl_gibbs_max", "mass_error", "min_density",
                   "dissipation_ratio")

#: Fit window for the linear rate (math.md §8.6): above 1e-10 the gap is far from the round-off floor
#: (~1e-13 |J|), below 1e-5 the flow is in its linear regime.
RATE_WINDOW = (1e-10, 1e-5)


def record(mdp: MDP, state: flows.FlowState, J_star: float, scheme: str = "sg", previous: dict | None = None,
           kind: str = "wasserstein", partition=None) -> dict[str, float]:
    """The history row of one flow state (keys :data:`HISTORY_COLUMNS`).

    Args:
        previous: the row of the previous flow state (its ``J`` and ``dissipation`` are used), or None for
            the first row.
        kind: the flow kind (``config.FLOW_KINDS``); selects the statewise dissipation.
        partition: a :class:`solver.parallel.Partition` (MPI over states): the statewise ``D^h`` and KL are
            computed on this rank's rows and gathered / reduced; the row is the same on every rank.
    """
    ev, p = state.evaluation, state.p
    rows = slice(None) if partition is None else partition.rows
    J = float(mdp.rho @ ev.V)
    # KL(pi_s || G^pi_s) in chunks of states: the (N, M) log-Gibbs table and its temporaries are never whole
    kl = flows.by_state_chunks(mdp.space, lambda pc, qc: bellman.kl_divergence(mdp, pc, bellman.log_gibbs(mdp, qc)[0]),
                               p[rows], ev.Q[rows])
    kl_max = float(np.max(kl))
    return {
        "t": state.t,
        "dt": state.dt,
        "J": J,
        "gap": J_star - J,
        "dissipation": predicted_dissipation(mdp, state, scheme, kind, partition),
        "kl_gibbs_max": kl_max if partition is None else partition.max(kl_max),
        "mass_error": float(np.max(np.abs(p @ mdp.weights - 1.0))),
        "min_density": float(np.min(p)),
        "dissipation_ratio": dissipation_ratio(J, state.dt, previous),
    }


def predicted_dissipation(mdp: MDP, state: flows.FlowState, scheme: str = "sg", kind: str = "wasserstein",
                          partition=None) -> float:
    """Predicted ``dJ/dt = rho^T (I - gamma P^pi)^{-1} D`` of the flow ``kind`` at ``state`` (NaN if none).

    ``D`` is :func:`solver.flows.dissipation` (Wasserstein, math.md §4; on this rank's rows and gathered
    with a ``partition``) or :func:`solver.comparison.fisher_rao_dissipation` (math.md §6).
    """
    if kind == "wasserstein" and partition is not None:
        rows = partition.rows
        D = partition.gather(flows.dissipation(mdp, state.p[rows], state.g[rows], scheme))
    elif kind == "wasserstein":
        D = flows.dissipation(mdp, state.p, state.g, scheme)
    elif kind == "fisher_rao":
        D = comparison.fisher_rao_dissipation(mdp, state.p, state.evaluation)
    elif kind in ("policy_iteration", "particles"):
        return math.nan
    else:
        raise ValueError(f"unknown flow kind {kind!r}")
    return float(state.evaluation.resolvent_adjoint(mdp.rho) @ D)


def dissipation_ratio(J: float, dt: float, previous: dict | None) -> float:
    """``((J - J_prev) / dt) / dissipation_prev``: measured over predicted ``dJ/dt`` at the previous state.

    For a first-order scheme it is ``1 + O(dt)`` (math.md §4). NaN without a previous row, for a zero step,
    or when the prediction is zero or NaN.
    """
    if previous is None or not dt > 0:
        return math.nan
    predicted = previous["dissipation"]
    if not (math.isfinite(predicted) and predicted != 0.0):
        return math.nan
    return (J - previous["J"]) / dt / predicted


@dataclass(frozen=True)
class RateFit:
    """``log gap ~ intercept - rate * t`` on the points with ``gap`` in ``window``."""

    rate: float
    intercept: float
    r2: float
    window: tuple[float, float]
    t_range: tuple[float, float]
    points: int


def fit_rate(t: np.ndarray, gap: np.ndarray, window: tuple[float, float] = RATE_WINDOW) -> RateFit | None:
    """Fit a linear rate to ``gap(t)``.

    Uses the points with ``window[0] <= gap <= window[1]``. If fewer than three points fall there (a run
    that stopped early or that cannot get below 1e-10), the last three decades above the final gap are used
    instead, and the returned ``window`` says so. Returns None if no three positive gaps exist.
    """
    t, gap = np.asarray(t, float), np.asarray(gap, float)
    inside = (gap >= window[0]) & (gap <= window[1])
    if inside.sum() < 3:
        positive = gap > 0
        if positive.sum() < 3:
            return None
        last = gap[positive][-1]
        window = (float(last), float(1e3 * last))
        inside = positive & (gap >= window[0]) & (gap <= window[1])
        if inside.sum() < 3:
            return None
    tt, y = t[inside], np.log(gap[inside])
    slope, intercept = np.polyfit(tt, y, 1)
    residual = y - (slope * tt + intercept)
    total = np.sum((y - y.mean()) ** 2)
    r2 = 1.0 - np.sum(residual ** 2) / total if total > 0 else 1.0
    return RateFit(rate=float(-slope), intercept=float(intercept), r2=float(r2), window=window,
                   t_range=(float(tt[0]), float(tt[-1])), points=int(inside.sum()))


#: Above this many action DOFs the gap is found by sparse shift-invert Lanczos instead of a dense eigen-solve.
DENSE_GAP_DOFS = 600


def generator_gaps(mdp: MDP, Q: np.ndarray, scheme: str = "sg") -> np.ndarray:
    """Spectral gap ``ell_s`` of the frozen generator built from ``Q`` at every state, ``(N,)``.

    ``-L`` is similar to the symmetric matrix ``S = W^{-1/2} A W^{-1/2}`` with off-diagonal
    ``-tau omega_jk b(dg)/sqrt(w_j w_k)`` where ``b = (dg/2)/sinh(dg/2)`` (SG) or 1 (SQRA), evaluated without
    forming ``exp(g)`` so that small ``tau`` cannot overflow. States are processed in chunks
    (:func:`solver.flows.by_state_chunks`), so the edge arrays do not grow with ``N``.
    """
    space = mdp.space
    return flows.by_state_chunks(space, lambda g: _gaps(space, g, mdp.tau, scheme), flows.potential(mdp, Q))


def _gaps(space, g: np.ndarray, tau: float, scheme: str) -> np.ndarray:
    """:func:`generator_gaps` for the potentials ``g`` ``(n, M)`` of a chunk of states."""
    fwd, bwd = flows.edge_rates(space, g, tau, scheme)
    j, k = space.edges[:, 0], space.edges[:, 1]
    w = space.weights
    # symmetric coupling: fwd * exp(-dg/2) = bwd * exp(dg/2) = sqrt(fwd * bwd)
    coupling = -np.sqrt(fwd * bwd) / np.sqrt(w[j] * w[k])
    diag = fwd @ flows.incidence(j, space.n_dofs) / w + bwd @ flows.incidence(k, space.n_dofs) / w
    if space.dim == 1 and space.bandwidth == 1:
        order = np.argsort(j)
        return np.array([sla.eigh_tridiagonal(d, c[order], select="i", select_range=(1, 1),
                                              eigvals_only=True)[0] for d, c in zip(diag, coupling)])
    m = space.n_dofs
    gaps = []
    for d, c in zip(diag, coupling):
        if m <= DENSE_GAP_DOFS:
            S = np.diag(d)
            S[j, k] = S[k, j] = c
            gaps.append(sla.eigh(S, eigvals_only=True, subset_by_index=(1, 1))[0])
            continue
        S = sp.coo_matrix((np.concatenate([d, c, c]), (np.concatenate([np.arange(m), j, k]),
                                                       np.concatenate([np.arange(m), k, j]))), shape=(m, m)).tocsc()
        # shift-invert just below the zero eigenvalue: the two eigenvalues nearest the shift are 0 and ell
        shift = -1e-3 * float(np.mean(d))
        values = spla.eigsh(S, k=2, sigma=shift, which="LM", return_eigenvectors=False, tol=0)
        gaps.append(float(np.max(values)))
    return np.array(gaps)


def implicit_euler_rate(ell: float, dt: float) -> float:
    """Asymptotic gap rate of implicit Euler with a slowest mode ``ell``: ``2 log(1 + dt ell) / dt``."""
    return 2.0 * math.log1p(dt * ell) / dt
