"""The discrete Fokker-Planck generator of the WPG flow (theory.md §3) and its batched implicit Euler step.

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

**Time: implicit Euler with Q frozen over the step** (used by :mod:`solver.flows.wasserstein`),
``(I - dt L_n) m^{n+1} = m^n``. For every ``dt``: mass is conserved (``1^T (I - dt L) = 1^T``),
``m^{n+1} >= 0`` (inverse M-matrix), the discrete Gibbs policy of ``Q*`` is an exact fixed point (all fluxes
vanish at ``u = const``), and ``V^{pi_n}`` is non-decreasing at every state (the step is a Markov kernel with
invariant ``G_n``; theory.md §3). **Or exponential**, ``m^{n+1} = exp(dt L_n) m^n`` (:func:`exponential_step`,
by uniformisation), with the same four properties for every ``dt`` and no time error for a frozen ``Q``.

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

Both process the states in chunks so that the working memory stays below :data:`solver.budget.SOLVE_CHUNK_BYTES`.
On a 1D chain with at least :data:`solver.parallel.COMPILED_MIN_ENTRIES` (state, DOF) pairs, "banded" runs a
compiled Thomas sweep instead (:func:`_thomas_chain`, numba through :func:`solver.parallel.compiled`; the same
elimination without pivoting, 3.7x faster on lqr_1d), and LAPACK where numba is absent or ``WPGFLOW_NUMBA=0``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .. import budget
from ..bellman import policy_log
from ..fem import ActionSpace
from ..mdp import MDP
from ..parallel import COMPILED_MIN_ENTRIES, compiled, single_threaded_blas

SCHEMES = ("sg", "sqra")
SOLVE_METHODS = ("auto", "banded", "sparse")

#: "auto" uses the banded solver up to this bandwidth and for every 1D chain, SuperLU above
#: (measured crossover, benchmarks/bench_2d_action.py: bw 24 -> banded ahead, bw 46 -> sparse ahead).
BANDED_MAX_BANDWIDTH = 32


#: Below this ``|x|``, :func:`bernoulli` sums its Taylor series ``B(x) = 1 - x/2 + sum_k B_2k x^2k / (2k)!`` (the
#: Bernoulli numbers, through ``x^14``: the first term left out is ``< 6e-18`` there); above, ``x / (e^x - 1)``,
#: where ``e^x - 1`` loses no more than two bits to the subtraction (``e^x / (e^x - 1) <= 2.6``). One ``exp`` per
#: edge instead of ``expm1`` (libm's ``expm1`` is ~3x the cost of its ``exp``: ~0.3 ms per lqr_1d step).
BERNOULLI_SERIES_BELOW = 0.5
_B2, _B4, _B6, _B8 = 1.0 / 12.0, -1.0 / 720.0, 1.0 / 30240.0, -1.0 / 1209600.0
_B10, _B12, _B14 = 1.0 / 47900160.0, -691.0 / 1307674368000.0, 1.0 / 74724249600.0


def _bernoulli_series(x):
    """The Taylor series of :func:`bernoulli` (the compiled :func:`_sg_chain_rates_dissipation` repeats its
    operations)."""
    y = x * x
    return 1.0 - 0.5 * x + y * (_B2 + y * (_B4 + y * (_B6 + y * (_B8 + y * (_B10 + y * (_B12 + y * _B14))))))


def bernoulli(x: np.ndarray) -> np.ndarray:
    """``B(x) = x / (e^x - 1)`` with ``B(0) = 1``, without overflow for large ``|x|``, to ~2 ulp
    (:data:`BERNOULLI_SERIES_BELOW`; tests/test_fast_paths.py against an extended-precision ``expm1``)."""
    with np.errstate(over="ignore", invalid="ignore"):  # the series of a far x is overwritten; x / inf = 0 (x > 709)
        out = _bernoulli_series(x)  # everywhere, then the far entries (a minority on resolved meshes)
        far = np.abs(x) >= BERNOULLI_SERIES_BELOW
        x_far = x[far]
        out[far] = x_far / (np.exp(x_far) - 1.0)
    return out


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
    dg = g[:, 1:] - g[:, :-1] if space.is_chain else g[:, k] - g[:, j]  # a chain's edges are (0, 1), (1, 2), ...
    scale = tau * space.conductance
    if scheme == "sg":  # one exponential per edge: B(-x) = x + B(x), evaluated at |x| (no cancellation)
        small = bernoulli(np.abs(dg))  # B(|dg|) <= 1; B(-|dg|) = |dg| + B(|dg|) >= 1
        # fwd = B(-dg): large where dg > 0, else small; bwd = B(dg). Branch-free and bit for bit the same:
        # small + max(dg, 0) is small + |dg| = large where dg > 0 and small + 0 = small elsewhere
        fwd = np.maximum(dg, 0.0)
        fwd += small
        np.negative(dg, out=dg)
        np.maximum(dg, 0.0, out=dg)
        dg += small
        fwd *= scale
        dg *= scale
        return fwd, dg
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
                  scheme: str = "sg", method: str = "auto",
                  rates: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
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
        rates: the :func:`edge_rates` of ``g`` ``(N, E)`` each, when the caller has them already (the flow keeps
            those of its dissipation, computed from the same ``g``).

    Returns:
        ``(N, M)`` masses at ``t_n + dt``.
    """
    if rates is not None:
        return budget.by_state_chunks(
            space, lambda m, gc, f, b: _implicit_step(space, m, gc, tau, dt, scheme, method, (f, b)), masses, g, *rates)
    return budget.by_state_chunks(space, lambda m, gc: _implicit_step(space, m, gc, tau, dt, scheme, method), masses, g)


