"""Which states and modes set the observed rate, and which states the truncated domain affects (theory.md §10.2).

**Modes.** Near ``pi*`` the states decouple (theory.md §5.3(e)): the masses ``m_s`` of state ``s`` relax under the
frozen generator ``L*_s`` built from ``Q*`` (:mod:`solver.flows.fokker_planck`), which is reversible with respect to
the discrete Gibbs masses ``G_s = w G*_s``. Its symmetrisation ``S_s = G_s^{-1/2} (-L*_s) G_s^{1/2}`` has the
off-diagonal ``-sqrt(fwd bwd) / sqrt(w_j w_k)`` per edge (formed edge by edge, so that small Gibbs masses cannot
underflow) and orthonormal eigenvectors ``v_{s,k}`` with eigenvalues ``0 = ell_{s,0} < ell_{s,1} <= ...``. With
``x_s = G_s^{-1/2} (m_s - G_s)`` (so ``|x_s|^2 = chi^2(pi_s || G*_s)``) and ``c_{s,k} = v_{s,k} . x_s``,

    J* - J  ~  sum_s sum_k  (tau / 2) W_s c_{s,k}^2,        W_s = d*_rho(s) / (1 - gamma),

(the second-order expansion of the performance difference, theory.md §5.3(e)), and each term decays like
``exp(-2 ell_{s,k} t)`` (implicit Euler: ``(1 + dt ell)^{-2n}``). :func:`analyse` computes the terms of the
:data:`MODES_PER_STATE` slowest non-zero modes of every state from a policy, the ratio of their full sum
``(tau / 2) sum_s W_s chi^2_s`` to the gap (1 in the linear regime; far from 1 when the policy is not yet near
``pi*``, e.g. ``log(p / pi*) ~ 100`` in the action tails after a uniform start), and the slowest mode overall.

**What the excited modes predict** (:func:`rate_summary`). The terms at the first policy inside the fit window
(:class:`WindowStart`), each propagated at its own rate, predict the gap on the fitted points after it
(:func:`mode_mixture`): the log-slope of that prediction is the excited modes' rate over the span, the slowest
excited mode's once it dominates and the mixture a window fit measures while several modes share the span (ring_disk:
0.56876 predicted, 0.56868 measured on the same points). The terms at the last policy say what is excited at the
end (a mode is excited when its term is at least :data:`EXCITED_SHARE` of the largest; symmetric starts leave odd
modes unexcited: a centred Ornstein-Uhlenbeck start decays at ``4k``, not ``2k``), which mode dominates, and
below which gap the slowest excited mode takes over (:meth:`ModalPrediction.takeover_gap`).

**Boundary-affected states** (:func:`boundary_report`): a state whose Gibbs policy ``pi*_s`` has more than
:data:`BOUNDARY_MASS` of its mass within :data:`BOUNDARY_CELLS` mesh edges of the action boundary, or whose
transitions lose more than :data:`BOUNDARY_MASS` of the Gaussian ``N(f(s, a), sigma^2)`` beyond the ends of the
state grid before the kernel is renormalised (:func:`kernel_loss`), weighted by ``pi*_s`` or by the current
policy (the larger: a policy far from ``pi*`` still feels the cut), or whose current deviation from ``pi*``
lives mostly at such actions. The renormalised kernel makes such states weakly confining: their rate is a property
of the truncated MDP, not of the theory (an enlarged state domain changes it: ``wpgflow study``, :mod:`solver.study`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.special import ndtr

from . import bellman, budget
from .diagnostics import RATE_WINDOW
from .fem import ActionSpace, interval_space
from .flows.base import FlowState, potential
from .flows.fokker_planck import symmetric_generator
from .mdp import MDP
from .observers import Observer

#: Non-zero modes per state whose amplitudes are computed (the slowest few set the rate).
MODES_PER_STATE = 6

#: On 2D action meshes at most this many states get an eigen-solve (:func:`analyse`); 1D chains get all.
MODES_MAX_STATES = 64

#: A mode is excited when its share of ``J* - J`` is at least this fraction of the largest mode's share
#: (theory.md §10.2): below it, it stays invisible over the five decades of the fit window.
EXCITED_SHARE = 1e-3

#: A state is boundary-affected when a mass above this lies near the action boundary or is cut from its kernel.
BOUNDARY_MASS = 1e-6

#: A policy's deviation "lives where the kernel is cut" when this share of ``KL(pi_s || pi*_s)`` comes from actions
#: whose kernel loses more than :data:`CUT_ACTION_LOSS`: its decay is then that of the truncated part of the MDP.
CUT_SHARE = 0.5

#: An action's kernel is "cut" when it loses more than this (the renormalisation then changes ``Q*`` visibly:
#: ``gamma loss osc(V)``; a loss of 1e-6 at a central state is a 4.8-sigma tail and changes nothing).
CUT_ACTION_LOSS = 1e-3

#: "Near the action boundary": within this many mesh edges of a boundary DOF.
BOUNDARY_CELLS = 3

#: Above this many action DOFs (2D meshes) the modes are found by sparse shift-invert Lanczos instead of a dense
#: eigen-solve (measured: 0.08 s against 12 s for one state of 1201 DOFs).
DENSE_MODE_DOFS = 200

#: ``(tau/2) sum W chi^2`` within this relative distance of the gap: the policy is in the linear regime, where the
#: modes describe the gap. Far from it the ratio is astronomical (1e42 after a uniform start whose action tails are
#: still ``log(p/pi*) ~ 100`` away); near it, action tails inflate ``chi^2`` over ``2 KL`` by tens of percent while
#: carrying little of the decay (measured 1.11 on double_well_1d and 1.23 on lqr_1d at 1e-10, 0.97-1.0001 elsewhere).
LINEAR_TOLERANCE = 0.5


def state_modes(space: ActionSpace, diag: np.ndarray, coupling: np.ndarray, count: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The ``count + 1`` smallest eigenpairs of one state's ``S``
    (:func:`solver.flows.fokker_planck.symmetric_generator`).

    Tridiagonal ``eigh`` for a 1D chain, dense ``eigh`` up to :data:`DENSE_MODE_DOFS` DOFs, shift-invert Lanczos
    (one sparse LU of ``S - shift``, ``shift`` just below 0) above.

    Returns:
        ``(ell (count + 1,), vectors (M, count + 1))``, ascending; ``ell[0] ~ 0`` is the Gibbs mode ``sqrt(G)``.
    """
    m = space.n_dofs
    count = min(count, m - 2)
    j, k = space.edges[:, 0], space.edges[:, 1]
    if space.is_chain:
        return sla.eigh_tridiagonal(diag, coupling, select="i", select_range=(0, count))
    if m <= DENSE_MODE_DOFS:
        S = np.diag(diag)
        S[j, k] = S[k, j] = coupling
        return sla.eigh(S, subset_by_index=(0, count))
    shift = -1e-3 * float(np.mean(diag))  # just below the zero eigenvalue: the nearest ones are the slowest
    shifted = sp.coo_matrix((np.concatenate([diag - shift, coupling, coupling]),
                             (np.concatenate([np.arange(m), j, k]), np.concatenate([np.arange(m), k, j]))),
                            shape=(m, m)).tocsc()
    lu = spla.splu(shifted)  # shift-invert by hand: one sparse LU per state, Lanczos on (S - shift)^{-1}
    inverse = spla.LinearOperator((m, m), matvec=lu.solve, dtype=float)
    # tol 1e-10: eigenvalues to ~1e-10 relative (the amplitudes need far less); tol=0 costs 10x more
    mu, vectors = spla.eigsh(inverse, k=count + 1, which="LM", tol=1e-10)
    values = 1.0 / mu + shift
    order = np.argsort(values)
    return values[order], vectors[:, order]


