"""Diagnostics of a flow: energy, gap, dissipation, KL to Gibbs, conservation, rates (theory.md §4, §5.3, §8.6).

* ``J = rho^T V^pi`` (mean over states), ``gap = J* - J``.
* ``dissipation``: the predicted ``dJ/dt = rho^T (I - gamma P^pi)^{-1} D`` (one adjoint solve with the LU
  of the policy evaluation), with the statewise ``D`` the flow kind gives (:meth:`solver.flows.base.Flow.dissipation`:
  ``D^h`` of the discrete Wasserstein generator, theory.md §4; ``sum_j w_j p A^2`` for Fisher-Rao, theory.md §6); NaN
  for a kind without one (soft policy iteration has no time derivative; the Fisher information of a particle
  histogram is dominated by sampling noise). The plain ``rho . D`` is only a lower bound (theory.md §4, pitfall).
* ``dissipation_ratio``: the measured ``(J_{n+1} - J_n) / dt_{n+1}`` over the previous row's ``dissipation``
  (the prediction at ``t_n``); it tends to 1 at first order in ``dt``. NaN on row 0.
* ``kl_gibbs_max = max_s KL(pi_s || G^pi_s)``; ``tau`` times it is the Bellman residual ``T V^pi - V^pi``.
* ``mass_error = max_s |sum_j w_j p_sj - 1|``, ``min_density = min p``.
* :func:`fit_rate`: least-squares slope of ``log gap`` against ``t`` on the window ``[1e-10, 1e-5]``, with its
  status: ``asymptotic`` when the local rate (:func:`local_rates`, one per decade of the gap, measured on the
  ``dissipation`` column where it exists) varies by less than 1% over the window, else ``transient``.
* :func:`generator_gaps`: the smallest non-zero eigenvalue ``ell_s`` of ``-L_s`` per state; the asymptotic
  rate of implicit Euler is ``2 log(1 + dt ell_min) / dt`` (theory.md §5.3(e),
  :func:`solver.flows.wasserstein.implicit_euler_rate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from . import budget
from .bellman import LOG_FLOOR
from .flows.base import Flow, FlowState, potential
from .flows.fokker_planck import symmetric_generator
from .mdp import MDP
from .parallel import single_threaded_blas

HISTORY_COLUMNS = ("t", "dt", "J", "gap", "dissipation", "kl_gibbs_max", "mass_error", "min_density",
                   "dissipation_ratio")

#: Fit window for the linear rate (theory.md §8.6): above 1e-10 the gap is far from the round-off floor
#: (~1e-13 |J|), below 1e-5 the flow is in its linear regime.
RATE_WINDOW = (1e-10, 1e-5)


def record(flow: Flow, state: FlowState, J_star: float, previous: dict | None = None) -> dict[str, float]:
    """The history row of one flow state (keys :data:`HISTORY_COLUMNS`).

    Args:
        flow: the flow that produced ``state`` (it gives the statewise dissipation; its partition splits the KL,
            the smallest density, the mass error and the sum of the predicted ``dJ/dt`` over MPI ranks, combined
            in one collective, :meth:`solver.parallel.Partition.combine`, so the row is the same on every rank).
        previous: the row of the previous flow state (its ``J`` and ``dissipation`` are used), or None for
            the first row.

    The row's matrix-vector products (``p w`` of the masses, the KL's sums over the action DOFs, the adjoint
    solve) run on one BLAS thread (:func:`solver.parallel.single_threaded_blas`): waking OpenBLAS's second thread
    for a ``121 x 257`` product cost up to 5 ms on a loaded 2-core machine (measured along a default lqr_1d run,
    against 0.01 ms on one thread). The threaded product splits the sums differently: the KL column moved by up to
    7e-15 absolute (3e-7 relative at KL ~ 2e-10, its own round-off) against the threaded one, whose values depended
    on the core count; every other column is unchanged. The KL takes the evaluation's ``log p``
    (:attr:`solver.bellman.Evaluation.log_p`) where it equals ``log p`` (every ``p >= tiny``): one logarithm
    pass less, the same numbers.
    """
    mdp, partition = flow.mdp, flow.partition
    ev, local = state.evaluation, state.own_p  # this rank's rows
    with single_threaded_blas(mdp.n_states):
        J = float(mdp.rho @ ev.V)
        local_min = float(local.min())
        log_p = ev.log_p if ev.log_p is not None and local_min >= LOG_FLOOR else None  # log max(p, tiny) = log p
        kl = kl_to_gibbs(mdp, local, state.own_g, local_min > 0, log_p)  # log_p: this rank's rows
        state.memo["kl"] = kl  # for the along-flow check of this state
        local_mass_error = float(np.abs(local @ mdp.weights - 1.0).max())
        dissipation = predicted_dissipation(flow, state)  # this rank's part of the sum
    # the maxima over the ranks' states (the minimum as the maximum of its negative) and the sum in one collective
    kl_max, negative_min, mass_error, dissipation = partition.combine(
        [float(kl.max()), -local_min, local_mass_error, dissipation], ("max", "max", "max", "sum"))
    return {
        "t": state.t,
        "dt": state.dt,
        "J": J,
        "gap": J_star - J,
        "dissipation": dissipation,
        "kl_gibbs_max": float(kl_max),
        "mass_error": float(mass_error),
        "min_density": -float(negative_min),
        "dissipation_ratio": dissipation_ratio(J, state.dt, previous),
    }


def kl_to_gibbs(mdp: MDP, p: np.ndarray, g: np.ndarray, positive: bool = False,
                log_p: np.ndarray | None = None) -> np.ndarray:
    """``KL(p_s || G_s)`` per state, ``(n,)``, for the policies ``p (n, M)`` and the potentials ``g = Q / tau + log mu``
    of their Gibbs policies (``FlowState.g``): ``sum_j w_j p_j (log p_j - log G_j)``, ``0 log 0 = 0``.

    The operations of ``solver.bellman.kl_divergence(mdp, p, log_gibbs(mdp, Q)[0])`` (the same values bit for bit)
    without recomputing ``g`` from ``Q``, in chunks of states whose temporaries stay below
    :data:`solver.budget.KL_CHUNK_BYTES` (the ``(N, M)`` log-Gibbs table is never whole). ``positive``: the caller
    knows ``p > 0`` everywhere (no masking). ``log_p``: ``log p`` ``(n, M)`` when the caller has it (with
    ``positive``; the evaluation's :attr:`~solver.bellman.Evaluation.log_p` where ``p >= LOG_FLOOR``), then no
    logarithm of ``p``. Cost: one ``exp`` (and one ``log`` without ``log_p``) per entry, two matrix-vector
    products (on one BLAS thread for small ``n``).
    """
    n, m = p.shape
    w = mdp.weights
    size = max(1, budget.KL_CHUNK_BYTES // (8 * m))
    log_p = log_p if positive else None
    with single_threaded_blas(min(n, size)):
        if size >= n:
            out = _kl_chunk(p, g, w, positive, log_p)
        else:
            out = np.empty(n)
            for start in range(0, n, size):
                rows = slice(start, start + size)
                out[rows] = _kl_chunk(p[rows], g[rows], w, positive, None if log_p is None else log_p[rows])
    return out


def _kl_chunk(p: np.ndarray, g: np.ndarray, w: np.ndarray, positive: bool,
              log_p: np.ndarray | None = None) -> np.ndarray:
    log_g = g - g.max(axis=1, keepdims=True)  # log G = g - max g - log sum_j w_j exp(g_j - max g)
    log_g -= np.log(np.exp(log_g) @ w)[:, None]
    if positive:
        if log_p is None:
            integrand = np.log(p)
            integrand -= log_g
        else:
            integrand = log_p - log_g
        integrand *= p
        return integrand @ w
    mask = p > 0
    integrand = np.log(np.where(mask, p, 1.0))
    integrand -= log_g
    np.multiply(p, integrand, out=integrand, where=mask)
    integrand[~mask] = 0.0
    return integrand @ w


def predicted_dissipation(flow: Flow, state: FlowState) -> float:
    """Predicted ``dJ/dt = rho^T (I - gamma P^pi)^{-1} D = x . D`` at ``state``, ``D`` the flow's statewise
    dissipation (:meth:`solver.flows.base.Flow.own_dissipation`); NaN for a flow without one. Under MPI this
    rank's part of the sum, ``x[own] . D[own]`` (:func:`record` sums the ranks' parts)."""
    D = flow.own_dissipation(state)
    if D is None:
        return math.nan
    return float(state.evaluation.resolvent_adjoint(flow.mdp.rho)[flow.partition.rows] @ D)


def dissipation_ratio(J: float, dt: float, previous: dict | None) -> float:
    """``((J - J_prev) / dt) / dissipation_prev``: measured over predicted ``dJ/dt`` at the previous state.

    For a first-order scheme it is ``1 + O(dt)`` (theory.md §4). NaN without a previous row, for a zero step,
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
    """``log gap ~ intercept - rate * t`` on the points with ``gap`` in ``window``, and whether it is asymptotic.

    Attributes:
        rate, intercept, r2: the least-squares line and its coefficient of determination.
        window: the gap range of the fitted points (the last three decades above the final gap for a run that
            never entered the requested window).
        t_range, points: first and last fitted time, number of fitted points.
        status: ``"asymptotic"`` when the local rate varies by less than :data:`RATE_SETTLED` (relative)
            over ``window``, else ``"transient"`` (the rate is then not the asymptotic one; theory.md §5.3(e)).
        local_last: the local rate of the last sub-window (the latest decade of the gap with 3 points or more).
        local_spread: ``(max - min) / mean`` of the sub-window rates over the fitted window (inf with fewer than two).
        local_rates: ``((gap_hi, gap_lo, rate), ...)`` of every sub-window with data, latest last.
    """

    rate: float
    intercept: float
    r2: float
    window: tuple[float, float]
    t_range: tuple[float, float]
    points: int
    status: str = "asymptotic"
    local_last: float | None = None
    local_spread: float = math.inf
    local_rates: tuple = ()


