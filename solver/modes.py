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
:data:`MODES_PER_STATE` slowest non-zero modes of every state from a policy (the last one of a run), the
ratio of their full sum ``(tau / 2) sum_s W_s chi^2_s`` to the gap (1 in the linear regime; far from 1 when the
policy is not yet near ``pi*``, e.g. ``log(p / pi*) ~ 100`` in the action tails after a uniform start), and the
slowest mode overall and the slowest *excited* mode: a mode is excited when its term is at least
:data:`EXCITED_SHARE` of the largest. The asymptotic rate is that of the slowest excited mode; symmetric starts
leave odd modes unexcited (a centred Ornstein-Uhlenbeck start decays at ``4k``, not ``2k``).

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
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.special import ndtr

from . import bellman, budget
from .fem import ActionSpace
from .flows.base import potential
from .flows.fokker_planck import edge_rates, incidence
from .mdp import MDP

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


def symmetric_generator(space: ActionSpace, g: np.ndarray, tau: float, scheme: str = "sg"
                        ) -> tuple[np.ndarray, np.ndarray]:
    """The symmetrised frozen generator ``S = G^{-1/2} (-L) G^{1/2}`` of a chunk of states.

    Args:
        g: ``(n, M)`` log Gibbs potentials (:func:`solver.flows.base.potential`).

    Returns:
        ``(diag, coupling)``: ``(n, M)`` diagonal (total exit rate of each DOF) and ``(n, E)`` off-diagonal
        ``S_jk = S_kj = -sqrt(fwd bwd) / sqrt(w_j w_k)`` on the edges ``(j, k)`` of ``space``; ``S`` is
        symmetric positive semi-definite with the kernel ``sqrt(G)``.
    """
    fwd, bwd = edge_rates(space, g, tau, scheme)
    j, k = space.edges[:, 0], space.edges[:, 1]
    w = space.weights
    coupling = -np.sqrt(fwd * bwd) / np.sqrt(w[j] * w[k])
    diag = fwd @ incidence(j, space.n_dofs) / w + bwd @ incidence(k, space.n_dofs) / w
    return diag, coupling


