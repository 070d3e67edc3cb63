"""The Wasserstein policy-gradient flow (math.md §3) and its time loop.

For every state ``s``, with ``Q = Q^{pi_t}`` re-evaluated from the current policy at all states,

    d_t p = div( tau grad p + p grad(tau U - Q) )      in A,     no flux on the boundary of A,

equivalently ``d_t p = tau div( G grad(p / G) )`` with ``G ∝ mu exp(Q / tau) = exp(g)``, ``g = Q/tau - U``.

**Space: edge-averaged P1 finite elements** (Xu-Zikatanov EAFE; the Scharfetter-Gummel scheme in 1D).
With ``u = p / exp(g)``, the flux from DOF ``j`` to ``k`` along a mesh edge is

    F_jk = tau omega_jk c_jk (u_j - u_k) = tau omega_jk ( B(-dg) p_j - B(dg) p_k ),   dg = g_k - g_j,

where ``omega_jk = -K_jk`` comes from the P1 stiffness matrix, ``B(x) = x / (e^x - 1)`` and ``c_jk`` is the
harmonic mean of ``e^g`` along the edge ("sg"), or ``c_jk = exp((g_j + g_k) / 2)`` with
``tau omega (e^{-dg/2} p_j - e^{dg/2} p_k)`` ("sqra"). Lumped masses ``m_j = w_j p_j`` evolve by
``dm/dt = L m`` with ``L`` an M-matrix whose columns sum to zero and which is in detailed balance with
the discrete Gibbs masses ``w_j G_j``.

**Time: implicit Euler with Q frozen over the step**, ``(I - dt L_n) m^{n+1} = m^n``. For every ``dt``:
mass is conserved (``1^T (I - dt L) = 1^T``), ``m^{n+1} >= 0`` (inverse M-matrix), the discrete Gibbs
policy of ``Q*`` is an exact fixed point (all fluxes vanish at ``u = const``), and ``V^{pi_n}`` is
non-decreasing at every state (the step is a Markov kernel with invariant ``G_n``; math.md §3).

The per-state systems share one sparsity pattern. ``I - dt L`` is a column diagonally dominant M-matrix, so
Gaussian elimination without pivoting is stable and keeps its sign structure (L and U factors are M-matrices,
all substitutions add non-negative terms): the solves are direct, mass is conserved to round-off and the
masses stay >= 0 in floating point. Two batched direct solvers (:func:`implicit_step`, ``method``):

* "banded": the block-diagonal banded matrix of a chunk of states in one LAPACK ``gbsv`` (no row interchange
  occurs, by the diagonal dominance). Cost ``O(N M bw^2)``; optimal for 1D (tridiagonal) and small 2D meshes.
* "sparse": a chunk of states as one block-diagonal CSC matrix, factorised by SuperLU with a fill-reducing
  ordering (minimum degree on ``A + A^T``) computed once per action space and reused for every state and
  step (``NATURAL`` column order on the pre-permuted matrix, ``diag_pivot_thresh = 0``). On 2D meshes the fill
  grows like ``M log M`` and the work like ``M^1.5`` per state; it wins above a bandwidth of about 32
  (``benchmarks/bench_2d_action.py``: 1.5x at 1000 DOFs, 4x at 4000 DOFs with 121 states).

Both process the states in chunks so that the working memory stays below :data:`SOLVE_CHUNK_BYTES`.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from . import bellman
from .fem import ActionSpace
from .mdp import MDP

SCHEMES = ("sg", "sqra")
SOLVE_METHODS = ("auto", "banded", "sparse")

#: Working memory of one chunk of per-state solves (banded storage incl. LAPACK's pivoting rows, or the CSC
#: matrix and its LU fill); states are processed in chunks below this size.
SOLVE_CHUNK_BYTES = 64 * 2 ** 20

#: "auto" uses the banded solver up to this bandwidth and for every 1D chain, SuperLU above
#: (measured crossover, benchmarks/bench_2d_action.py: bw 24 -> banded ahead, bw 46 -> sparse ahead).
BANDED_MAX_BANDWIDTH = 32


def bernoulli(x: np.ndarray) -> np.ndarray:
    """``B(x) = x / (e^x - 1)`` with ``B(0) = 1``, without overflow for large ``|x|``."""
    with np.errstate(over="ignore", invalid="ignore"):  # x / inf = 0 for x > 709; 0 / 0 patched below
        out = x / np.expm1(x)
    out[x == 0] = 1.0
    return out


def potential(mdp: MDP, Q: np.ndarray) -> np.ndarray:
    """``g = Q / tau + log mu`` (the log of the unnormalised Gibbs density), ``(N, M)``."""
    g = Q / mdp.tau
    g += mdp.log_mu
    return g


def edge_rates(space: ActionSpace, g: np.ndarray, tau: float, scheme: str = "sg") -> tuple[np.ndarray, np.ndarray]:
    """Flux coefficients per unit density: ``F_jk = fwd * p_j - bwd * p_k`` for each edge ``(j, k)``.

    Args:
        space: the action space (edges and conductances).
        g: ``(N, M)`` log Gibbs density (any per-state constant may be added).
        tau: temperature.
        scheme: "sg" (Scharfetter-Gummel / harmonic edge average) or "sqra" (geometric average).

    Returns:
        ``(fwd, bwd)``, each ``(N, E)`` and ``>= 0``, with ``fwd / bwd = exp(dg)`` (detailed balance).
    """
    j, k = space.edges[:, 0], space.edges[:, 1]
    dg = g[:, k] - g[:, j]
    scale = tau * space.conductance
    if scheme == "sg":
        return scale * bernoulli(-dg), scale * bernoulli(dg)
    if scheme == "sqra":
        return scale * np.exp(0.5 * dg), scale * np.exp(-0.5 * dg)
    raise ValueError(f"unknown scheme {scheme!r} (allowed: {', '.join(SCHEMES)})")


def generator(space: ActionSpace, g: np.ndarray, tau: float, scheme: str = "sg") -> sp.csr_matrix:
    """The generator ``L`` on masses for one state (``g`` of shape ``(M,)``): ``dm/dt = L m``."""
    fwd, bwd = edge_rates(space, g[None, :], tau, scheme)
    j, k = space.edges[:, 0], space.edges[:, 1]
    w = space.weights
    out_j, out_k = fwd[0] / w[j], bwd[0] / w[k]  # rate per unit mass leaving j towards k, and k towards j
    M = space.n_dofs
    L = sp.coo_matrix((np.concatenate([out_j, out_k]), (np.concatenate([k, j]), np.concatenate([j, k]))),
                      shape=(M, M)).tocsr()
    return L - sp.diags(np.asarray(L.sum(axis=0)).ravel())


def implicit_step(space: ActionSpace, masses: np.ndarray, g: np.ndarray, tau: float, dt: float,
                  scheme: str = "sg", method: str = "auto") -> np.ndarray:
    """One implicit Euler step ``m^{n+1} = (I - dt L)^{-1} m^n`` for all states at once (in chunks of states).

    Args:
        space: the action space.
        masses: ``(N, M)`` masses ``m_ij = w_j p_ij`` at ``t_n``.
        g: ``(N, M)`` log Gibbs density built from ``Q^{pi_n}`` (frozen over the step).
        tau: temperature.
        dt: step size.
        scheme: "sg" or "sqra" (:func:`edge_rates`).
        method: "banded", "sparse" (module docstring) or "auto": banded for 1D chains and bandwidths up to
            :data:`BANDED_MAX_BANDWIDTH`, sparse otherwise. Both are direct and agree to round-off.

    Returns:
        ``(N, M)`` masses at ``t_n + dt``.
    """
    return by_state_chunks(space, lambda m, gc: _implicit_step(space, m, gc, tau, dt, scheme, method), masses, g)


def by_state_chunks(space: ActionSpace, fn, *arrays: np.ndarray) -> np.ndarray:
    """``fn(*arrays)`` evaluated on consecutive chunks of states (rows), concatenated.

    Statewise edge computations hold several ``(N, E)`` arrays; chunks keep them (about 8 doubles per edge and
    DOF and state) below :data:`SOLVE_CHUNK_BYTES`, so memory does not grow with ``N`` (101 x 101 states x 1000
    DOFs would otherwise need ~5 GiB). Each row is computed by the same operations whatever the chunking.
    """
    chunks = _chunks(arrays[0].shape[0], 64 * (space.edges.shape[0] + space.n_dofs))
    if len(chunks) == 1:
        return fn(*arrays)
    return np.concatenate([fn(*(a[chunk] for a in arrays)) for chunk in chunks])


def _implicit_step(space: ActionSpace, masses: np.ndarray, g: np.ndarray, tau: float, dt: float, scheme: str,
                   method: str) -> np.ndarray:
    """:func:`implicit_step` on one chunk of states."""
    j, k = space.edges[:, 0], space.edges[:, 1]
    fwd, bwd = edge_rates(space, g, tau, scheme)
    w = space.weights
    out_j = dt * fwd / w[j]  # (N, E): rate of mass leaving j towards k, times dt
    out_k = dt * bwd / w[k]
    if method == "auto":
        method = "banded" if space.is_chain or space.bandwidth <= BANDED_MAX_BANDWIDTH else "sparse"
    if method == "banded":
        return _banded_solve(space, masses, out_j, out_k)
    if method == "sparse":
        return _sparse_solve(space, masses, out_j, out_k)
    raise ValueError(f"unknown method {method!r} (allowed: {', '.join(SOLVE_METHODS)})")


def _column_sums(space: ActionSpace, out_j: np.ndarray, out_k: np.ndarray) -> np.ndarray:
    """``1 + dt sum of the rates leaving each DOF``: the diagonal of ``I - dt L``, ``(N, M)``."""
    m = space.n_dofs
    return 1.0 + out_j @ incidence(space.edges[:, 0], m) + out_k @ incidence(space.edges[:, 1], m)


def _chunks(n: int, per_state_bytes: float):
    """Consecutive slices of ``range(n)`` whose working memory stays below :data:`SOLVE_CHUNK_BYTES`."""
    size = max(1, int(SOLVE_CHUNK_BYTES // max(per_state_bytes, 1.0)))
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _banded_solve(space: ActionSpace, masses: np.ndarray, out_j: np.ndarray, out_k: np.ndarray) -> np.ndarray:
    """Block-diagonal banded LAPACK solve (``gbsv``) per chunk of states; ``O(M bw^2)`` per state."""
    n, m = masses.shape
    bw = space.bandwidth
    j, k = space.edges[:, 0], space.edges[:, 1]
    new = np.empty_like(masses)
    for chunk in _chunks(n, (5 * bw + 2) * m * 8):  # ab, and gbsv's copy with bw extra rows
        c = chunk.stop - chunk.start
        ab = np.zeros((2 * bw + 1, c, m))
        oj, ok = out_j[chunk], out_k[chunk]
        if space.is_chain:  # 1D: edges (0, 1), (1, 2), ...; plain slices instead of scatters
            ab[bw] = 1.0
            ab[bw, :, :-1] += oj
            ab[bw, :, 1:] += ok
            ab[bw + 1, :, :-1] = -oj  # A[j + 1, j]
            ab[bw - 1, :, 1:] = -ok  # A[j, j + 1]
        else:
            ab[bw] = _column_sums(space, oj, ok)
            ab[bw + (k - j), :, j] = -oj.T  # A[k, j]
            ab[bw + (j - k), :, k] = -ok.T  # A[j, k]
        new[chunk] = sla.solve_banded((bw, bw), ab.reshape(2 * bw + 1, c * m), masses[chunk].ravel(),
                                      overwrite_ab=True, check_finite=False).reshape(c, m)
    return new


class _SparsePattern:
    """The CSC pattern of ``I - dt L`` for one state, in a fill-reducing DOF order, shared by all states.

    Attributes:
        perm: ``perm[x]`` is the position of DOF ``x`` in the fill-reducing order.
        order: gathers the values ``[diag (M), A[k, j] (E), A[j, k] (E)]`` into CSC order.
        indices, indptr: CSC row indices and column pointers of one block.
        fill: number of nonzeros of ``L + U`` for one block (memory estimate).
    """

    def __init__(self, space: ActionSpace):
        m = space.n_dofs
        j, k = space.edges[:, 0], space.edges[:, 1]
        # minimum degree on A + A^T, computed by SuperLU on a diagonally dominant matrix with this pattern
        probe = sp.csc_matrix((np.full(2 * j.size, -1.0), (np.concatenate([k, j]), np.concatenate([j, k]))),
                              shape=(m, m)) + sp.diags(np.full(m, 1.0 + np.bincount(space.edges.ravel(), minlength=m)))
        lu = spla.splu(sp.csc_matrix(probe), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                       options={"SymmetricMode": True})
        self.perm = lu.perm_c
        rows = self.perm[np.concatenate([np.arange(m), k, j])]
        cols = self.perm[np.concatenate([np.arange(m), j, k])]
        self.order = np.lexsort((rows, cols))
        self.indices = rows[self.order]
        self.indptr = np.searchsorted(cols[self.order], np.arange(m + 1))
        self.fill = lu.L.nnz + lu.U.nnz


_PATTERNS: dict[int, tuple[weakref.ref, _SparsePattern]] = {}


def _sparse_pattern(space: ActionSpace) -> _SparsePattern:
    """The :class:`_SparsePattern` of ``space``, built once per action space object."""
    entry = _PATTERNS.get(id(space))
    if entry is None or entry[0]() is not space:
        entry = (weakref.ref(space, lambda _, key=id(space): _PATTERNS.pop(key, None)), _SparsePattern(space))
        _PATTERNS[id(space)] = entry
    return entry[1]


def _sparse_solve(space: ActionSpace, masses: np.ndarray, out_j: np.ndarray, out_k: np.ndarray) -> np.ndarray:
    """SuperLU on the block-diagonal CSC matrix of a chunk of states, in the cached fill-reducing order."""
    n, m = masses.shape
    pat = _sparse_pattern(space)
    values = np.concatenate([_column_sums(space, out_j, out_k), -out_j, -out_k], axis=1)[:, pat.order]
    nnz = pat.indices.size
    rhs = np.empty_like(masses)
    rhs[:, pat.perm] = masses
    new = np.empty_like(masses)
    # values + indices of the CSC matrix and its LU; SuperLU's workspace (preallocated from its own fill guess)
    # measures ~10x that in resident memory (benchmarks/bench_memory.py), hence the factor
    for chunk in _chunks(n, 10 * ((2 * nnz + 2 * pat.fill) * 12 + 4 * m * 8)):
        c = chunk.stop - chunk.start
        blocks = np.arange(c)[:, None]
        indices = (pat.indices[None, :] + m * blocks).ravel()
        indptr = np.append((pat.indptr[:-1][None, :] + nnz * blocks).ravel(), nnz * c)
        A = sp.csc_matrix((values[chunk].ravel(), indices, indptr), shape=(c * m, c * m))
        lu = spla.splu(A, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
        new[chunk] = lu.solve(rhs[chunk].ravel()).reshape(c, m)
    return new[:, pat.perm]


def incidence(nodes: np.ndarray, m: int) -> sp.csr_matrix:
    """``(E, M)`` 0/1 matrix with a one at ``(e, nodes[e])``: ``x @ S`` sums edge values into nodes."""
    return sp.csr_matrix((np.ones(nodes.size), (np.arange(nodes.size), nodes)), shape=(nodes.size, m))


def dissipation(mdp: MDP, p: np.ndarray, g: np.ndarray, scheme: str = "sg") -> np.ndarray:
    """Discrete statewise dissipation ``D^h(s) = sum_edges F_jk (phi_k - phi_j) >= 0`` (math.md §4).

    ``phi = Q - tau log(p / mu) = tau (g - log p)``, so ``D^h = tau^2 sum omega c (u_j - u_k) log(u_j/u_k)``.
    Exact for the semi-discrete ODE: ``dJ/dt = rho^T (I - gamma P^pi)^{-1} D^h``. Densities that underflowed
    to zero are floored at the smallest normal double inside the logarithm.
    """
    j, k = mdp.space.edges[:, 0], mdp.space.edges[:, 1]

    def chunk(p, g):
        fwd, bwd = edge_rates(mdp.space, g, mdp.tau, scheme)
        flux = fwd * p[:, j] - bwd * p[:, k]
        phi = mdp.tau * (g - np.log(np.maximum(p, np.finfo(float).tiny)))
        return np.sum(flux * (phi[:, k] - phi[:, j]), axis=1)

    return by_state_chunks(mdp.space, chunk, p, g)


@dataclass
class FlowState:
    """One point of the flow: ``p`` at time ``t``, reached by a step of size ``dt`` (0 at the start).

    Attributes:
        step: step index (0 for the initial policy).
        t: time.
        dt: size of the step that produced this state.
        p: ``(N, M)`` policy density.
        evaluation: soft policy evaluation of ``p`` (``V``, ``Q`` and the LU for adjoint solves).
        g: ``(N, M)`` log Gibbs density of ``Q`` (the potential of the next step).
        rejected: steps rejected by the adaptive controller before this one was accepted.
    """

    step: int
    t: float
    dt: float
    p: np.ndarray
    evaluation: bellman.Evaluation
    g: np.ndarray
    rejected: int = 0


class NumericalError(RuntimeError):
    """A flow produced non-finite values."""


@dataclass(frozen=True)
class Adaptive:
    """Step-size control for implicit Euler.

    The local error is estimated from successive mass increments,
    ``err = max_s 1/2 || dm^n - (dt_n / dt_{n-1}) dm^{n-1} ||_1`` (``~ dt^2 |m''|``, a total-variation
    distance). A step with ``err > tol`` is redone with a smaller ``dt``; after an accepted step
    ``dt <- dt * clip(0.9 sqrt(tol / err), 0.5, 2)``, capped at ``dt_max``. Since every step is monotone
    and positive, the controller is about accuracy only.
    """

    tol: float = 1e-3
    dt_max: float = math.inf


def wasserstein_flow(mdp: MDP, p0: np.ndarray, dt: float, scheme: str = "sg", adaptive: Adaptive | None = None,
                     t_end: float = math.inf, partition=None) -> Iterator[FlowState]:
    """Yield the implicit-Euler WPG flow ``p^0, p^1, ...`` from ``p0`` (forever, or until ``t_end``).

    The generator only steps; recording, progress and stopping rules belong to its consumer, which must do its
    adjoint solves with a state's ``evaluation.resolvent`` before it asks for the next state (the generator
    then releases it: for large state grids ``P^pi`` is the largest array of a step). With a
    :class:`solver.parallel.Partition` (MPI over states) each rank steps its own rows and the masses are
    gathered, so every yielded state holds the full ``p``, ``V``, ``Q`` and ``g`` on every rank.

    Raises:
        NumericalError: if a step produces non-finite values.
    """
    space = mdp.space
    rows = slice(None) if partition is None else partition.rows
    p = p0
    t, n = 0.0, 0
    ev = _evaluate_checked(mdp, p, n, t, partition)
    g = potential(mdp, ev.Q)
    yield FlowState(step=0, t=0.0, dt=0.0, p=p, evaluation=ev, g=g)
    masses = p[rows] * space.weights  # this rank's rows (all rows without a partition)
    previous_increment, previous_dt = None, None
    while t < t_end * (1 - 1e-12):
        rejected = 0
        while True:
            # fixed steps land on t = n dt exactly, without accumulating round-off in t
            t_new = min(t + dt if adaptive is not None else (n + 1) * dt, t_end)
            h = t_new - t
            new_masses = implicit_step(space, masses, g[rows], mdp.tau, h, scheme)
            if adaptive is None:
                break
            increment = new_masses - masses
            if previous_increment is None:
                break
            err = 0.5 * np.max(np.sum(np.abs(increment - (h / previous_dt) * previous_increment), axis=1))
            err = err if partition is None else partition.max(err)
            factor = 0.9 * math.sqrt(adaptive.tol / err) if err > 0 else 2.0
            if err <= adaptive.tol or h <= 1e-12 * max(1.0, t):
                dt = min(adaptive.dt_max, h * min(2.0, max(0.5, factor)))
                break
            dt = h * max(0.2, factor)
            rejected += 1
        if adaptive is not None:
            previous_increment, previous_dt = increment, h
        masses = new_masses
        p = (masses if partition is None else partition.gather(masses)) / space.weights
        t = t_new
        n += 1
        ev.resolvent.release()  # the previous state's P^pi: not needed once the flow moves on
        ev = _evaluate_checked(mdp, p, n, t, partition)
        g = potential(mdp, ev.Q)
        yield FlowState(step=n, t=t, dt=h, p=p, evaluation=ev, g=g, rejected=rejected)


def _evaluate_checked(mdp: MDP, p: np.ndarray, step: int, t: float, partition=None) -> bellman.Evaluation:
    """Policy evaluation, refusing non-finite policies, values or a singular Bellman system."""
    where = f"at step {step} (t = {t:.6g})"
    if not np.all(np.isfinite(p)):
        raise NumericalError(f"non-finite values in the policy {where}")
    try:
        ev = bellman.evaluate(mdp, p, partition)
    except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:  # singular or non-finite I - gamma P^pi
        raise NumericalError(f"policy evaluation failed {where}: {exc}") from None
    if not (np.all(np.isfinite(ev.V)) and np.all(np.isfinite(ev.Q))):
        raise NumericalError(f"non-finite values in V or Q {where}")
    return ev