#: The rate is asymptotic when the sub-window rates vary by less than this (relative) over the fit window.
RATE_SETTLED = 0.01

#: Width of a sub-window of :func:`local_rates`, in decades of the gap.
RATE_SUBWINDOW_DECADES = 1.0


def _line(tt: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``y ~ intercept + slope t``: ``(slope, intercept, r2)``."""
    slope, intercept = np.polyfit(tt, y, 1)
    residual = y - (slope * tt + intercept)
    total = np.sum((y - y.mean()) ** 2)
    return float(slope), float(intercept), float(1.0 - np.sum(residual ** 2) / total if total > 0 else 1.0)


def local_rates(t: np.ndarray, gap: np.ndarray, window: tuple[float, float],
                decades: float = RATE_SUBWINDOW_DECADES, values: np.ndarray | None = None
                ) -> list[tuple[float, float, float, np.ndarray]]:
    """The local rate ``r = -d log(gap)/dt`` on consecutive sub-windows of ``window``, from the top down.

    ``window`` is cut at ``window[1] 10^(-k decades)``; each cut with at least 3 points gets the least-squares
    slope of ``log values`` on ``t`` (a slope over a decade averages out the round-off of single rows). With
    fewer than two such cuts, single successive rows are the sub-windows.

    Args:
        values: what decays, ``gap`` by default. The ``dissipation`` column ``dJ/dt`` decays like the gap
            asymptotically and carries no cancellation error (the gap ``J* - J`` has ~1e-13 |J| of round-off,
            1% at 1e-10 when |J| ~ 10), so :func:`fit_rate` uses it when it is positive on the whole window.

    Returns:
        ``[(gap_hi, gap_lo, rate, mask), ...]`` in time order; ``mask`` (bool, shape of ``gap``) marks the
        sub-window's points.
    """
    lo, hi = window
    values = gap if values is None else values
    positive = gap > 0
    level = np.full(gap.shape, -1)
    level[positive] = np.floor(np.log10(hi / gap[positive]) / decades + 1e-12).astype(int)
    cuts = int(np.ceil(np.log10(hi / lo) / decades - 1e-12))
    out = []
    for k in range(cuts):
        mask = (level == k) & (gap >= lo) & (gap <= hi)
        if mask.sum() >= 3:
            slope = _line(t[mask], np.log(values[mask]))[0]
            out.append((hi * 10 ** (-k * decades), max(lo, hi * 10 ** (-(k + 1) * decades)), -slope, mask))
    if len(out) >= 2:
        return out
    inside = np.flatnonzero((gap >= lo) & (gap <= hi))
    out = []
    for a, b in zip(inside[:-1], inside[1:]):
        if b == a + 1 and t[b] > t[a]:
            mask = np.zeros(gap.shape, bool)
            mask[[a, b]] = True
            out.append((float(gap[a]), float(gap[b]), float(np.log(values[a] / values[b]) / (t[b] - t[a])), mask))
    return out


def fit_rate(t: np.ndarray, gap: np.ndarray, window: tuple[float, float] = RATE_WINDOW,
             settled: float = RATE_SETTLED, dissipation: np.ndarray | None = None) -> RateFit | None:
    """Fit a linear rate to ``gap(t)``, only where the local rate has settled (theory.md §5.3(e), §10.2).

    The points with ``window[0] <= gap <= window[1]`` are fitted. The fit is ``"asymptotic"`` when the local
    rates of :func:`local_rates` (one per decade of the gap) vary by less than ``settled`` (relative) over the
    whole window, else ``"transient"``: the gap has not reached its asymptotic regime (a late run of settled
    decades is not enough: a rate creeping by 0.3% per decade is a transient), and ``local_last`` is the best
    available estimate of the current local rate. A run that never entered the
    window (fewer than three points there) is fitted on the last three decades above its final gap and is
    always ``"transient"``: never a silent fallback. Returns None if no three positive gaps exist.

    ``dissipation`` (the history column, optional): where it is finite and positive on every point of the
    window, the local rates are measured on it (:func:`local_rates`); the fit itself is always on the gap.
    """
    t, gap = np.asarray(t, float), np.asarray(gap, float)
    inside = (gap >= window[0]) & (gap <= window[1])
    fallback = inside.sum() < 3
    if fallback:
        positive = gap > 0
        if positive.sum() < 3:
            return None
        last = gap[positive][-1]
        window = (float(last), float(1e3 * last))
        inside = positive & (gap >= window[0]) & (gap <= window[1])
        if inside.sum() < 3:
            return None
    values = None
    if dissipation is not None:
        dissipation = np.asarray(dissipation, float)
        if np.all(np.isfinite(dissipation[inside])) and np.all(dissipation[inside] > 0):
            values = np.where(inside, dissipation, 1.0)
    subs = local_rates(t, gap, window, values=values)
    rates = [s[2] for s in subs]
    spread = (max(rates) - min(rates)) / abs(float(np.mean(rates))) if len(rates) >= 2 else math.inf
    status = "asymptotic" if not fallback and spread < settled else "transient"
    used = inside
    tt, y = t[used], np.log(gap[used])
    slope, intercept, r2 = _line(tt, y)
    return RateFit(rate=-slope, intercept=intercept, r2=r2, window=window, t_range=(float(tt[0]), float(tt[-1])),
                   points=int(used.sum()), status=status, local_last=float(rates[-1]) if rates else -slope,
                   local_spread=float(spread), local_rates=tuple((s[0], s[1], s[2]) for s in subs))


#: Above this many action DOFs the gap is found by sparse shift-invert Lanczos instead of a dense eigen-solve.
DENSE_GAP_DOFS = 600


def generator_gaps(mdp: MDP, Q: np.ndarray, scheme: str = "sg") -> np.ndarray:
    """Spectral gap ``ell_s`` of the frozen generator built from ``Q`` at every state, ``(N,)``.

    ``-L`` is similar to the symmetric matrix ``S = W^{-1/2} A W^{-1/2}`` with off-diagonal
    ``-tau omega_jk b(dg)/sqrt(w_j w_k)`` where ``b = (dg/2)/sinh(dg/2)`` (SG) or 1 (SQRA), evaluated without
    forming ``exp(g)`` so that small ``tau`` cannot overflow. States are processed in chunks
    (:func:`solver.budget.by_state_chunks`), so the edge arrays do not grow with ``N``.
    """
    space = mdp.space
    return budget.by_state_chunks(space, lambda g: _gaps(space, g, mdp.tau, scheme), potential(mdp, Q))


def _gaps(space, g: np.ndarray, tau: float, scheme: str) -> np.ndarray:
    """:func:`generator_gaps` for the potentials ``g`` ``(n, M)`` of a chunk of states."""
    diag, coupling = symmetric_generator(space, g, tau, scheme)
    j, k = space.edges[:, 0], space.edges[:, 1]
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
