"""The discretised MDP of theory.md §2: state grid, action DOFs, rewards, reference measure, kernel.

Arrays (``N`` states, ``M`` action DOFs):

* ``reward``: ``R_ij = r(s_i, a_j)``, ``(N, M)``;
* ``log_mu``: ``log mu(a_j)``, ``(M,)`` (reference measure: Lebesgue, or the untruncated ``N(0, std^2)``
  density restricted to the action domain, theory.md §8.2);
* ``kernel``: ``T_ijk = P(s_k | s_i, a_j)``, a Gaussian centred at ``f(s_i, a_j)`` restricted to the state
  grid and renormalised; the full ``N x M x N`` tensor is never built.

  - 1D grid (:class:`GaussianGridKernel`): one window of ``L`` consecutive states per ``(i, j)``, ``8 N M L``
    bytes, ``L = min(N, 2 ceil(9 sigma / h) + 1)``; ``T V`` by interpolation over a grid of means where that is
    exact to 1e-12 and cheaper (:class:`MeanInterpolation`, ``~120 N M`` bytes more, ``~210`` with the arrays of
    its compiled kernel), and so is the dense ``P^pi`` of serial policy evaluation (:class:`InterpolatedPolicy`,
    ``~190 N M`` bytes more, ``~330`` with its compiled kernel's).
  - 2D grid ``nx x ny`` (:class:`GaussianGridKernel2D`): the tensor product of two 1D windows per ``(i, j)``,
    ``8 N M (Lx + Ly)`` bytes if that fits in :data:`WINDOW_STORE_BYTES` (512 MiB), else recomputed in chunks from
    the means (``16 N M`` bytes).
* ``rho``: initial-state distribution, uniform on the grid (theory.md §8.4).

Memory budgets and the memory formula of a run live in :mod:`solver.budget`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from . import budget
from .config import ConfigError
from .fem import ActionSpace
from .interp_kernel import InterpolationKernel
from .models import Model
from .parallel import COMPILED_MIN_ENTRIES, compiled, single_threaded_blas

#: Kernel windows reach 9 standard deviations: the Gaussian weight beyond is < exp(-40.5) ~ 3e-18,
#: below double-precision round-off relative to the window's peak.
KERNEL_REACH = 9.0


def chunk_doubles(bx: int, by: int, lx: int, ly: int) -> int:
    """Doubles per (state, action) of the working memory of one chunk of a 2D-grid kernel product.

    ``policy_matrix`` holds the dense bands ``X`` and ``m X`` (``2 bx``) and ``Y`` (``by``); ``expect`` holds
    ``X`` (``bx``), ``X V`` (``by``) and its gathered windows (``ly``, and ``ly`` int64 indices); recomputed
    windows add their values and the temporaries of :func:`window_values` (``3 (lx + ly)``, generously).
    """
    return 2 * bx + 2 * by + 3 * (lx + ly)


def window_starts(grid: np.ndarray, mean: np.ndarray, sigma: float) -> tuple[np.ndarray, int]:
    """First grid index of the kernel window of each mean on a uniform 1D grid, and the window length.

    The window is the ``L = min(n, 2 ceil(KERNEL_REACH sigma / h) + 1)`` consecutive grid points centred at the
    grid point nearest to the mean, shifted inwards at the ends of the grid so that every window has length ``L``.

    Args:
        grid: ``(n,)`` uniform grid.
        mean: means, any shape.
        sigma: noise standard deviation.

    Returns:
        ``(start, L)``: ``start`` has the shape of ``mean`` (int64).
    """
    n = grid.size
    if n == 1:
        return np.zeros(mean.shape, dtype=np.int64), 1
    h = grid[1] - grid[0]
    half = int(math.ceil(KERNEL_REACH * sigma / h))
    width = min(n, 2 * half + 1)
    centre = np.rint((mean - grid[0]) / h).astype(np.int64)
    return np.clip(centre - half, 0, n - width), width


def window_values(grid: np.ndarray, mean: np.ndarray, start: np.ndarray, width: int, sigma: float) -> np.ndarray:
    """The 1D grid Gaussian ``exp(-(x_k - f)^2 / (2 sigma^2))`` on each window, renormalised over the window.

    Normalisation uses the log-sum-exp shift, so a mean far outside the grid puts its mass on the nearest grid
    points instead of underflowing. Returns ``mean.shape + (width,)``.
    """
    if grid.size == 1:
        return np.ones(mean.shape + (1,))
    # the log-sum-exp shift is the squared distance to the nearest window point (no reduction over the window)
    nearest = np.clip(np.rint((mean - grid[0]) / (grid[1] - grid[0])).astype(np.int64), start, start + width - 1)
    shift = grid[nearest] - mean
    shift *= shift
    values = grid[start[..., None] + np.arange(width)]  # in place from here: this is the kernel's hot loop
    values -= mean[..., None]
    values *= values
    values -= shift[..., None]
    values *= -0.5 / sigma ** 2
    np.exp(values, out=values)
    values /= values.sum(axis=-1, keepdims=True)
    return values


#: ``(T V)(f)`` is interpolated from a grid of means of spacing ``sigma / MEAN_GRID_PER_SIGMA`` ...
MEAN_GRID_PER_SIGMA = 24
#: ... by Lagrange interpolation of this degree (10 equispaced nodes per mean) ...
INTERPOLATION_DEGREE = 9
#: ... when the interpolated operator is within this of the windowed one in the row-sum (infinity) norm, so that
#: ``|Q_interp - Q_windows| <= gamma * INTERPOLATION_TOLERANCE * max |V|`` (measured 9.5e-15 on lqr_1d).
INTERPOLATION_TOLERANCE = 1e-12


GATHER_SIGNATURE = "void(i8[::1], f8[:, ::1], f8[::1], f8[::1])"


def _lagrange_gather(first, weights, F, out):
    """Compiled ``out_r = sum_c weights[r, c] F[first[r] + c]``: ``W F`` of :meth:`MeanInterpolation.expect`
    (``INTERPOLATION_DEGREE + 1`` consecutive means per row, summed in the CSR product's order, so the same
    numbers; 0.12 ms instead of 0.21 on lqr_1d)."""
    for r in range(first.size):
        segment = F[first[r]:first[r] + INTERPOLATION_DEGREE + 1]
        w = weights[r]
        acc = 0.0
        for c in range(INTERPOLATION_DEGREE + 1):
            acc += w[c] * segment[c]
        out[r] = acc


#: :class:`MeanInterpolation` keeps ``T_fine`` dense as well while it has at most this many entries (2 MiB).
FINE_DENSE_ENTRIES = 2 ** 18


class MeanInterpolation:
    """``(T V)_ij = sum_k T_ijk V_k`` by interpolating the smooth function ``F(f) = sum_k T(f)_k V_k`` at ``f_ij``.

    ``T(f)`` is the grid Gaussian of mean ``f`` renormalised over the grid (:class:`GaussianGridKernel`): an
    analytic function of ``f`` (the window cut-off at ``KERNEL_REACH`` sigmas changes it by < 1e-17, and the
    window shift at the grid ends only moves which points are kept, not the sum), varying on the scale ``sigma``.
    So ``F`` on a uniform grid ``phi_g`` of means with spacing ``delta = sigma / MEAN_GRID_PER_SIGMA``
    (``T_fine``, ``(G, N)`` CSR, one window per fine mean) and Lagrange interpolation of degree ``p`` at each
    ``f_ij`` (``W``, ``(N M, G)`` CSR, ``p + 1`` weights per row) give ``T ~ W T_fine`` with an error
    ``O((delta / sigma)^{p+1})``. Cost of ``T V``: ``G L + N M (p + 1)`` instead of ``N M L``.

    The construction measures ``err = max_row sum_k |(W T_fine - T)_row,k|`` (the exact bound of
    ``max |T_interp V - T V| / max |V|`` over all ``V``); :attr:`error` holds it. ``per_sigma`` and ``degree``
    set ``delta = sigma / per_sigma`` and ``p`` (:class:`InterpolatedPolicy` uses a coarser grid of higher degree).
    """

    def __init__(self, states: np.ndarray, mean: np.ndarray, sigma: float, windowed: sp.csr_matrix,
                 per_sigma: int = MEAN_GRID_PER_SIGMA, degree: int = INTERPOLATION_DEGREE):
        p = degree
        delta = sigma / per_sigma
        lo = math.floor((float(mean.min()) - states[0]) / delta) - p
        hi = math.ceil((float(mean.max()) - states[0]) / delta) + p
        fine = states[0] + delta * np.arange(lo, hi + 1)
        start, width = window_starts(states, fine, sigma)
        values = window_values(states, fine, start, width, sigma)
        g = fine.size
        self.fine = sp.csr_matrix((values.ravel(), (start[:, None] + np.arange(width)).ravel(),
                                   np.arange(0, g * width + 1, width)), shape=(g, states.size))
        x = (mean.ravel() - fine[0]) / delta  # positions in units of delta
        first = np.clip(np.floor(x).astype(np.int64) - (p - 1) // 2, 0, g - p - 1)
        nodes = first[:, None] + np.arange(p + 1)
        weights = np.ones((p + 1, x.size))  # node-major: contiguous rows (the same products, in the same order)
        for a in range(p + 1):  # Lagrange basis on the equispaced nodes first + 0..p
            for b in range(p + 1):
                if a != b:
                    weights[a] *= (x - (first + b)) / (a - b)
        weights = weights.T
        self.weights = sp.csr_matrix((weights.ravel(), nodes.ravel(), np.arange(0, x.size * (p + 1) + 1, p + 1)),
                                     shape=(x.size, g))
        # in chunks of rows: the product has as many non-zeros as the windows themselves
        rows = max(1, budget.KERNEL_CHUNK_BYTES // (24 * (width + p + 1)))
        self.error = max(float(abs(self.weights[a:a + rows] @ self.fine - windowed[a:a + rows]).sum(axis=1).max())
                         for a in range(0, x.size, rows))
        self._row_blocks: dict[tuple[int, int], sp.csr_matrix] = {}
        self._fine_span: dict[tuple[int, int], tuple] = {}  # (first node, end, T_fine rows) of a block of states
        # F = T_fine V as one dense BLAS product while T_fine is small (3x faster than the CSR product on lqr_1d)
        self._fine_dense = self.fine.toarray() if g * states.size <= FINE_DENSE_ENTRIES else None
        self._compiled = None  # (first node (N M,), weights (N M, p + 1)) of W for the compiled W F
        if p == INTERPOLATION_DEGREE and x.size >= COMPILED_MIN_ENTRIES:
            self._compiled = (np.ascontiguousarray(nodes[:, 0]), np.ascontiguousarray(weights))

    def expect(self, V: np.ndarray, m: int, rows: slice | None = None) -> np.ndarray:
        """``(T V)`` of the rows (states) ``rows`` (all if None), shape ``(states, m)``."""
        F = self._fine_values(V, m, rows)
        gather = None if self._compiled is None else compiled(_lagrange_gather, GATHER_SIGNATURE)
        if gather is not None:  # the CSR product's sums in its order: the same numbers, for every row block
            first, weights = self._compiled
            a, b = (0, first.size) if rows is None else (rows.start * m, rows.stop * m)
            out = np.empty(b - a)
            gather(first[a:b], weights[a:b], F, out)
            return out.reshape(-1, m)
        if rows is None:
            return (self.weights @ F).reshape(-1, m)
        block = self._row_blocks.get((rows.start, rows.stop))
        if block is None:
            block = self.weights[rows.start * m:rows.stop * m]
            self._row_blocks = {(rows.start, rows.stop): block}
        return (block @ F).reshape(-1, m)

    def _fine_values(self, V: np.ndarray, m: int, rows: slice | None) -> np.ndarray:
        """``F = T_fine V`` at the fine nodes. For a block of states (MPI) and the CSR ``T_fine``, only at the nodes
        those states' means read (the same row sums, so the same numbers; the other nodes are NaN and never read):
        on 2 ranks of lqr_1d (241 x 1025) that halves a product every rank made in full."""
        if self._fine_dense is not None:
            with single_threaded_blas(self._fine_dense.shape[0]):
                return self._fine_dense @ V
        if rows is None:
            return self.fine @ V
        span = self._fine_span.get((rows.start, rows.stop))
        if span is None:
            a, b = self.weights.indptr[rows.start * m], self.weights.indptr[rows.stop * m]
            lo, hi = int(self.weights.indices[a:b].min()), int(self.weights.indices[a:b].max()) + 1
            span = (lo, hi, self.fine[lo:hi])
            self._fine_span = {(rows.start, rows.stop): span}
        lo, hi, block = span
        F = np.full(self.fine.shape[0], np.nan)
        F[lo:hi] = block @ V
        return F


#: ``P^pi`` is interpolated (:class:`InterpolatedPolicy`) from a coarser grid of means, spacing
#: ``sigma / POLICY_GRID_PER_SIGMA``, at a higher degree: its cost is the ``N x G`` by ``G x N`` product, so ``G``
#: matters more than for ``T V``; 16 equispaced nodes at ``sigma / 8`` give an operator error of ~1e-13
#: (``~ 14 (delta / sigma)^16``; measured 7.5e-14 on lqr_1d, where the entries of ``P^pi`` move by < 3e-16).
POLICY_GRID_PER_SIGMA = 8
POLICY_DEGREE = 15

#: Up to this many states ``P^pi`` may be built dense (``N x N``) by :class:`InterpolatedPolicy`: the dense
#: LU of policy evaluation (``solver.bellman.DENSE_STATES``, the same number) needs it dense anyway.
DENSE_POLICY_STATES = 1500

#: States per BLAS product of :class:`InterpolatedPolicy`: a block of consecutive states touches only a window of
#: the grid of means and of the state grid, so the products skip most of the zeros of ``H`` and ``T_fine``.
POLICY_CHUNK_STATES = 16

#: Cost model of ``P^pi`` (ns per operation, measured on lqr_1d, 2-core AMD EPYC, OpenBLAS): the dense-band
#: einsum ~0.5 per multiply-add, the sparse histogram ~0.8 per non-zero, the blocked GEMM ~0.05 per multiply-add.
#: :class:`InterpolatedPolicy` is used where its modelled cost is below the dense band's. (The compiled windowed
#: product, :func:`_windowed_policy`, costs ~0.6 per window entry, ~0.3 per band entry: the model is kept, it
#: leans to the interpolation, which is cheaper still at every size of benchmarks/bench_scaling.py from 61 states.)
POLICY_COST_NS = {"band": 0.5, "histogram": 0.8, "gemm": 0.05}


HISTOGRAM_SIGNATURE = "void(f8[:, ::1], i8[::1], f8[:, ::1], f8[:, ::1])"


def _histogram(masses, first, lagrange, out):
    """Compiled ``H_ig += m_ij W_ij,g`` of :class:`InterpolatedPolicy` (``out`` ``(N, G)``, zeros on entry): row
    ``i M + j`` of ``W`` holds ``lagrange[i M + j]`` on the ``POLICY_DEGREE + 1`` consecutive means from
    ``first[i M + j]``. Actions in order, so each ``H_ig`` is summed as by the CSR product ``S m``; the fixed
    node count lets the inner loop be one vector update (0.24 ms instead of 0.40 on lqr_1d)."""
    n, m = masses.shape
    for i in range(n):
        row = out[i]
        for j in range(m):
            r = i * m + j
            x = masses[i, j]
            segment = row[first[r]:first[r] + POLICY_DEGREE + 1]
            w = lagrange[r]
            for c in range(POLICY_DEGREE + 1):
                segment[c] += x * w[c]


class InterpolatedPolicy:
    """``P^pi_ik = sum_j m_ij T(f_ij)_k`` through the grid of means of a :class:`MeanInterpolation`, dense.

    The kernel row ``T(f)`` is the smooth function of the mean ``f`` that :class:`MeanInterpolation` interpolates,
    ``T(f_ij) ~ sum_g W_ij,g T(phi_g)`` (``W``: Lagrange weights, ``p + 1`` per row), so

        P^pi ~ H T_fine,      H_ig = sum_j m_ij W_ij,g      (the masses of state i spread onto the means phi_g),

    a sparse "histogram" ``H = S m`` (``S``: ``(N G, N M)`` CSR, the entries of ``W`` re-indexed, one
    matrix-vector product of ``N M (p + 1)`` non-zeros; compiled, :func:`_histogram`, from
    :data:`solver.parallel.COMPILED_MIN_ENTRIES` pairs on where numba is installed) followed by
    ``(N, G) @ (G, N)`` BLAS products, one per
    block of :data:`POLICY_CHUNK_STATES` states restricted to the means and states that block touches.

    Error: every row of ``m`` sums to at most 1 (masses), so ``max_i sum_k |P_interp - P^pi|_ik <= err`` with
    ``err`` the interpolation's measured operator bound (:attr:`error`); the rows of ``P`` keep their sums
    ``sum_j m_ij`` to round-off (Lagrange weights reproduce constants: ``sum_g W_ij,g = 1``). Entries that the
    interpolation makes negative (``>= -err``; ~-1e-24 measured) are set to 0, so ``P`` is entrywise
    non-negative exactly and ``I - gamma P`` stays an M-matrix; that moves the entries by at most ``err``.

    Memory: ``S`` (``12 N M (p + 1)`` bytes; ``8 N M (p + 2)`` more for the compiled histogram), ``T_fine`` dense
    (``8 G N``); cost per call
    ``N M (p + 1) + sum over blocks of (block x means x states)`` multiply-adds.

    Args:
        interp: the grid of means and Lagrange weights (built with :data:`POLICY_GRID_PER_SIGMA`,
            :data:`POLICY_DEGREE`).
        n: number of states ``N``.
        m: number of action DOFs ``M``.
    """

    def __init__(self, interp: MeanInterpolation, n: int, m: int):
        W = interp.weights.tocoo()
        g = interp.fine.shape[0]
        self.error = interp.error
        self.shape = (n, n)
        self._g, self._m = g, m
        self._row_blocks: dict[tuple[int, int], sp.csr_matrix] = {}  # this rank's diagonal block of S (MPI)
        state = W.row // m
        self._histogram = sp.csr_matrix((W.data, (state * g + W.col, W.row)), shape=(n * g, n * m))
        nodes = int(interp.weights.indptr[1])  # p + 1 per row
        self._compiled = None  # (first node (N M,), Lagrange weights (N M, p + 1)) for the compiled histogram
        if nodes == POLICY_DEGREE + 1 and n * m >= COMPILED_MIN_ENTRIES:
            self._compiled = (np.ascontiguousarray(interp.weights.indices[::nodes], dtype=np.int64),
                              np.ascontiguousarray(interp.weights.data.reshape(-1, nodes)))
        fine = interp.fine.tocsr()
        self._fine = fine.toarray()  # (G, N)
        first = fine.indices[fine.indptr[:-1]]  # window start of each mean (one window of fixed width per row)
        width = int(np.diff(fine.indptr).max())
        per_state = W.col.reshape(n, -1)  # W's rows are (state, action) in order, p + 1 entries each
        lo_g, hi_g = per_state.min(axis=1), per_state.max(axis=1) + 1
        self._blocks = []  # (a, b, g0, g1, c0, c1): P[a:b, c0:c1] = H[a:b, g0:g1] @ T_fine[g0:g1, c0:c1]
        for a in range(0, n, POLICY_CHUNK_STATES):
            b = min(n, a + POLICY_CHUNK_STATES)
            g0, g1 = int(lo_g[a:b].min()), int(hi_g[a:b].max())
            c0, c1 = int(first[g0:g1].min()), int(min(n, first[g0:g1].max() + width))
            self._blocks.append((a, b, g0, g1, c0, c1))
        self.flops = sum((b - a) * (g1 - g0) * (c1 - c0) for a, b, g0, g1, c0, c1 in self._blocks)

    def __call__(self, masses: np.ndarray, rows: slice | None = None) -> np.ndarray:
        """``P^pi`` for the masses ``(N, M)``, a dense ``(N, N)`` array (entrywise >= 0).

        With ``rows`` (a slice of states; MPI over states), ``masses`` holds those rows only and the result is the
        dense ``(rows, N)`` block, each row computed by the same operations as in the whole matrix.
        """
        n, m, g = self.shape[0], self._m, self._g
        a0, b0 = (0, n) if rows is None else (rows.start, rows.stop)
        spread = None if self._compiled is None else compiled(_histogram, HISTOGRAM_SIGNATURE)
        if spread is None:
            S = self._histogram
            if b0 - a0 < n:  # state i's histogram row only reads state i's masses: the diagonal block of S
                S = self._row_blocks.get((a0, b0))
                if S is None:
                    S = self._histogram[a0 * g:b0 * g, a0 * m:b0 * m]
                    self._row_blocks = {(a0, b0): S}
            H = (S @ masses.ravel()).reshape(b0 - a0, g)
        else:  # the same sums in the same order (j increasing) as the CSR product: the same H bit for bit
            H = np.zeros((b0 - a0, g))
            first, lagrange = self._compiled
            spread(np.ascontiguousarray(masses), first[a0 * m:b0 * m], lagrange[a0 * m:b0 * m], H)
        P = np.zeros((b0 - a0, n))
        with single_threaded_blas(n):  # small products: one BLAS thread (parallel.SMALL_BLAS_ROWS)
            for a, b, g0, g1, c0, c1 in self._blocks:
                a, b = max(a, a0), min(b, b0)
                if a < b:
                    P[a - a0:b - a0, c0:c1] = H[a - a0:b - a0, g0:g1] @ self._fine[g0:g1, c0:c1]
        np.maximum(P, 0.0, out=P)
        return P


WINDOWED_SIGNATURE = "void(f8[:, ::1], i8[:, ::1], f8[:, :, ::1], f8[:, ::1])"


def _windowed_policy(masses, offset, values, out):
    """Compiled ``P^pi`` band rows of :meth:`GaussianGridKernel.policy_matrix`: ``out[i, offset_ij + l] +=
    m_ij T_ij[l]`` over the window ``l < L`` of every action ``j`` (``out`` ``(N, band)``, zeros on entry). Each
    entry is summed over ``j`` increasing, each product rounded before it is added, as by the windowed storage's
    ``bincount``: the same numbers bit for bit (tests/test_kernel.py). ``N M L`` multiply-adds, no ``(N, M, band)``
    array: measured 4.0 ms instead of 11 (dense-band einsum) and 32 (bincount) at 241 x 257 (L = 111),
    21 ms instead of 38 and 147 at 1500 x 33 (L = 677)."""
    n, m = masses.shape
    width = values.shape[2]
    for i in range(n):
        row = out[i]
        for j in range(m):
            x = masses[i, j]
            segment = row[offset[i, j]:offset[i, j] + width]
            w = values[i, j]
            for c in range(width):
                segment[c] += x * w[c]


class GaussianGridKernel:
    """``T_ijk ∝ exp(-(s_k - f_ij)^2 / (2 sigma^2))`` on a uniform 1D grid, renormalised over the grid.

    Each row ``(i, j)`` keeps the ``L`` consecutive grid states nearest to ``f_ij`` (:func:`window_starts`);
    the weights outside the window are below round-off (:func:`window_values`).

    ``T V`` (hence ``Q = R + gamma T V``) is computed by :class:`MeanInterpolation` when that is cheaper and its
    measured operator error is within :data:`INTERPOLATION_TOLERANCE` (attribute :attr:`interpolation`, None
    otherwise); ``interpolate=False`` keeps the windowed product (the reference path, tests/test_fast_paths.py).

    Args:
        states: ``(N,)`` uniform grid.
        mean: ``(N, M)`` next-state means ``f(s_i, a_j)``.
        sigma: noise standard deviation.
        interpolate: allow :class:`MeanInterpolation` for ``T V``.
    """

    def __init__(self, states: np.ndarray, mean: np.ndarray, sigma: float, interpolate: bool = True):
        n = states.size
        self.shape = mean.shape + (n,)
        start, width = window_starts(states, mean, sigma)
        cols = start[..., None] + np.arange(width)  # (N, M, L)
        values = window_values(states, mean, start, width, sigma)
        rows = mean.size
        self.width = width
        self._row_blocks: dict[tuple[int, int], sp.csr_matrix] = {}  # expect(V, rows): this rank's block
        self.matrix = sp.csr_matrix((values.ravel(), cols.ravel(), np.arange(0, rows * width + 1, width)),
                                    shape=(rows, n))
        self._values = values
        # Row i of P^pi touches only columns [lo_i, lo_i + band).
        lo = start.min(axis=1)
        band = int((start.max(axis=1) - lo).max()) + width
        lo = np.minimum(lo, n - band)
        self._band = band
        self._band_cols = (lo[:, None] + np.arange(band)).ravel()
        # first column of each window within its state's band, (N, M): what policy_matrix's paths are built from
        self._offset = np.ascontiguousarray(start - lo[:, None])
        # policy_matrix, numpy path: small problems scatter the windows into a dense (N, M, band) array once, on
        # the first call (serial runs with InterpolatedPolicy never make one), and contract it over actions with
        # one einsum; larger ones scatter-add the windows in every call (bincount of the flat indices, built on
        # the first call). The compiled path (:func:`_windowed_policy`) needs neither.
        self._dense_band = values.size * band / width * 8 <= budget.DENSE_BAND_BYTES
        self._dense = self._scatter = None
        self.interpolation = None
        if interpolate and n > 1 and width > INTERPOLATION_DEGREE + 1:
            span = (float(mean.max()) - float(mean.min())) * MEAN_GRID_PER_SIGMA / sigma + 2 * INTERPOLATION_DEGREE
            if span * width + mean.size * (INTERPOLATION_DEGREE + 1) < 0.5 * mean.size * width:  # worth it
                candidate = MeanInterpolation(states, mean, sigma, self.matrix)
                if candidate.error <= INTERPOLATION_TOLERANCE:
                    self.interpolation = candidate
        self.policy_interpolation = None
        if interpolate and 1 < n <= DENSE_POLICY_STATES and width > POLICY_DEGREE + 1:
            p, cost = POLICY_DEGREE, POLICY_COST_NS
            means = (float(mean.max()) - float(mean.min())) * POLICY_GRID_PER_SIGMA / sigma + 2 * p
            direct = cost["band"] * mean.size * band  # the dense-band einsum (or more: the windowed scatter)
            if cost["histogram"] * mean.size * (p + 1) + cost["gemm"] * n * means * n < direct:  # worth it
                candidate = InterpolatedPolicy(MeanInterpolation(states, mean, sigma, self.matrix,
                                                                 POLICY_GRID_PER_SIGMA, p), n, mean.shape[1])
                if candidate.error <= INTERPOLATION_TOLERANCE:
                    self.policy_interpolation = candidate

    @property
    def dense_band(self) -> bool:
        """Whether the numpy path of :meth:`policy_matrix` contracts a dense ``(N, M, band)`` array (``8 N M band``
        bytes within :data:`solver.budget.DENSE_BAND_BYTES`), else it scatter-adds the windows (the windowed
        storage). The compiled path, where it runs, uses neither."""
        return self._dense_band

    def expect(self, V: np.ndarray, rows: slice | None = None) -> np.ndarray:
        """``(T V)_ij = sum_k T_ijk V_k``, shape ``(N, M)``; only the states ``rows`` (a slice) if given."""
        if self.interpolation is not None:
            return self.interpolation.expect(V, self.shape[1], rows)
        if rows is None:
            return (self.matrix @ V).reshape(self.shape[:2])
        m = self.shape[1]
        block = self._row_blocks.get((rows.start, rows.stop))
        if block is None:  # built once per block: scipy copies a CSR made of slices of a larger array
            block = self.matrix[rows.start * m:rows.stop * m]
            self._row_blocks = {(rows.start, rows.stop): block}
        return (block @ V).reshape(-1, m)

    def dense_policy_matrix(self, masses: np.ndarray, rows: slice | None = None) -> np.ndarray | None:
        """``P^pi`` ``(N, N)`` dense by :class:`InterpolatedPolicy` (within its measured error of
        :meth:`policy_matrix`), or None where that path is not built (then use :meth:`policy_matrix`).
        With ``rows``: the dense ``(rows, N)`` block from those rows' masses (MPI over states)."""
        return None if self.policy_interpolation is None else self.policy_interpolation(masses, rows)

    def policy_matrix(self, masses: np.ndarray, rows: slice | None = None) -> sp.csr_matrix:
        """``P^pi_ik = sum_j m_ij T_ijk`` for action masses ``m`` ``(N, M)``, as a sparse ``(N, N)`` matrix.

        With ``rows`` (a slice of states), ``masses`` holds those rows only and the result is the
        ``(rows, N)`` block, computed by the same operations per row (MPI over states, :mod:`solver.parallel`).

        Paths: compiled (:func:`_windowed_policy`, from :data:`solver.parallel.COMPILED_MIN_ENTRIES` pairs on where
        numba is installed), ``N M L`` multiply-adds whatever the storage; else the dense band's einsum
        (:attr:`dense_band`, ``N M band``) or the windowed storage's ``bincount`` (~8x slower per entry than the
        einsum: without numba that is the cost jump where the band leaves :data:`solver.budget.DENSE_BAND_BYTES`,
        and at ``N > DENSE_POLICY_STATES``; measured 2.8x at 1500 -> 1501 states x 65 DOFs, none when compiled).
        """
        n, band = self.shape[0], self._band
        rows = slice(0, n) if rows is None else rows
        nb = rows.stop - rows.start
        spread = (compiled(_windowed_policy, WINDOWED_SIGNATURE)
                  if self.shape[0] * self.shape[1] >= COMPILED_MIN_ENTRIES else None)
        if spread is not None:  # the bincount's sums in its order: the same numbers, 2-8x faster
            out = np.zeros((nb, band))
            spread(np.ascontiguousarray(masses, dtype=float), self._offset[rows], self._values[rows], out)
            data = out.ravel()
        elif self._dense_band:
            if self._dense is None:
                self._dense = np.zeros(self.shape[:2] + (band,))
                np.put_along_axis(self._dense, self._offset[..., None] + np.arange(self.width), self._values,
                                  axis=-1)
            data = np.einsum("ij,ijb->ib", masses, self._dense[rows]).ravel()
        else:
            if self._scatter is None:  # flat index of every window entry in the (N, band) output
                self._scatter = ((np.arange(n) * band)[:, None, None] + self._offset[..., None]
                                 + np.arange(self.width)).ravel()
            per_state = self.shape[1] * self.width
            scatter = self._scatter[rows.start * per_state:rows.stop * per_state] - rows.start * band
            data = np.bincount(scatter, weights=(masses[..., None] * self._values[rows]).ravel(),
                               minlength=nb * band)
        return sp.csr_matrix((data, self._band_cols[rows.start * band:rows.stop * band],
                              np.arange(0, nb * band + 1, band)), shape=(nb, n))