def _implicit_step(space: ActionSpace, masses: np.ndarray, g: np.ndarray, tau: float, dt: float, scheme: str,
                   method: str, rates: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """:func:`implicit_step` on one chunk of states."""
    j, k = space.edges[:, 0], space.edges[:, 1]
    fwd, bwd = edge_rates(space, g, tau, scheme) if rates is None else rates
    w = space.weights
    if method == "auto":
        method = "banded" if space.is_chain or space.bandwidth <= BANDED_MAX_BANDWIDTH else "sparse"
    if method == "banded" and masses.size >= COMPILED_MIN_ENTRIES and space.is_chain and masses.shape[1] > 1:
        thomas = compiled(_thomas_chain, THOMAS_SIGNATURE)
        if thomas is not None:  # the compiled chain solve (same matrix, no pivoting as gbsv here)
            new = np.empty_like(masses)
            thomas(np.ascontiguousarray(fwd), np.ascontiguousarray(bwd), dt / w, np.ascontiguousarray(masses), new)
            return new
    out_j = dt * fwd / w[j]  # (N, E): rate of mass leaving j towards k, times dt
    out_k = dt * bwd / w[k]
    if method == "banded":
        return _banded_solve(space, masses, out_j, out_k)
    if method == "sparse":
        return _sparse_solve(space, masses, out_j, out_k)
    raise ValueError(f"unknown method {method!r} (allowed: {', '.join(SOLVE_METHODS)})")


#: States per block of the compiled chain solve (:func:`_thomas_chain`): their recurrences run side by side.
THOMAS_BLOCK = 16

THOMAS_SIGNATURE = "void(f8[:, ::1], f8[:, ::1], f8[::1], f8[:, ::1], f8[:, ::1])"


def _thomas_chain(fwd, bwd, dt_w, masses, new):
    """Compiled (:func:`solver.parallel.compiled`) implicit Euler step ``(I - dt L) m' = m`` on a 1D chain.

    ``fwd``, ``bwd``: ``(N, M - 1)`` edge rates; ``masses``, ``new``: ``(N, M)``.
    ``out_j = fwd_e dt_w[e]``, ``out_k = bwd_e dt_w[e + 1]`` (edge ``e = (e, e + 1)``, ``dt_w = dt / w``: one
    division per row, the pivot's; ``out_*`` differ from the numpy path's ``dt fwd / w`` by an ulp); DOF ``j``
    of a state: ``A[j, j] = 1 + out_j[j] + out_k[j - 1]`` (the terms that exist), ``A[j + 1, j] = -out_j[j]``,
    ``A[j, j + 1] = -out_k[j]``. The Thomas algorithm without pivoting, as LAPACK's ``gbsv`` takes it here (``A``
    is a column diagonally dominant M-matrix: no row interchange, pivots ``>= 1``): the multipliers are ``<= 0``
    and the eliminated right-hand side ``>= 0``, so ``m' >= 0`` in floating point, and the result equals the
    banded solve to round-off. Blocks of :data:`THOMAS_BLOCK` states are swept together, copied DOF-major into
    ``(M, block)`` buffers first, so that the independent recurrences of a block are one vector operation per DOF
    (divisions included): 1.5x faster than sweeping them in place, and 3x faster than one state after the other.
    """
    n, m = masses.shape
    F, B = np.empty((m, THOMAS_BLOCK)), np.empty((m, THOMAS_BLOCK))  # the block's rates, DOF-major
    X, C = np.empty((m, THOMAS_BLOCK)), np.empty((m, THOMAS_BLOCK))  # its masses -> m', eliminated upper diagonal
    for a in range(0, n, THOMAS_BLOCK):
        nb = min(n, a + THOMAS_BLOCK) - a
        for i in range(nb):
            for j in range(m - 1):
                F[j, i] = fwd[a + i, j]
                B[j, i] = bwd[a + i, j]
            for j in range(m):
                X[j, i] = masses[a + i, j]
        for i in range(nb):  # DOF 0
            inv = 1.0 / (1.0 + F[0, i] * dt_w[0])
            C[0, i] = (B[0, i] * dt_w[1]) * inv  # minus the eliminated upper diagonal, >= 0
            X[0, i] = X[0, i] * inv
        for j in range(1, m - 1):
            before, here, after = dt_w[j - 1], dt_w[j], dt_w[j + 1]
            for i in range(nb):
                low = F[j - 1, i] * before  # -A[j, j - 1] >= 0
                inv = 1.0 / (1.0 + B[j - 1, i] * here + F[j, i] * here - low * C[j - 1, i])  # >= 1
                C[j, i] = (B[j, i] * after) * inv
                X[j, i] = (X[j, i] + low * X[j - 1, i]) * inv
        j = m - 1
        for i in range(nb):  # last DOF: no edge to the right
            low = F[j - 1, i] * dt_w[j - 1]
            X[j, i] = (X[j, i] + low * X[j - 1, i]) / (1.0 + B[j - 1, i] * dt_w[j] - low * C[j - 1, i])
        for j in range(m - 2, -1, -1):
            for i in range(nb):
                X[j, i] += C[j, i] * X[j + 1, i]
        for i in range(nb):
            for j in range(m):
                new[a + i, j] = X[j, i]


def _column_sums(space: ActionSpace, out_j: np.ndarray, out_k: np.ndarray) -> np.ndarray:
    """``1 + dt sum of the rates leaving each DOF``: the diagonal of ``I - dt L``, ``(N, M)``."""
    inc_j, inc_k = space.incidences
    return 1.0 + out_j @ inc_j + out_k @ inc_k


def _banded_solve(space: ActionSpace, masses: np.ndarray, out_j: np.ndarray, out_k: np.ndarray) -> np.ndarray:
    """Block-diagonal banded LAPACK solve (``gbsv``) per chunk of states; ``O(M bw^2)`` per state."""
    n, m = masses.shape
    bw = space.bandwidth
    j, k = space.edges[:, 0], space.edges[:, 1]
    new = np.empty_like(masses)
    for chunk in budget.chunks(n, (5 * bw + 2) * m * 8):  # ab, and gbsv's copy with bw extra rows
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
    for chunk in budget.chunks(n, 10 * ((2 * nnz + 2 * pat.fill) * 12 + 4 * m * 8)):
        c = chunk.stop - chunk.start
        blocks = np.arange(c)[:, None]
        indices = (pat.indices[None, :] + m * blocks).ravel()
        indptr = np.append((pat.indptr[:-1][None, :] + nnz * blocks).ravel(), nnz * c)
        A = sp.csc_matrix((values[chunk].ravel(), indices, indptr), shape=(c * m, c * m))
        lu = spla.splu(A, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
        new[chunk] = lu.solve(rhs[chunk].ravel()).reshape(c, m)
    return new[:, pat.perm]


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
    inc_j, inc_k = space.incidences
    diag = fwd @ inc_j / w + bwd @ inc_k / w
    return diag, coupling


def dissipation(mdp: MDP, p: np.ndarray, g: np.ndarray, scheme: str = "sg",
                rates: tuple[np.ndarray, np.ndarray] | None = None, log_p: np.ndarray | None = None) -> np.ndarray:
    """Discrete statewise dissipation ``D^h(s) = sum_edges F_jk (phi_k - phi_j) >= 0`` (theory.md §4).

    ``phi = Q - tau log(p / mu) = tau (g - log p)``, so ``D^h = tau^2 sum omega c (u_j - u_k) log(u_j/u_k)``.
    Exact for the semi-discrete ODE: ``dJ/dt = rho^T (I - gamma P^pi)^{-1} D^h``. Densities that underflowed
    to zero are floored at the smallest normal double inside the logarithm. ``rates``: the :func:`edge_rates`
    of ``g`` when the caller has them (a frozen generator; then no chunking). ``log_p``: that floored logarithm
    when the caller has it (:attr:`solver.bellman.Evaluation.log_p`; only with ``rates``). On a 1D chain the
    edge differences are slices instead of gathers (the same numbers).
    """
    space = mdp.space
    j, k = space.edges[:, 0], space.edges[:, 1]

    def chunk(p, g, rates=None, log_p=None):
        fwd, bwd = edge_rates(space, g, mdp.tau, scheme) if rates is None else rates
        phi = g - (policy_log(p) if log_p is None else log_p)
        phi *= mdp.tau
        if space.is_chain:  # edges (0, 1), (1, 2), ...
            flux = fwd * p[:, :-1]
            flux -= bwd * p[:, 1:]
            flux *= phi[:, 1:] - phi[:, :-1]
            return flux.sum(axis=1)
        flux = fwd * p[:, j] - bwd * p[:, k]
        return np.sum(flux * (phi[:, k] - phi[:, j]), axis=1)

    if rates is not None:
        return chunk(p, g, rates, log_p)
    return budget.by_state_chunks(space, chunk, p, g)


def rates_and_dissipation(mdp: MDP, p: np.ndarray, g: np.ndarray, scheme: str = "sg",
                          log_p: np.ndarray | None = None) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """``(edge_rates(g), dissipation(p, g))`` of one block of states (no chunking), the rates kept by the caller
    for the next implicit step from the same state.

    On a 1D chain with the SG scheme, the floored ``log p`` given and at least
    :data:`solver.parallel.COMPILED_MIN_ENTRIES` (state, DOF) pairs, one compiled pass computes both
    (:func:`_sg_chain_rates_dissipation`: the rates bit for bit as :func:`edge_rates`, ``D`` to round-off, its
    sum taken in edge order instead of numpy's pairwise order); else :func:`edge_rates` and :func:`dissipation`.
    """
    space = mdp.space
    if scheme == "sg" and log_p is not None and p.size >= COMPILED_MIN_ENTRIES and space.is_chain:
        fused = compiled(_sg_chain_rates_dissipation, FUSED_SIGNATURE)
        if fused is not None:
            e = space.n_dofs - 1
            fwd, bwd, D = np.empty((p.shape[0], e)), np.empty((p.shape[0], e)), np.empty(p.shape[0])
            fused(np.ascontiguousarray(g), np.ascontiguousarray(p), np.ascontiguousarray(log_p),
                  np.ascontiguousarray(mdp.tau * space.conductance), float(mdp.tau), fwd, bwd, D)
            return (fwd, bwd), D
    rates = edge_rates(space, g, mdp.tau, scheme)
    return rates, dissipation(mdp, p, g, scheme, rates, log_p)


FUSED_SIGNATURE = "void(f8[:, ::1], f8[:, ::1], f8[:, ::1], f8[::1], f8, f8[:, ::1], f8[:, ::1], f8[::1])"


def _sg_chain_rates_dissipation(g, p, log_p, scale, tau, fwd, bwd, out):
    """Compiled SG edge rates and statewise dissipation on a 1D chain (:func:`rates_and_dissipation`).

    Per edge ``e = (e, e + 1)``: ``x = |dg|``, ``B(x)`` as :func:`bernoulli`, ``fwd = (B + max(dg, 0)) scale``,
    ``bwd = (B + max(-dg, 0)) scale`` (the operations of :func:`edge_rates`), and
    ``D += (fwd p_e - bwd p_{e+1}) (phi_{e+1} - phi_e)`` with ``phi = tau (g - log p)`` (:func:`dissipation`).
    """
    n, m = g.shape
    for i in range(n):
        total = 0.0
        phi = (g[i, 0] - log_p[i, 0]) * tau
        for e in range(m - 1):
            dg = g[i, e + 1] - g[i, e]
            x = abs(dg)
            if x < BERNOULLI_SERIES_BELOW:  # the same operations as bernoulli's
                y = x * x
                small = 1.0 - 0.5 * x + y * (_B2 + y * (_B4 + y * (_B6 + y * (_B8 + y * (_B10 + y * (
                    _B12 + y * _B14))))))
            else:
                small = x / (math.exp(x) - 1.0)
            f = (max(dg, 0.0) + small) * scale[e]
            b = (max(-dg, 0.0) + small) * scale[e]
            fwd[i, e] = f
            bwd[i, e] = b
            phi_next = (g[i, e + 1] - log_p[i, e + 1]) * tau
            total += (f * p[i, e] - b * p[i, e + 1]) * (phi_next - phi)
            phi = phi_next
        out[i] = total


# --- exponential integrator: m^{n+1} = exp(dt L_n) m^n (uniformisation) ------------------------------------

#: Poisson tail weight left out of a uniformised series per substep (the kept weights are renormalised to sum to
#: one, so that mass stays exact): 2^-56 ~ 1.4e-17, an eighth of the unit round-off.
UNIFORMISATION_TAIL = 2.0 ** -56

#: Largest Poisson mean ``lam h`` of one substep: ``exp(-500) ~ 7e-218`` has not underflowed, and a substep needs
#: ``~ mean + 9 sqrt(mean)`` terms (1.4x the mean at 500).
MAX_POISSON_MEAN = 500.0


@dataclass(frozen=True)
class Uniformised:
    """The frozen generators ``L_s`` of a block of ``n`` states as ``L = lam (B - I)``, ``B`` column stochastic.

    One rate for the block, ``lam = max over states and DOFs of the exit rate`` (any ``lam`` at least that large
    is valid; one for all states makes the Poisson weights scalars). ``B = I + L / lam`` is block diagonal
    (one ``M x M`` block per state) with the non-negative off-diagonal of ``L / lam`` and the diagonal
    ``1 - exit / lam in [0, 1]``: entrywise non-negative, columns summing to one (mass), and in detailed balance
    with the Gibbs masses of each ``L_s`` (``B pi = pi``).

    Attributes:
        lam: the uniformisation rate (1 where nothing moves, e.g. one DOF).
        B: ``(n M, n M)`` CSR matrix acting on the masses flattened state by state.
        shape: ``(n, M)``.
    """

    lam: float
    B: sp.csr_matrix
    shape: tuple[int, int]


def uniformise(space: ActionSpace, g: np.ndarray, tau: float, scheme: str = "sg") -> Uniformised:
    """The uniformised generators (:class:`Uniformised`) of the potentials ``g`` ``(n, M)`` (no chunking)."""
    j, k = space.edges[:, 0], space.edges[:, 1]
    fwd, bwd = edge_rates(space, g, tau, scheme)
    w = space.weights
    up, down = fwd / w[j], bwd / w[k]  # (n, E): rates per unit mass, j -> k and k -> j
    n, m = g.shape
    inc_j, inc_k = space.incidences
    exit_rate = up @ inc_j + down @ inc_k
    lam = float(exit_rate.max()) if exit_rate.size else 0.0
    lam = lam if lam > 0 else 1.0
    stay = 1.0 - exit_rate / lam  # in [0, 1]: exit_rate <= lam
    np.maximum(stay, 0.0, out=stay)  # 1 - x / x rounds to 0 exactly; this only removes a -0.0
    up /= lam
    down /= lam
    base = (m * np.arange(n))[:, None]
    if space.is_chain:  # edges (0, 1), (1, 2), ...: three diagonals of the flattened block-diagonal matrix
        pad = np.zeros((n, 1))
        B = sp.diags([np.hstack([up, pad]).ravel()[:-1], stay.ravel(), np.hstack([down, pad]).ravel()[:-1]],
                     [-1, 0, 1], shape=(n * m, n * m), format="csr")
    else:
        diag = np.arange(m)
        rows = np.concatenate([np.broadcast_to(diag, (n, m)), np.broadcast_to(k, up.shape),
                               np.broadcast_to(j, down.shape)], axis=1) + base
        cols = np.concatenate([np.broadcast_to(diag, (n, m)), np.broadcast_to(j, up.shape),
                               np.broadcast_to(k, down.shape)], axis=1) + base
        B = sp.csr_matrix((np.concatenate([stay, up, down], axis=1).ravel(), (rows.ravel(), cols.ravel())),
                          shape=(n * m, n * m))
    return Uniformised(lam, B, (n, m))


def poisson_weights(mean: np.ndarray, tail: float = UNIFORMISATION_TAIL) -> np.ndarray:
    """Poisson probabilities ``P(X = k)``, ``k = 0..K``, per mean ``(n,)`` -> ``(n, K + 1)``.

    ``K`` is the smallest with ``P(X > K) <= tail`` for the largest mean; each row is then divided by its sum,
    so that it sums to one to round-off (the left-out tail, ``<= tail``, is spread proportionally). Computed from
    logarithms (``k log mean - mean - log k!``, relative error ``~ mean * eps`` per weight, ``5e-14`` at a mean of
    500): the renormalisation, not the individual weights, is what keeps the mass.

    >>> w = poisson_weights(np.array([0.0, 2.0]))
    >>> [float(round(x, 12)) for x in w.sum(axis=1)], float(w[0, 0]), bool(w.min() >= 0)
    ([1.0, 1.0], 1.0, True)
    """
    from scipy.special import gammaln, pdtrc

    top = float(np.max(mean)) if mean.size else 0.0
    K = 0
    while top > 0 and pdtrc(K, top) > tail:
        K += 1
    k = np.arange(K + 1)
    with np.errstate(divide="ignore", invalid="ignore"):  # mean 0: log 0 = -inf, and 0 * -inf at k = 0 (masked)
        logs = np.where(k == 0, 0.0, k * np.log(mean)[:, None]) - mean[:, None] - gammaln(k + 1)
    weights = np.exp(logs - logs.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    return weights


def apply_uniformised(gen: Uniformised, masses: np.ndarray, dt: float, rescale: bool = True) -> np.ndarray:
    """``exp(dt L_s) m_s`` for every state of ``gen`` by uniformisation, ``(n, M)`` masses in and out.

    ``exp(h L) = sum_k Poisson(k; lam h) B^k`` (``L = lam (B - I)``): a convex combination of powers of a
    non-negative column-stochastic matrix, so every term is a sum of non-negative products. The result is
    therefore ``>= 0`` in floating point and a Gibbs vector of ``B`` is reproduced to round-off. The step is
    split into ``r`` substeps with ``lam h / r <= MAX_POISSON_MEAN``; the truncation error is at most
    ``2 r UNIFORMISATION_TAIL`` in total variation. Cost: ``~ lam dt + 9 sqrt(lam dt)`` sparse products with
    ``B`` (``M + 2 E`` non-zeros per state).

    Mass: the Poisson weights sum to one, but each product with ``B`` moves the mass by the round-off of ``B``'s
    column sums (``<= eps``, the same sign at every product), so the series drifts by ``~ 0.1 lam dt eps``
    (measured: 5.6e-14 at ``lam dt = 2300``, 3.5e-13 at ``lam dt = 15000``; tests/test_exponential.py). With
    ``rescale`` (the default) each state's result is multiplied by ``mass in / mass out``, a positive factor
    ``1 +- lam dt eps`` that removes that drift of the conserved quantity and changes nothing else.
    """
    if dt <= 0 or masses.size == 0:
        return masses.copy()
    total = gen.lam * dt
    substeps = max(1, int(math.ceil(total / MAX_POISSON_MEAN)))
    weights = poisson_weights(np.array([total / substeps]))[0]
    B = gen.B
    rows = B.shape[0]
    out = masses.reshape(rows) if masses.size == rows else masses.reshape(rows, -1)  # (n M,) or (n M, columns)
    for _ in range(substeps):
        term = out
        out = weights[0] * term
        for c in range(1, weights.size):
            term = B @ term
            out += weights[c] * term
    out = out.reshape(masses.shape)
    if rescale:
        before, after = masses.sum(axis=1), out.sum(axis=1)
        out *= np.divide(before, after, out=np.ones_like(before), where=after > 0)[:, None]
    return out


class FrozenPropagator:
    """``exp(h L) m`` for a generator that does not change between steps (one-state MDPs), built once.

    The first step of a size ``h`` applies the series to the masses (:func:`apply_uniformised`); from the
    second step of the same size on, the dense propagators ``E_s(h) = sum_k Poisson(k; lam h) B_s^k``
    (``(n, M, M)``, entrywise >= 0, built by the same series applied to the identity) are reused, so that a step
    costs one matrix-vector product per state. Dense propagators are kept while they fit in
    :data:`solver.budget.SOLVE_CHUNK_BYTES` (for at most two step sizes: the fixed ``dt`` and the last, shorter
    step); above that every step applies the series.
    """

    def __init__(self, gen: Uniformised):
        self.gen = gen
        self._seen: set[float] = set()
        self._dense: dict[float, np.ndarray] = {}

    def apply(self, masses: np.ndarray, h: float) -> np.ndarray:
        """Masses ``(n, M)`` after a step of size ``h`` (mass rescaled as in :func:`apply_uniformised`)."""
        n, m = self.gen.shape
        # fixed steps are (n + 1) dt - n dt: equal up to the round-off of n dt, so sizes equal to 12 digits share a
        # propagator (a time error ~1e-16 t)
        h = float(f"{h:.12g}")
        E = self._dense.get(h)
        if E is None and h in self._seen and len(self._dense) < 2 and 8 * n * m * m <= budget.SOLVE_CHUNK_BYTES:
            identity = np.zeros((n, m, m))
            identity[:, np.arange(m), np.arange(m)] = 1.0
            # columns of E_s are exp(h L_s) e_j: the series applied to the M unit vectors of every state at once
            columns = apply_uniformised(_Stacked(self.gen, m), identity.reshape(n * m, m), h, rescale=False)
            E = self._dense[h] = columns.reshape(n, m, m)  # E[s, i, j] = (exp(h L_s) e_j)_i
        self._seen.add(h)
        if E is None:
            return apply_uniformised(self.gen, masses, h)
        if n == 1:  # the common case (one-state models): the fewest numpy calls
            # one BLAS thread: between two steps OpenBLAS's second thread goes to sleep, and waking it made this
            # 225 x 225 product cost 1 ms instead of ~20 us on a loaded 2-core machine
            with single_threaded_blas(m):
                out = (E[0] @ masses[0])[None, :]
            after = out.sum()
            if after > 0:
                out *= masses.sum() / after
            return out
        out = np.einsum("sij,sj->si", E, masses)
        before, after = masses.sum(axis=1), out.sum(axis=1)
        out *= np.divide(before, after, out=np.ones_like(before), where=after > 0)[:, None]
        return out


class _Stacked:
    """``gen`` applied to ``M`` vectors per state at once: ``B`` acting on ``(n M, M)`` blocks (for the dense
    propagator of :class:`FrozenPropagator`); only what :func:`apply_uniformised` reads."""

    def __init__(self, gen: Uniformised, columns: int):
        self.lam, self.B, self.shape = gen.lam, gen.B, (gen.shape[0] * gen.shape[1], columns)


def exponential_step(space: ActionSpace, masses: np.ndarray, g: np.ndarray, tau: float, dt: float,
                     scheme: str = "sg") -> np.ndarray:
    """One exponential step ``m^{n+1} = exp(dt L_n) m^n`` for all states (in chunks of states).

    ``L_n`` is the frozen generator of ``g`` (module docstring), ``exp`` by uniformisation
    (:func:`apply_uniformised`). Exact in time for the frozen-``Q`` ODE (to ``~1e-16``), so for every ``dt``:
    mass is conserved, ``m^{n+1} >= 0`` in floating point, the Gibbs masses of ``g`` are a fixed point and
    ``V^{pi_n}`` is non-decreasing (``exp(dt L)`` is a Markov kernel with invariant ``w exp(g)``; theory.md §3).

    Why not the symmetrised eigen-decomposition ``exp(dt L) = D U exp(-dt Lambda) U^T D^{-1}``
    (``D = diag(sqrt(w e^g))``): its round-off is amplified by ``cond(D) = exp(range(g + log w) / 2)``.
    Measured (README "Performance"): on the OU bandit (range 26) 61 entries come out negative (down to
    -5e-18) at ``dt = 0.01``; on LQR 21 x 64 (range 140) and a double well at ``tau = 0.03`` (range 630) the
    masses are off by ``1e2``-``1e36`` at ``dt = 0.01``. Uniformisation cannot go negative and costs
    ``~ lam dt`` sparse products instead.
    """
    return budget.by_state_chunks(
        space, lambda m, gc: apply_uniformised(uniformise(space, gc, tau, scheme), m, dt), masses, g)