@dataclass(frozen=True)
class ModeReport:
    """The mode decomposition of a policy's deviation from ``pi*`` (module docstring).

    Attributes:
        ell: ``(N, K)`` the ``K`` slowest non-zero eigenvalues ``ell_{s,k}`` of ``-L*_s``, ascending per state.
        terms: ``(N, K)`` ``(tau / 2) W_s c_{s,k}^2``, each mode's part of ``J* - J``.
        gap_shares: ``(N,)`` ``(tau / (1 - gamma)) d*_rho(s) KL(pi_s || G*_s)``, each state's part of the gap
            (meaningful also outside the linear regime).
        linear_ratio: ``(tau / 2) sum_s W_s chi^2(pi_s || G*_s)`` over the gap (1 in the linear regime).
        gap: ``J* - J`` of the policy.
        slowest: ``(state, ell)`` of the slowest mode overall.
    """

    ell: np.ndarray
    terms: np.ndarray
    gap_shares: np.ndarray
    linear_ratio: float
    gap: float
    slowest: tuple[int, float]

    @property
    def linear(self) -> bool:
        """The policy is in the linear regime, where the modes describe ``J* - J``."""
        return math.isfinite(self.linear_ratio) and abs(self.linear_ratio - 1.0) <= LINEAR_TOLERANCE

    @property
    def gap_state(self) -> int:
        """The state holding the largest share of ``J* - J``."""
        return int(np.argmax(self.gap_shares))


def analyse(mdp: MDP, optimum: bellman.Optimum, p: np.ndarray, scheme: str = "sg",
            count: int = MODES_PER_STATE, gap: float | None = None, ell_star: np.ndarray | None = None
            ) -> ModeReport:
    """Mode decomposition of the deviation of the policy ``p`` ``(N, M)`` from ``pi*`` (module docstring).

    Args:
        gap: ``J* - J`` of ``p`` if known (else ``p`` is evaluated once more).
        ell_star: ``(N,)`` the generator gaps at ``Q*`` (:func:`solver.diagnostics.generator_gaps`) if known: they
            give the slowest mode overall and choose the states analysed on large problems.

    Cost: one policy evaluation of ``pi*`` (for ``d*_rho``) and one small eigen-problem per analysed state
    (tridiagonal in 1D: ~1 ms per state at 257 DOFs; shift-invert Lanczos on 2D meshes: ~0.1 s per state at
    1201 DOFs). On 2D meshes with more than :data:`MODES_MAX_STATES` states only that many are analysed: half
    with the largest parts of the gap, half with the smallest ``ell_star``; the others get no modes (``ell``
    inf, ``terms`` 0). The ``(N, M)`` work arrays are built in chunks of states (memory does not grow with ``N``).
    """
    n = mdp.n_states
    W, chi2, gap_shares, gap = state_parts(mdp, optimum, p, gap)
    count = min(count, mdp.n_actions - 2)
    log_w = np.log(mdp.weights)
    chosen = np.arange(n)
    if not mdp.space.is_chain and n > MODES_MAX_STATES:
        half = MODES_MAX_STATES // 2
        picks = [np.argsort(-gap_shares)[:half]]
        if ell_star is not None:
            picks.append(np.argsort(ell_star)[:half])
        chosen = np.unique(np.concatenate(picks))
    ell = np.full((n, count), np.inf)
    terms = np.zeros((n, count))
    for s in chosen:
        g = potential(mdp, optimum.Q[s:s + 1])
        diag, coupling = symmetric_generator(mdp.space, g, mdp.tau, scheme)
        values, vectors = state_modes(mdp.space, diag[0], coupling[0], count)
        x = _deviation(p[s:s + 1], log_w, bellman.log_gibbs(mdp, optimum.Q[s:s + 1])[0])[0]
        ell[s] = values[1:count + 1]
        with np.errstate(over="ignore", invalid="ignore"):
            terms[s] = 0.5 * mdp.tau * W[s] * (vectors[:, 1:count + 1].T @ x) ** 2
    linear_ratio = float(0.5 * mdp.tau * np.sum(W * chi2) / gap) if gap > 0 else math.nan
    s_min = int(np.argmin(ell_star)) if ell_star is not None else int(np.argmin(ell[:, 0]))
    slowest = (s_min, float(ell_star[s_min]) if ell_star is not None else float(ell[s_min, 0]))
    return ModeReport(ell=ell, terms=terms, gap_shares=gap_shares, linear_ratio=linear_ratio, gap=gap,
                      slowest=slowest)