def state_modes(space: ActionSpace, diag: np.ndarray, coupling: np.ndarray, count: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The ``count + 1`` smallest eigenpairs of one state's ``S`` (:func:`symmetric_generator`).

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
        slowest_excited: ``(state, ell, mode index)`` of the slowest excited mode, or None if no computed mode
            carries any of the gap.
        dominant: ``(state, ell, mode index)`` of the mode with the largest term (what the local rate is
            approaching at the end of the run while a slower excited mode is still emerging), or None.
    """

    ell: np.ndarray
    terms: np.ndarray
    gap_shares: np.ndarray
    linear_ratio: float
    gap: float
    slowest: tuple[int, float]
    slowest_excited: tuple[int, float, int] | None
    dominant: tuple[int, float, int] | None = None

    @property
    def linear(self) -> bool:
        """The policy is in the linear regime, where the modes describe ``J* - J``."""
        return math.isfinite(self.linear_ratio) and abs(self.linear_ratio - 1.0) <= LINEAR_TOLERANCE

    def slowest_excited_among(self, states: np.ndarray) -> tuple[int, float, int] | None:
        """The slowest excited mode (share of the largest term overall) among the states ``states`` (bool ``(N,)``)."""
        largest = float(np.max(self.terms)) if np.all(np.isfinite(self.terms)) else math.inf
        if not 0 < largest < math.inf:
            return None
        masked = np.where((self.terms >= EXCITED_SHARE * largest) & states[:, None], self.ell, np.inf)
        if not np.isfinite(masked).any():
            return None
        s, k = np.unravel_index(int(np.argmin(masked)), masked.shape)
        return int(s), float(self.ell[s, k]), int(k) + 1

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
    count = min(count, mdp.n_actions - 2)
    log_w = np.log(w)
    chi2, kl = np.empty(n), np.empty(n)
    for rows in budget.chunks(n, 8 * 8 * mdp.n_actions):
        log_G = bellman.log_gibbs(mdp, optimum.Q[rows])[0]
        x = _deviation(p[rows], log_w, log_G)
        chi2[rows] = np.einsum("ij,ij->i", x, x)
        kl[rows] = bellman.kl_divergence(mdp, p[rows], log_G)
    gap_shares = mdp.tau * d_star * kl / (1.0 - mdp.gamma)
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
    slowest_excited = dominant = None
    largest = float(np.max(terms)) if np.all(np.isfinite(terms)) else math.inf
    if 0 < largest < math.inf:
        excited = terms >= EXCITED_SHARE * largest
        masked = np.where(excited, ell, np.inf)
        s, k = np.unravel_index(int(np.argmin(masked)), masked.shape)
        slowest_excited = (int(s), float(ell[s, k]), int(k) + 1)
        s, k = np.unravel_index(int(np.argmax(terms)), terms.shape)
        dominant = (int(s), float(ell[s, k]), int(k) + 1)
    return ModeReport(ell=ell, terms=terms, gap_shares=gap_shares, linear_ratio=linear_ratio, gap=gap,
                      slowest=slowest, slowest_excited=slowest_excited, dominant=dominant)


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


#: ``resolved`` needs the fit within this (relative) of the slowest excited mode's rate (the bar ``wpgflow study``
#: uses for "resolved" too; measured agreement on resolved runs: 0.06% to 0.7%).
RESOLVED_TOLERANCE = 0.02

#: A boundary-affected slowest excited mode makes the rate ``domain-sensitive`` only if the slowest excited mode of
#: the unaffected states gives a rate further than this (relative) from it.
DOMAIN_TOLERANCE = 0.01

RATE_VERDICTS = ("resolved", "transient", "domain-sensitive")


def rate_summary(problem, p: np.ndarray | None, flow, fit, ell: np.ndarray | None = None,
                 gap: float | None = None) -> dict:
    """The rate verdict keys of ``summary.json`` (README, "Trusting the numbers").

    Args:
        problem: the :class:`solver.runner.Problem`.
        p: ``(N, M)`` the last policy of the run (None: no flow state).
        flow: the run's :class:`solver.flows.base.Flow` (its ``predicted_rate(ell)`` turns a gap into a rate).
        fit: the :class:`solver.diagnostics.RateFit` of the run, or None.
        ell: ``(N,)`` the generator gaps at ``Q*`` if already computed; gap: ``J* - J`` of ``p`` if known.

    Returns:
        ``rate_status``, ``rate_local_last``, ``rate_local_spread``; for the WPG flow (``wasserstein``) with
        more than one action DOF also ``predicted_rate_excited``, ``slowest_state``, ``slowest_excited_state``,
        ``slowest_excited_mode``, ``predicted_rate_dominant``, ``dominant_state``, ``gap_state``,
        ``modes_linear_ratio`` and ``boundary_affected_states`` (the
        excited-mode keys are None when the last policy is not in the linear regime: the modes do not describe
        the gap there);
        ``rate_verdict`` (one of :data:`RATE_VERDICTS`, None without a fit) and ``rate_verdict_reason``.

    The verdict: ``domain-sensitive`` if the state that sets the rate (the slowest excited mode's state in the
    linear regime, else the state holding most of the gap) is boundary-affected (:func:`boundary_report`) and,
    in the linear regime, the unaffected states' slowest excited mode is more than :data:`DOMAIN_TOLERANCE` away
    (or there is none). Otherwise ``resolved`` if the fit is asymptotic (``rate_status``) and within
    :data:`RESOLVED_TOLERANCE` of the slowest excited mode's rate (outside the linear regime, where the modes do
    not describe the gap: of ``predicted_rate``, the slowest mode's), else ``transient``.
    """
    out: dict = {"rate_status": fit.status if fit else None,
                 "rate_local_last": fit.local_last if fit else None,
                 "rate_local_spread": fit.local_spread if fit and math.isfinite(fit.local_spread) else None}
    verdict, reason = None, "no rate was fitted (fewer than three positive gaps)"
    if fit is not None:
        verdict = "resolved" if fit.status == "asymptotic" else "transient"
        reason = (f"the local rate varies by {100 * fit.local_spread:.2g}% over the fit window"
                  if math.isfinite(fit.local_spread) else "too few points in the fit window to measure the local rate")
        reason_settled = reason
    mdp = problem.mdp
    if flow.kind == "wasserstein" and mdp.n_actions > 2 and p is not None:
        report = analyse(mdp, problem.optimum, p, problem.config.flow.scheme, gap=gap, ell_star=ell)
        boundary = boundary_report(problem, p)
        affected = boundary["affected"]
        excited = report.slowest_excited if report.linear else None
        dominant = report.dominant if report.linear else None
        out |= {"predicted_rate_excited": flow.predicted_rate(excited[1]) if excited else None,
                "predicted_rate_dominant": flow.predicted_rate(dominant[1]) if dominant else None,
                "dominant_state": dominant[0] if dominant else None,
                "slowest_state": report.slowest[0], "slowest_excited_state": excited[0] if excited else None,
                "slowest_excited_mode": excited[2] if excited else None, "gap_state": report.gap_state,
                "modes_linear_ratio": report.linear_ratio if math.isfinite(report.linear_ratio) else None,
                "boundary_affected_states": affected}
        if fit is not None:
            setting = excited[0] if excited else report.gap_state
            predicted = out["predicted_rate_excited"]
            domain = setting in affected
            if excited and domain:
                # the truncation matters only if it moves the rate: compare with the states it does not affect
                clear = np.ones(mdp.n_states, bool)
                clear[affected] = False
                inner = report.slowest_excited_among(clear)
                if inner is not None and abs(flow.predicted_rate(inner[1]) / predicted - 1) <= DOMAIN_TOLERANCE:
                    domain = False  # the unaffected states set the same rate
            if domain:
                verdict = "domain-sensitive"
                why = []
                if boundary["action_boundary_mass"][setting] > BOUNDARY_MASS:
                    why.append(f"pi* has mass {boundary['action_boundary_mass'][setting]:.1e} near the action "
                               "boundary")
                if boundary["kernel_loss"][setting] > BOUNDARY_MASS:
                    why.append(f"its transitions lose {boundary['kernel_loss'][setting]:.1e} of their mass to the "
                               "state-grid cut")
                if boundary["cut_share"][setting] >= CUT_SHARE:
                    why.append(f"{100 * min(1.0, boundary['cut_share'][setting]):.0f}% of its deviation from pi* "
                               "sits at actions whose transitions the state grid cuts")
                where = ("the slowest excited mode" if excited else
                         f"most of the gap (the last policy is not in the linear regime: (tau/2) sum W chi^2 = "
                         f"{report.linear_ratio:.2g} x the gap)")
                reason = f"{where} sits at state {setting}, which the truncated domain affects: {'; '.join(why)}"
                if fit.status == "transient":
                    reason += f"; also transient: {reason_settled}"
            elif not report.linear:
                slowest_rate = flow.predicted_rate(report.slowest[1])
                nonlinear = (f"the last policy is not yet in the linear regime ((tau/2) sum W chi^2 is "
                             f"{report.linear_ratio:.3g} x the gap; most of the gap at state {setting})")
                if (fit.status == "asymptotic" and slowest_rate
                        and abs(fit.rate / slowest_rate - 1) <= RESOLVED_TOLERANCE):
                    # the action tails are still far (chi^2 explodes there) but carry no rate of their own
                    reason = (f"the local rate varies by {100 * fit.local_spread:.2g}% over the fit window and the "
                              f"fit is within {100 * RESOLVED_TOLERANCE:g}% of the slowest mode; {nonlinear}, "
                              "so the modes were not used")
                else:
                    verdict = "transient"
                    reason = f"{nonlinear}; {reason}"
            elif fit.status == "asymptotic" and predicted and abs(fit.rate / predicted - 1) > RESOLVED_TOLERANCE:
                verdict = "transient"
                reason = (f"the fit {fit.rate:.5g} is {100 * abs(fit.rate / predicted - 1):.2g}% from the slowest "
                          f"excited mode's rate {predicted:.5g}: the fit window mixes modes")
            elif verdict == "resolved":
                reason = (f"the local rate varies by {100 * fit.local_spread:.2g}% over the fit window and the fit "
                          f"is within {100 * RESOLVED_TOLERANCE:g}% of the slowest excited mode (state {setting}"
                          + (f", boundary-affected, but the unaffected states' slowest excited mode gives the same "
                             f"rate within {100 * DOMAIN_TOLERANCE:g}%)" if setting in affected else ")"))
        fast = out["predicted_rate_dominant"]
        if fit is not None and excited and fast and abs(fast / out["predicted_rate_excited"] - 1) > DOMAIN_TOLERANCE:
            reason += (f"; the largest part of the gap is still in a faster mode (state {dominant[0]}, mode "
                       f"{dominant[2]}, rate {fast:.5g}) while the slowest excited one (rate "
                       f"{out['predicted_rate_excited']:.5g}) emerges")
    out |= {"rate_verdict": verdict, "rate_verdict_reason": reason}
    return out