class GaussianGridKernel2D:
    """``T_ijk ∝ exp(-|s_k - f_ij|^2 / (2 sigma^2))`` on a uniform 2D grid, renormalised over the grid.

    State ``k = kx * ny + ky`` is ``(x_kx, y_ky)`` (row-major over ``(nx, ny)``). The noise is isotropic, so
    the Gaussian factorises, ``exp(-|s_k - f|^2 / 2 sigma^2) = exp(-(x_kx - f_1)^2 / 2 sigma^2)
    exp(-(y_ky - f_2)^2 / 2 sigma^2)``, and on a Cartesian grid so does its normalising sum,
    ``sum_{kx, ky} = (sum_kx)(sum_ky)``. The grid Gaussian renormalised over the grid is therefore exactly the
    tensor product ``T_ijk = X_ij[kx] Y_ij[ky]`` of the two renormalised 1D grid Gaussians of
    :class:`GaussianGridKernel` (same windows of ``Lx``, ``Ly`` points, same log-sum-exp shift). A row
    ``(i, j)`` costs ``Lx + Ly`` values, not ``Lx * Ly`` (nor ``N``).

    Storage: the window starts, ``(N, M)`` int32 per axis, and either the window values ``(N, M, Lx)`` and
    ``(N, M, Ly)`` (if they fit in :data:`WINDOW_STORE_BYTES`) or, above that, only a reference to the means
    ``(N, M, 2)``, from which each call recomputes the windows chunk by chunk.

    Products, per chunk of states (``chunk`` states, working memory about :data:`KERNEL_CHUNK_BYTES`): the
    windows of state ``i`` are scattered into dense bands ``X_i (M, bx)``, ``Y_i (M, by)`` over the grid
    columns ``lox_i + [0, bx)``, rows ``loy_i + [0, by)``; ``bx``, ``by`` are the largest extents of the union of
    a state's windows over its actions (the same for every state, so that each state's arithmetic does not
    depend on the chunking or on ``rows``). Then, with ``V_i = V[lox_i:lox_i+bx, loy_i:loy_i+by]``,

    * ``(T V)_ij = sum_b (X_i V_i)[j, b] Y_i[j, b]``: one ``(M, bx) @ (bx, by)`` BLAS product per state;
    * ``P^pi_i = X_i^T diag(m_i) Y_i``, the ``(bx, by)`` block of row ``i`` of ``P^pi`` (CSR, ``bx by`` entries
      per row).

    Args:
        axes: ``(x (nx,), y (ny,))`` uniform grids of the two coordinates.
        mean: ``(N, M, 2)`` next-state means ``f(s_i, a_j)``, ``N = nx ny``.
        sigma: noise standard deviation (the same along both axes).
    """

    def __init__(self, axes: tuple[np.ndarray, np.ndarray], mean: np.ndarray, sigma: float):
        self.axes = axes
        n = axes[0].size * axes[1].size
        self.shape = mean.shape[:2] + (n,)
        self.sigma = sigma
        starts, widths = zip(*(window_starts(axis, mean[..., d], sigma) for d, axis in enumerate(axes)))
        self.width = tuple(widths)
        self._start = tuple(s.astype(np.int32) for s in starts)
        lo = [s.min(axis=1) for s in starts]
        band = [int((s.max(axis=1) - low).max()) + w for s, low, w in zip(starts, lo, widths)]
        self.band = tuple(band)
        self._lo = tuple(np.minimum(low, axis.size - b) for low, axis, b in zip(lo, axes, band))
        m, (bx, by), (lx, ly) = mean.shape[1], band, widths
        self.chunk = max(1, budget.KERNEL_CHUNK_BYTES // (8 * m * chunk_doubles(bx, by, lx, ly)))
        if budget.window_bytes(*self.shape[:2], lx, ly) <= budget.WINDOW_STORE_BYTES:
            self._mean = None
            self._values = tuple(np.empty(mean.shape[:2] + (w,)) for w in widths)
            for d, axis in enumerate(axes):  # chunk by chunk: no full-size temporaries
                for a in range(0, self.shape[0], self.chunk):
                    b = a + self.chunk
                    self._values[d][a:b] = window_values(axis, mean[a:b, :, d], starts[d][a:b], widths[d], sigma)
        else:
            self._mean = mean
            self._values = None

    @property
    def stored(self) -> bool:
        """Whether the window values are stored (else recomputed from the means in every call)."""
        return self._values is not None

    def _windows(self, d: int, a: int, b: int) -> np.ndarray:
        """Window values along axis ``d`` of states ``a:b``, ``(b - a, M, L_d)``."""
        if self._values is not None:
            return self._values[d][a:b]
        return window_values(self.axes[d], self._mean[a:b, :, d], self._start[d][a:b], self.width[d], self.sigma)

    def _dense(self, d: int, a: int, b: int, values: np.ndarray) -> np.ndarray:
        """Windows scattered into the dense bands of states ``a:b`` along axis ``d``, ``(b - a, M, band_d)``."""
        c, m, band = b - a, values.shape[1], self.band[d]
        first = (self._start[d][a:b] - self._lo[d][a:b, None]) + band * np.arange(c * m).reshape(c, m)
        dense = np.zeros((c, m, band))
        dense.reshape(-1)[first[..., None] + np.arange(self.width[d])] = values
        return dense

    def _chunks(self, rows: slice):
        """``(a, b)``: consecutive chunks of at most ``chunk`` states covering ``rows``."""
        for a in range(rows.start, rows.stop, self.chunk):
            yield a, min(a + self.chunk, rows.stop)

    def expect(self, V: np.ndarray, rows: slice | None = None) -> np.ndarray:
        """``(T V)_ij = sum_k T_ijk V_k``, shape ``(N, M)``; only the states ``rows`` (a slice) if given."""
        (nx, ny), (bx, by), ly = (a.size for a in self.axes), self.band, self.width[1]
        rows = slice(0, self.shape[0]) if rows is None else rows
        grid = V.reshape(nx, ny)
        out = np.empty((rows.stop - rows.start, self.shape[1]))
        for a, b in self._chunks(rows):
            block = grid[self._lo[0][a:b, None, None] + np.arange(bx)[:, None],
                         self._lo[1][a:b, None, None] + np.arange(by)]  # (c, bx, by)
            x = self._dense(0, a, b, self._windows(0, a, b))
            z = np.empty(x.shape[:2] + (by,))
            for i in range(b - a):  # one GEMM per state: numpy's stacked matmul of these shapes does not use BLAS
                np.matmul(x[i], block[i], out=z[i])  # (M, bx) @ (bx, by)
            local = (self._start[1][a:b] - self._lo[1][a:b, None])[..., None] + np.arange(ly)
            out[a - rows.start:b - rows.start] = np.einsum("ijl,ijl->ij", np.take_along_axis(z, local, axis=-1),
                                                           self._windows(1, a, b))
        return out

    def dense_policy_matrix(self, masses: np.ndarray, rows: slice | None = None) -> None:
        """No dense interpolated ``P^pi`` on 2D grids: use :meth:`policy_matrix`."""
        return None

    def policy_matrix(self, masses: np.ndarray, rows: slice | None = None) -> sp.csr_matrix:
        """``P^pi_ik = sum_j m_ij T_ijk`` for action masses ``m`` ``(N, M)``, as a sparse ``(N, N)`` CSR matrix.

        With ``rows`` (a slice of states), ``masses`` holds those rows only and the result is the
        ``(rows, N)`` block, computed by the same operations per row (MPI over states, :mod:`solver.parallel`).
        """
        n, ny, (bx, by) = self.shape[0], self.axes[1].size, self.band
        rows = slice(0, n) if rows is None else rows
        nb = rows.stop - rows.start
        data = np.empty((nb, bx, by))
        cols = np.empty((nb, bx, by), dtype=np.int32)
        for a, b in self._chunks(rows):
            x = self._dense(0, a, b, self._windows(0, a, b)) * masses[a - rows.start:b - rows.start, :, None]
            data[a - rows.start:b - rows.start] = np.swapaxes(x, 1, 2) @ self._dense(1, a, b, self._windows(1, a, b))
            cols[a - rows.start:b - rows.start] = ((self._lo[0][a:b, None, None] + np.arange(bx)[:, None]) * ny
                                                   + self._lo[1][a:b, None, None] + np.arange(by))
        indptr = np.arange(0, nb * bx * by + 1, bx * by, dtype=np.int32 if nb * bx * by < 2 ** 31 else np.int64)
        return sp.csr_matrix((data.ravel(), cols.ravel(), indptr), shape=(nb, n))  # no copy: int32 indices


@dataclass(frozen=True)
class MDP:
    """A discretised entropy-regularised MDP (theory.md §2). See the module docstring for the arrays."""

    states: np.ndarray
    space: ActionSpace
    reward: np.ndarray
    log_mu: np.ndarray
    kernel: GaussianGridKernel | GaussianGridKernel2D
    gamma: float
    tau: float
    rho: np.ndarray

    @property
    def n_states(self) -> int:
        return self.states.shape[0]

    @property
    def n_actions(self) -> int:
        return self.space.n_dofs

    @property
    def weights(self) -> np.ndarray:
        return self.space.weights


def log_reference(space: ActionSpace, reference: str, std: float = 1.0) -> np.ndarray:
    """``log mu(a_j)``: 0 for Lebesgue; the untruncated ``N(0, std^2 I)`` log-density for "gaussian"."""
    if reference == "lebesgue":
        return np.zeros(space.n_dofs)
    a2 = np.sum(space.coords ** 2, axis=1)
    return -0.5 * a2 / std ** 2 - 0.5 * space.dim * math.log(2 * math.pi * std ** 2)


def build_mdp(model: Model, states: np.ndarray, space: ActionSpace, gamma: float, tau: float,
              reference: str = "lebesgue", reference_std: float = 1.0) -> MDP:
    """Discretise ``model`` on the state grid ``states`` and the action space ``space``.

    The model sees ``s`` of shape ``(N, 1)`` for a 1D state grid ``states (N,)`` and ``(N, 1, 2)`` for a 2D grid
    ``states (N, 2)`` (row-major over ``(nx, ny)``, :func:`grid_axes`), and ``a`` of shape ``(1, M)`` for a 1D
    action space and ``(1, M, 2)`` for a 2D one. The kernel is :class:`GaussianGridKernel` on a 1D grid and
    :class:`GaussianGridKernel2D` on a 2D grid.

    Raises:
        ConfigError: if the model's ``action_dim`` is not the dimension of ``space``, or its ``state_dim`` not
            that of ``states``.
    """
    if model.action_dim != space.dim:
        raise ConfigError(f"actions: the model has {model.action_dim}D actions but the action domain is {space.dim}D")
    if not model.single_state and model.state_dim != states.ndim:
        raise ConfigError(f"states: the model has {model.state_dim}D states but the state grid is {states.ndim}D")
    n = states.shape[0]
    s = states[:, None]
    a = space.coords[None, :, :] if model.action_dim == 2 else space.coords[:, 0][None, :]
    reward = _full(model.reward(s, a), (n, space.n_dofs))
    if model.single_state:
        kernel = GaussianGridKernel(states, np.zeros((n, space.n_dofs)) + states[:, None], 1.0)
    elif states.ndim == 2:
        kernel = GaussianGridKernel2D(grid_axes(states), _full(model.dynamics(s, a), reward.shape + (2,)), model.sigma)
    elif model.sigma == 0:  # deterministic dynamics: V interpolated at f(s, a) (solver.interp_kernel)
        kernel = InterpolationKernel(states, _full(model.dynamics(s, a), reward.shape), model.interpolation)
    else:
        kernel = GaussianGridKernel(states, _full(model.dynamics(s, a), reward.shape), model.sigma)
    rho = np.full(n, 1.0 / n)
    return MDP(states=states, space=space, reward=reward, log_mu=log_reference(space, reference, reference_std),
               kernel=kernel, gamma=gamma, tau=tau, rho=rho)


def _full(values, shape: tuple) -> np.ndarray:
    """``values`` as a float array of ``shape``, broadcast and copied only if it is not one already."""
    values = np.asarray(values, dtype=float)
    return values if values.shape == shape else np.broadcast_to(values, shape).copy()


def product_grid(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The 2D grid ``(nx ny, 2)`` of the axes ``x (nx,)``, ``y (ny,)``, row-major: point ``kx * ny + ky`` is
    ``(x_kx, y_ky)`` (the order of every per-state array of a 2D state grid; :func:`grid_axes` inverts it)."""
    return np.stack(np.meshgrid(x, y, indexing="ij"), axis=-1).reshape(-1, 2)


def grid_axes(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The axes ``(x (nx,), y (ny,))`` of a 2D grid ``states (nx ny, 2)`` stored row-major over ``(nx, ny)``.

    Raises:
        ValueError: if ``states`` is not such a grid.
    """
    x, y = np.unique(states[:, 0]), np.unique(states[:, 1])
    grid = product_grid(x, y)
    if grid.shape != states.shape or not np.array_equal(grid, states):
        raise ValueError("states: a 2D state grid must be the row-major product of two 1D grids")
    return x, y