def state_parts(mdp: MDP, optimum: bellman.Optimum, p: np.ndarray, gap: float | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(W, chi2, gap_shares, gap)`` of the policy ``p`` (:class:`ModeReport`): ``W_s = d*_rho(s) / (1 - gamma)``,
    ``chi^2(pi_s || G*_s)``, each state's part ``tau W_s KL(pi_s || G*_s)`` of the gap, and ``J* - J`` (evaluated
    unless given). Cost: one or two policy evaluations; ``(chunk, M)`` work arrays only."""
    w = mdp.weights
    n = mdp.n_states
    evaluation = bellman.evaluate(mdp, optimum.p)
    d_star = (1.0 - mdp.gamma) * evaluation.resolvent_adjoint(mdp.rho)
    evaluation.resolvent.release()
    W = d_star / (1.0 - mdp.gamma)
    if gap is None:
        current = bellman.evaluate(mdp, p)
        current.resolvent.release()
        gap = float(mdp.rho @ optimum.V) - float(mdp.rho @ current.V)
    log_w = np.log(w)
    chi2, kl = np.empty(n), np.empty(n)
    for rows in budget.chunks(n, 8 * 8 * mdp.n_actions):
        log_G = bellman.log_gibbs(mdp, optimum.Q[rows])[0]
        x = _deviation(p[rows], log_w, log_G)
        chi2[rows] = np.einsum("ij,ij->i", x, x)
        kl[rows] = bellman.kl_divergence(mdp, p[rows], log_G)
    return W, chi2, mdp.tau * W * kl, gap


def _deviation(p: np.ndarray, log_w: np.ndarray, log_G: np.ndarray) -> np.ndarray:
    """``x = (m - G) / sqrt(G)`` (masses ``m = w p``, Gibbs masses ``G = w G*``) for a chunk of states, in log
    space (``G`` may underflow); exponents are clipped at 300 so that ``x^2`` stays finite far from ``pi*``."""
    half_log_mass = 0.5 * (log_w + log_G)
    with np.errstate(divide="ignore"):
        log_p = np.log(np.maximum(p, 0.0))
    return np.exp(np.minimum(log_p + log_w - half_log_mass, 300.0)) - np.exp(half_log_mass)


def next_state_means(model, states: np.ndarray, space: ActionSpace) -> np.ndarray | None:
    """The kernel means ``f(s_i, a_j)``: ``(N, M)`` for a 1D state grid, ``(N, M, 2)`` for a 2D one; None for a
    one-state model (as :func:`solver.mdp.build_mdp` evaluates the model)."""
    if model.single_state:
        return None
    s = states[:, None]
    a = space.coords[None, :, :] if model.action_dim == 2 else space.coords[:, 0][None, :]
    shape = (states.shape[0], space.n_dofs) + ((2,) if states.ndim == 2 else ())
    return np.broadcast_to(np.asarray(model.dynamics(s, a), float), shape)


def kernel_loss(states: np.ndarray, means: np.ndarray, sigma: float) -> np.ndarray:
    """Mass of ``N(f, sigma^2)`` beyond the ends of the state grid, before renormalisation, ``(n, M)``.

    Grid point ``x_k`` stands for the cell ``[x_k - h/2, x_k + h/2]``, so the kept mass is that of
    ``[x_0 - h/2, x_{n-1} + h/2]`` per axis (exact Gaussian tails, ``scipy.special.ndtr``); on a 2D grid the
    kept mass is the product over the axes.

    Args:
        states: ``(N,)`` 1D grid, or ``(N, 2)`` 2D grid (row-major, :func:`solver.mdp.product_grid`): the whole grid.
        means: ``(n, M)`` (1D) or ``(n, M, 2)`` (2D) next-state means of any ``n`` states (e.g. a chunk).
    """
    if states.ndim == 1:
        axes, means = [states], means[..., None]
    else:
        axes = [np.unique(states[:, d]) for d in range(states.shape[1])]
    kept = np.ones(means.shape[:2])
    for d, axis in enumerate(axes):
        h = axis[1] - axis[0] if axis.size > 1 else 0.0
        lo, hi = axis[0] - h / 2, axis[-1] + h / 2
        f = means[..., d]
        kept *= np.clip(ndtr((hi - f) / sigma) - ndtr((lo - f) / sigma), 0.0, 1.0)
    return 1.0 - kept


def near_boundary(space: ActionSpace, hops: int = BOUNDARY_CELLS) -> np.ndarray:
    """``(M,)`` bool: DOFs within ``hops`` mesh edges of a boundary DOF (a DOF of a facet that one cell owns)."""
    m = space.n_dofs
    cells = space.cells
    if space.dim == 1:
        counts = np.bincount(cells.ravel(), minlength=m)
        on = counts == 1
    else:
        facets = np.sort(np.concatenate([cells[:, [0, 1]], cells[:, [1, 2]], cells[:, [0, 2]]]), axis=1)
        unique, counts = np.unique(facets, axis=0, return_counts=True)
        on = np.zeros(m, bool)
        on[unique[counts == 1].ravel()] = True
    j, k = space.edges[:, 0], space.edges[:, 1]
    adjacency = sp.coo_matrix((np.ones(2 * j.size), (np.concatenate([j, k]), np.concatenate([k, j]))),
                              shape=(m, m)).tocsr()
    near = on.copy()
    for _ in range(hops):
        near |= (adjacency @ near.astype(float)) > 0
    return near


def boundary_report(problem, p: np.ndarray | None = None) -> dict:
    """Boundary-affected states of a problem (module docstring).

    A state is boundary-affected when (a) ``pi*_s`` has more than :data:`BOUNDARY_MASS` within
    :data:`BOUNDARY_CELLS` edges of the action boundary, or (b) its kernel loses more than :data:`BOUNDARY_MASS`
    to the state-grid cut under ``pi*_s`` or under ``p``, or (c) at least :data:`CUT_SHARE` of
    ``KL(p_s || pi*_s)`` comes from actions whose kernel loses more than :data:`CUT_ACTION_LOSS`, at a state whose
    KL is at least :data:`EXCITED_SHARE` of the largest (the deviation
    left after a uniform start sits in the action tails, where ``Q*`` is flattened by the renormalised kernel,
    even when ``pi*_s`` itself puts only ~1e-10 there).

    Args:
        problem: a :class:`solver.runner.Problem`.
        p: ``(N, M)`` the current policy (the last one of a run), for (b) and (c); None: ``pi*`` alone.

    Returns:
        ``{"action_boundary_mass": (N,), "kernel_loss": (N,), "cut_share": (N,), "affected": sorted list of
        state indices}``.
    """
    mdp, opt, model = problem.mdp, problem.optimum, problem.model
    w = mdp.weights
    n = mdp.n_states
    near = near_boundary(mdp.space)
    action, loss, share, total = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    cut_states = not model.single_state and model.sigma > 0
    for rows in budget.chunks(n, 8 * 8 * mdp.n_actions):  # (chunk, M) work arrays only
        masses = opt.p[rows] * w
        action[rows] = masses[:, near].sum(axis=1)
        if not cut_states:
            continue
        cut = kernel_loss(mdp.states, next_state_means(model, mdp.states[rows], mdp.space), model.sigma)
        loss[rows] = np.sum(masses * cut, axis=1)
        if p is None:
            continue
        pc = p[rows]
        loss[rows] = np.maximum(loss[rows], np.sum(pc * w * cut, axis=1))
        log_G = bellman.log_gibbs(mdp, opt.Q[rows])[0]
        with np.errstate(divide="ignore"):  # w (p log(p/G) - p + G) >= 0, sums to KL: no cancellation
            integrand = w * (np.where(pc > 0, pc * (np.log(np.where(pc > 0, pc, 1.0)) - log_G), 0.0) - pc
                             + np.exp(log_G))
        total[rows] = integrand.sum(axis=1)
        share[rows] = np.where(cut > CUT_ACTION_LOSS, integrand, 0.0).sum(axis=1)
    share = np.where(total > 0, share / np.where(total > 0, total, 1.0), 0.0)
    share[total < EXCITED_SHARE * max(float(total.max()), 0.0)] = 0.0  # round-off KL: no deviation to place
    affected = np.flatnonzero((action > BOUNDARY_MASS) | (loss > BOUNDARY_MASS) | (share >= CUT_SHARE))
    return {"action_boundary_mass": action, "kernel_loss": loss, "cut_share": share,
            "affected": [int(s) for s in affected]}


class WindowStart(Observer):
    """Keeps the first policy of a run whose gap has entered the rate-fit window (``gap <= RATE_WINDOW[1]``).

    Its mode amplitudes, propagated by the linearised flow, predict the whole decay over the fitted span
    (:func:`mode_mixture`); one ``(N, M)`` copy is kept, and it goes into the checkpoint (a resumed run predicts
    from the same policy).
    """

    def __init__(self, upper: float = RATE_WINDOW[1]):
        self.upper = upper
        self.t = self.gap = None
        self.p: np.ndarray | None = None

    def needs_full(self, row: dict, state: FlowState) -> bool:
        return self.p is None and 0 < row["gap"] <= self.upper

    def observe(self, row: dict, state: FlowState) -> None:
        if self.needs_full(row, state):
            self.t, self.gap, self.p = float(row["t"]), float(row["gap"]), np.array(state.p)

    def checkpoint_state(self) -> dict:
        return {} if self.p is None else {"p": self.p, "t_gap": np.array([self.t, self.gap])}

    def restore_state(self, data: dict) -> None:
        if "p" in data:
            self.p = np.array(data["p"])
            self.t, self.gap = (float(x) for x in data["t_gap"])


@dataclass(frozen=True)
class ModalPrediction:
    """What the linearised, decoupled flow predicts for ``J* - J`` from a policy's mode terms (theory.md §10.2).

    Each mode's term decays like ``exp(-r_{s,k} (t - t0))``, ``r = flow.predicted_rate(ell_{s,k})`` (for implicit
    Euler exactly ``(1 + dt ell)^{-2n}``), so the gap is predicted as ``sum_{s,k} T_{s,k} exp(-r_{s,k} (t - t0))``.

    Attributes:
        rates: ``(N, K)`` each mode's gap rate (nan without a mode).
        terms_end: ``(N, K)`` each mode's part of the gap at ``span[1]``.
        span: ``(t0, t1)``: from the analysed policy to the end of the fitted points (``t0 == t1``: the analysed
            policy is the last one, and ``rate`` is the instantaneous modal rate there).
        rate: the modes' rate over ``span``: the log-slope of the predicted gap on the fitted points of the span
            (instantaneous: ``sum r T / sum T``).
        measured: the measured rate on the same points (instantaneous: the fit's last local rate).
        linear_ratio: of the analysed policy (:attr:`ModeReport.linear_ratio`).
    """

    rates: np.ndarray
    terms_end: np.ndarray
    span: tuple[float, float]
    rate: float
    measured: float | None
    linear_ratio: float

    def rate_of(self, states: np.ndarray) -> float | None:
        """The modes' rate over the span restricted to the states ``states`` (bool ``(N,)``): as :attr:`rate`,
        from the instantaneous terms at the end of the span (None if those states carry no term)."""
        terms = np.where(states[:, None] & np.isfinite(self.rates), self.terms_end, 0.0)
        total = float(terms.sum())
        return float(np.nansum(np.where(terms > 0, self.rates, 0.0) * terms) / total) if total > 0 else None

    def excited(self) -> np.ndarray:
        """``(N, K)`` bool: the modes whose term at the end of the span is at least :data:`EXCITED_SHARE` of the
        largest (an unexcited mode stays invisible over the five decades of the fit window)."""
        return np.isfinite(self.rates) & (self.terms_end >= EXCITED_SHARE * float(np.max(self.terms_end)))

    def slowest_excited(self) -> tuple[int, int, float]:
        """``(state, mode index, rate)`` of the slowest excited mode: the rate the run tends to after the span."""
        masked = np.where(self.excited(), self.rates, np.inf)
        s, k = np.unravel_index(int(np.argmin(masked)), masked.shape)
        return int(s), int(k) + 1, float(self.rates[s, k])

    def dominant(self) -> tuple[int, int, float]:
        """``(state, mode index, rate)`` of the mode with the largest term at the end of the span."""
        s, k = np.unravel_index(int(np.argmax(np.where(np.isfinite(self.rates), self.terms_end, -1.0))),
                                self.rates.shape)
        return int(s), int(k) + 1, float(self.rates[s, k])

    def takeover_gap(self) -> float | None:
        """The predicted gap at which the slowest excited mode carries half of it (above the final gap if that
        happened inside the span), or None without a faster mode: ``sum_{faster} T e^{-r u} = T_slow e^{-r_slow u}``
        for the time ``u`` after the end of the span (negative: before it), by bisection (the left side over the
        right falls monotonically in ``u``)."""
        _, _, r_slow = self.slowest_excited()
        rates = np.where(np.isfinite(self.rates), self.rates, -np.inf)
        # modes within DOMAIN_TOLERANCE of the slowest excited rate (e.g. symmetric pairs of states) decay with it
        group = (rates >= r_slow) & (rates <= r_slow * (1 + DOMAIN_TOLERANCE))
        t_slow = float(np.sum(np.where(group, self.terms_end, 0.0)))
        faster = np.where(rates > r_slow * (1 + DOMAIN_TOLERANCE), self.terms_end, 0.0)
        if not faster.any() or t_slow <= 0:
            return None
        excess = np.where(faster > 0, rates - r_slow, 0.0)

        def ratio(u: float) -> float:
            with np.errstate(over="ignore"):
                return float(np.sum(faster * np.exp(-excess * u))) / t_slow

        lo, hi = -1.0, 1.0
        while ratio(lo) < 1 and lo > -1e6:
            lo *= 2
        while ratio(hi) > 1 and hi < 1e6:
            hi *= 2
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if ratio(mid) > 1 else (lo, mid)
        return 2 * t_slow * math.exp(-r_slow * hi) if hi < 1e6 else None


def mode_rates(flow, ell: np.ndarray) -> np.ndarray:
    """``(N, K)`` gap rate ``flow.predicted_rate(ell)`` of every computed mode (nan where there is none)."""
    rates = np.full(ell.shape, np.nan)
    for s, k in zip(*np.nonzero(np.isfinite(ell))):
        r = flow.predicted_rate(float(ell[s, k]))
        rates[s, k] = math.nan if r is None else r
    return rates


def mode_mixture(report: ModeReport, flow, t0: float, t: np.ndarray, gap: np.ndarray) -> ModalPrediction:
    """The gap predicted on the points ``t >= t0`` of ``(t, gap)`` from the mode terms of ``report`` at ``t0``.

    Args:
        report: :func:`analyse` of the policy at ``t0`` (in the linear regime).
        t, gap: the fitted points (time and measured gap); those before ``t0`` are ignored.

    With fewer than three points from ``t0`` on, the prediction is the instantaneous one at ``t0``
    (:attr:`ModalPrediction.span` ``(t0, t0)``, ``measured`` None).
    """
    rates = mode_rates(flow, report.ell)
    terms = np.where(np.isfinite(rates), report.terms, 0.0)
    r = np.where(np.isfinite(rates), rates, 0.0)
    keep = t >= t0 - 1e-12 * max(1.0, abs(t0))
    if keep.sum() < 3:
        total = float(terms.sum())
        rate = float(np.sum(r * terms) / total) if total > 0 else math.nan
        return ModalPrediction(rates, terms, (t0, t0), rate, None, report.linear_ratio)
    tt = t[keep]
    predicted = np.array([float(np.sum(terms * np.exp(-r * (x - t0)))) for x in tt])
    rate = -float(np.polyfit(tt, np.log(predicted), 1)[0])
    measured = -float(np.polyfit(tt, np.log(gap[keep]), 1)[0])
    return ModalPrediction(rates, terms * np.exp(-r * (tt[-1] - t0)), (float(t0), float(tt[-1])), rate, measured,
                           report.linear_ratio)


def boundary_mode_share(problem, state: int, mode: int, scheme: str = "sg") -> float:
    """The weight ``sum_{j near} v_j^2`` of mode ``mode`` of ``state`` (orthonormal ``v`` of ``S``, at ``Q*``) on
    the DOFs within :data:`BOUNDARY_CELLS` edges of the action boundary.

    The eigenpair feels the boundary condition only through this part of the mode: moving the boundary
    (Neumann here, an enlarged domain there) perturbs ``ell`` at first order in it. Measured on ``ring_disk``
    (share 1e-4 although ``pi*`` has 1.6e-4 of its mass near the edge): disk radius 2 -> 2.4 -> 2.8 moves the
    dominant ``ell`` by 0.2% per step, as the coarser mesh of the larger disk does, not the domain.
    """
    mdp = problem.mdp
    g = potential(mdp, problem.optimum.Q[state:state + 1])
    diag, coupling = symmetric_generator(mdp.space, g, mdp.tau, scheme)
    _, vectors = state_modes(mdp.space, diag[0], coupling[0], mode)
    return float(np.sum(vectors[near_boundary(mdp.space), mode] ** 2))


#: ``resolved`` needs the fit within this (relative) of the slowest excited mode's rate (the bar ``wpgflow study``
#: uses for "resolved" too; measured agreement on resolved runs: 0.06% to 0.7%). The same bar separates a decay
#: the linearised modes explain from one they do not (:attr:`ModalPrediction.measured` against ``rate``).
RESOLVED_TOLERANCE = 0.02

#: A boundary-affected rate-setting state makes the rate ``domain-sensitive`` only if the modes of the unaffected
#: states give a rate further than this (relative) from it.
DOMAIN_TOLERANCE = 0.01

#: A dominant mode with at least this share of its weight within :data:`BOUNDARY_CELLS` edges of the action boundary
#: is affected by it (:func:`boundary_mode_share`). Measured on LQR with actions cut to [-1.2, 1.2] (8 random
#: parameter sets): shares 1.8% to 5.4% moved the rate by 4.6 to 10 times as much (10.8% to 41.5% against the
#: closed form), so 1e-3 keeps an unflagged boundary effect below ~1%; ring_disk's share is 1.1e-4.
BOUNDARY_MODE_SHARE = 1e-3

RATE_VERDICTS = ("resolved", "transient", "domain-sensitive", "mesh-sensitive")


def rate_summary(problem, p: np.ndarray | None, flow, fit, ell: np.ndarray | None = None,
                 gap: float | None = None, history: tuple[np.ndarray, np.ndarray] | None = None,
                 start: WindowStart | None = None) -> dict:
    """The rate verdict keys of ``summary.json`` (README, "Trusting the numbers").

    Args:
        problem: the :class:`solver.runner.Problem`.
        p: ``(N, M)`` the last policy of the run (None: no flow state).
        flow: the run's :class:`solver.flows.base.Flow` (its ``predicted_rate(ell)`` turns a gap into a rate).
        fit: the :class:`solver.diagnostics.RateFit` of the run, or None.
        ell: ``(N,)`` the generator gaps at ``Q*`` if already computed; gap: ``J* - J`` of ``p`` if known.
        history: ``(t, gap)`` of every row (for the modes' prediction over the fitted span).
        start: the run's :class:`WindowStart` (None: the modes are analysed at ``p`` only).

    Returns:
        ``rate_status``, ``rate_local_last``, ``rate_local_spread``; for the WPG flow with more than two action
        DOFs also the mode keys: ``predicted_rate_excited`` (the rate the excited modes predict over the fitted
        span, :class:`ModalPrediction`: the slowest excited mode's rate once it dominates), ``modes_rate_ratio``
        (measured over predicted on the same points; 1 when the linearised modes explain the decay),
        ``modes_span``, ``slowest_excited_rate`` / ``_state`` / ``_mode`` (what the run tends to after the
        span), ``slowest_excited_takeover_gap``, ``predicted_rate_dominant`` / ``dominant_state``,
        ``slowest_state``, ``gap_state``, ``modes_linear_ratio``, ``boundary_affected_states``,
        ``boundary_mode_share`` (None where the policy is not in the linear regime: the modes do not describe
        the gap there); ``rate_verdict`` (one of :data:`RATE_VERDICTS`, None without a fit) and
        ``rate_verdict_reason``.

    The modes are analysed at the window-start policy when it is in the linear regime (the prediction then
    covers the fitted span), else at the last policy (an instantaneous prediction), else not at all. The
    verdict: ``domain-sensitive`` if the state that sets the rate (the dominant mode's state, or without modes
    the state holding most of the gap) is affected by the truncation (its kernel is cut, its deviation sits at
    cut actions, or: with modes, the dominant mode has at least :data:`BOUNDARY_MODE_SHARE` of its weight near the
    action boundary; without, ``pi*`` has mass there) and the unaffected states' modes do not give the same rate
    within :data:`DOMAIN_TOLERANCE`. Otherwise ``transient`` unless the fit is asymptotic and within
    :data:`RESOLVED_TOLERANCE` of both the modes' rate over the span and the slowest excited mode's rate
    (without modes: of ``predicted_rate``), in which case ``resolved``.
    """
    out: dict = {"rate_status": fit.status if fit else None,
                 "rate_local_last": fit.local_last if fit else None,
                 "rate_local_spread": fit.local_spread if fit and math.isfinite(fit.local_spread) else None}
    verdict, reason = None, "no rate was fitted (fewer than three positive gaps)"
    settled = ""
    if fit is not None:
        verdict = "resolved" if fit.status == "asymptotic" else "transient"
        settled = (f"the local rate varies by {100 * fit.local_spread:.2g}% over the fit window"
                   if math.isfinite(fit.local_spread) else "too few points in the fit window to measure the local rate")
        reason = settled
    mdp = problem.mdp
    if not (flow.fokker_planck and mdp.n_actions > 2 and p is not None):
        return out | {"rate_verdict": verdict, "rate_verdict_reason": reason}
    scheme = problem.config.flow.scheme
    # the last policy's modes: what is excited at the end (they include what the coupling between states and the
    # mesh's asymmetry feed into slow modes, which the decoupled propagation from the window start misses)
    report_end = analyse(mdp, problem.optimum, p, scheme, gap=gap, ell_star=ell)
    prediction = None
    if report_end.linear:
        # instantaneous (span (inf, inf)), compared with the last local rate
        prediction = replace(mode_mixture(report_end, flow, math.inf, np.zeros(0), np.zeros(0)),
                             measured=fit.local_last if fit else None)
        if fit is not None and history is not None and start is not None and start.p is not None:
            report0 = analyse(mdp, problem.optimum, start.p, scheme, gap=start.gap, ell_star=ell)
            if report0.linear:  # the modes at the window start predict the whole fitted span
                t, g = history
                fitted = (t <= fit.t_range[1] * (1 + 1e-12)) & (g >= fit.window[0]) & (g <= fit.window[1])
                span = mode_mixture(report0, flow, start.t, t[fitted], g[fitted])
                if span.measured is not None:
                    prediction = replace(prediction, span=span.span, rate=span.rate, measured=span.measured,
                                         linear_ratio=span.linear_ratio)
    boundary = boundary_report(problem, p)
    affected = set(boundary["affected"])
    slowest_state = int(np.argmin(ell)) if ell is not None else report_end.slowest[0]
    gap_state = report_end.gap_state
    keys = dict.fromkeys(("predicted_rate_excited", "modes_rate_ratio", "modes_span", "slowest_excited_rate",
                          "slowest_excited_state", "slowest_excited_mode", "slowest_excited_takeover_gap",
                          "predicted_rate_dominant", "dominant_state", "boundary_mode_share",
                          "mesh_error_estimate"))
    keys |= {"slowest_state": slowest_state, "gap_state": gap_state,
             "modes_linear_ratio": None, "boundary_affected_states": sorted(affected)}
    if prediction is not None:
        slow_s, slow_k, slow_rate = prediction.slowest_excited()
        dom_s, dom_k, dom_rate = prediction.dominant()
        share = boundary_mode_share(problem, dom_s, dom_k, scheme)
        span = prediction.span
        keys |= {"predicted_rate_excited": prediction.rate,
                 "modes_rate_ratio": (prediction.measured / prediction.rate
                                      if prediction.measured is not None and prediction.rate > 0 else None),
                 "modes_span": list(span) if math.isfinite(span[0]) else None,
                 "slowest_excited_rate": slow_rate, "slowest_excited_state": slow_s,
                 "slowest_excited_mode": slow_k, "slowest_excited_takeover_gap": prediction.takeover_gap(),
                 "predicted_rate_dominant": dom_rate, "dominant_state": dom_s, "boundary_mode_share": share,
                 "modes_linear_ratio": prediction.linear_ratio if math.isfinite(prediction.linear_ratio) else None}
    out |= keys
    if fit is None:
        return out | {"rate_verdict": verdict, "rate_verdict_reason": reason}

    # --- the verdict ---
    setting = out["dominant_state"] if prediction is not None else gap_state
    why = []
    if boundary["kernel_loss"][setting] > BOUNDARY_MASS:
        why.append(f"its transitions lose {boundary['kernel_loss'][setting]:.1e} of their mass to the state-grid cut")
    if boundary["cut_share"][setting] >= CUT_SHARE:
        why.append(f"{100 * min(1.0, boundary['cut_share'][setting]):.0f}% of its deviation from pi* sits at actions "
                   "whose transitions the state grid cuts")
    if prediction is not None and out["boundary_mode_share"] >= BOUNDARY_MODE_SHARE:
        why.append(f"{100 * out['boundary_mode_share']:.2g}% of its dominant mode lies within {BOUNDARY_CELLS} "
                   "edges of the action boundary")
    if prediction is None and boundary["action_boundary_mass"][setting] > BOUNDARY_MASS:
        why.append(f"pi* has mass {boundary['action_boundary_mass'][setting]:.1e} near the action boundary")
    if why and prediction is not None:
        clear = np.ones(mdp.n_states, bool)
        clear[sorted(affected | {setting})] = False
        inner = prediction.rate_of(clear)
        whole = prediction.rate_of(np.ones(mdp.n_states, bool))
        if inner is not None and whole and abs(inner / whole - 1) <= DOMAIN_TOLERANCE:
            why = []  # the states the truncation does not affect give the same rate
    nonlinear = None if prediction is not None else (
        f"the last policy is not in the linear regime ((tau/2) sum W chi^2 is "
        f"{report_end.linear_ratio:.3g} x the gap; most of the gap at state {setting}), so the modes were not used")
    if why:
        verdict = "domain-sensitive"
        where = "the dominant mode" if prediction is not None else "most of the gap"
        reason = f"{where} sits at state {setting}, which the truncated domain affects: {'; '.join(why)}"
        if nonlinear:
            reason += f"; {nonlinear}"
        if fit.status == "transient":
            reason += f"; also transient: {settled}"
    elif prediction is None:
        slowest_rate = flow.predicted_rate(float(ell[slowest_state])) if ell is not None else None
        if fit.status == "asymptotic" and slowest_rate and abs(fit.rate / slowest_rate - 1) <= RESOLVED_TOLERANCE:
            reason = (f"{settled} and the fit is within {100 * RESOLVED_TOLERANCE:g}% of the slowest mode; "
                      f"{nonlinear}")  # the action tails are still far (chi^2 explodes there) but carry no rate
        else:
            verdict, reason = "transient", f"{nonlinear}; {settled}"
    else:
        explained = out["modes_rate_ratio"]
        if out["modes_span"] is not None:
            modal = (f"the excited modes predict {prediction.rate:.5g} over the fitted span and the gap decayed at "
                     f"{prediction.measured:.5g} there")
        else:  # the window start was not in the linear regime: the instantaneous prediction at the last policy
            modal = (f"the excited modes predict {prediction.rate:.5g} at the end of the run"
                     + (f" and the last local rate is {prediction.measured:.5g}" if prediction.measured else ""))
        takeover = out["slowest_excited_takeover_gap"]
        slower = ""
        if slow_rate < prediction.rate * (1 - DOMAIN_TOLERANCE):
            slower = f"; a slower excited mode (state {slow_s}, mode {slow_k}, rate {slow_rate:.5g}) "
            beyond = takeover is not None and gap is not None and takeover < gap
            slower += (f"carries half of the gap below ~{takeover:.1e}, beyond the run" if beyond
                       else f"has carried half of the gap since ~{takeover:.1e}" if takeover else "emerges")
        if explained is not None and abs(explained - 1) > RESOLVED_TOLERANCE:
            verdict = "transient"
            reason = f"{modal}: the linearised modes do not explain the decay yet; {settled}{slower}"
        elif fit.status == "transient":
            reason = f"{settled}; {modal}: a mixture of modes{slower}"
        elif (abs(fit.rate / prediction.rate - 1) > RESOLVED_TOLERANCE
              or abs(fit.rate / slow_rate - 1) > RESOLVED_TOLERANCE):
            verdict = "transient"
            reason = (f"the fit {fit.rate:.5g} is not within {100 * RESOLVED_TOLERANCE:g}% of both the modes' rate "
                      f"over the span and the slowest excited mode's ({slow_rate:.5g}); {modal}{slower}")
        else:
            reason = (f"{settled}, and the fit is within {100 * RESOLVED_TOLERANCE:g}% of the excited modes' rate "
                      f"(dominant: state {dom_s}, mode {dom_k}) and of the slowest excited mode's")
    # the mesh: the discretisation error of the mode that sets the asymptotic rate, where it can be estimated
    state, mode = (slow_s, slow_k) if prediction is not None else (slowest_state, 1)
    error = mesh_error(problem, state, mode, scheme)
    out["mesh_error_estimate"] = error
    reference = (slow_rate if prediction is not None
                 else flow.predicted_rate(float(ell[slowest_state])) if ell is not None else None)
    if verdict == "resolved" and error is not None and reference:
        used = abs(fit.rate / reference - 1) + abs(error)
        if used > RESOLVED_TOLERANCE:
            verdict = "mesh-sensitive"
            reason = (f"{reason}; but that mode's gap on the action mesh is off the continuum by about "
                      f"{100 * abs(error):.2g}% (estimated from every other node, O(h^2)), so fit and continuum may "
                      f"differ by {100 * used:.2g}%, more than {100 * RESOLVED_TOLERANCE:g}%: refine actions.cells")
    return out | {"rate_verdict": verdict, "rate_verdict_reason": reason}


def mesh_error(problem, state: int, mode: int = 1, scheme: str = "sg") -> float | None:
    """Estimated relative discretisation error of ``ell_{state, mode}`` at ``Q*`` on a uniform 1D action mesh.

    The EAFE/SG gap converges at order 2 in ``h`` (``wpgflow study``: observed order 1.99 on LQR), so with ``ell_h``
    and ``ell_2h`` (the generator on every other node, the same ``Q*`` there) the error of ``ell_h`` is about
    ``(ell_2h - ell_h) / 3``; returned relative to ``ell_h``. None on meshes it does not apply to (2D meshes,
    non-uniform or odd-cell intervals: ``wpgflow study`` refines them). Cost: two tridiagonal eigen-solves.
    """
    mdp = problem.mdp
    space = mdp.space
    if not space.is_chain or (space.n_dofs - 1) % 2 or space.n_dofs < 9:
        return None
    x = space.coords[:, 0]
    h = np.diff(x)
    if np.ptp(h) > 1e-9 * abs(h[0]):
        return None
    coarse = interval_space(float(x[0]), float(x[-1]), (space.n_dofs - 1) // 2)
    g = potential(mdp, problem.optimum.Q[state:state + 1])
    values = []
    for sp_, gg in ((space, g), (coarse, g[:, ::2])):
        diag, coupling = symmetric_generator(sp_, gg, mdp.tau, scheme)
        values.append(state_modes(sp_, diag[0], coupling[0], mode)[0][mode])
    fine, rough = values
    return float((rough - fine) / 3.0 / fine) if fine > 0 else None
