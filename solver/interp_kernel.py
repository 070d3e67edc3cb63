"""Deterministic dynamics ``s' = f(s, a)`` (``sigma = 0``) on a uniform 1D state grid: ``V`` interpolated at ``f``.

:class:`InterpolationKernel` has the interface of :class:`solver.mdp.GaussianGridKernel` (``expect(V, rows)``,
``policy_matrix(masses, rows)``, ``dense_policy_matrix``, ``matrix``, ``shape``, ``width``, ``interpolation``).
Row ``(i, j)`` holds the interpolation weights of ``V`` at ``x = f(s_i, a_j)`` clipped to the grid
``[s_0, s_{N-1}]`` (a transition that would leave the grid lands on its edge, as the renormalised Gaussian does
as ``sigma -> 0``):

* ``order = 1`` (linear): ``(1 - t) V_k + t V_{k+1}``, ``x = s_k + t h``. Non-negative weights summing to 1: a
  Markov kernel, so every property of theory.md §3 (monotone ``V^{pi_t}``, the Gibbs fixed point) holds. ``Q``
  is continuous in ``a`` with kinks wherever ``f(s, a)`` crosses a grid point: its second derivative in ``a``
  is a sum of Dirac masses on the continuum, and the measured ``sup |Hess_a Q|`` grows like ``1 / h_a``.
* ``order = 3`` (cubic, Catmull-Rom): ``C^1`` in ``x`` and exact for quadratics; weights
  ``((-t^3 + 2t^2 - t), (3t^3 - 5t^2 + 2), (-3t^3 + 4t^2 + t), (t^3 - t^2)) / 2`` on ``V_{k-1..k+2}`` (end indices
  clamped). They sum to 1 but two are negative on each cell (down to ``-1/16 - ...``, row sums of ``|w|`` at most
  1.25): ``P^pi`` is not a Markov matrix, so monotonicity is not guaranteed (``gamma * 1.25 < 1`` keeps
  ``I - gamma P^pi`` invertible).

The limit ``sigma -> 0`` of :class:`solver.mdp.GaussianGridKernel` on a fixed grid is nearest-point rounding, not
interpolation; low-noise studies refine ``h_s <= sigma / 2`` with ``sigma`` (theory.md §7.5.4).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

#: Interpolation orders: 1 (linear) and 3 (cubic Catmull-Rom).
ORDERS = (1, 3)


def weights(states: np.ndarray, x: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and weights ``(..., order + 1)`` of the interpolation of grid values at ``x`` (clipped).

    Args:
        states: ``(N,)`` uniform grid, ``N >= 2``.
        x: points, any shape.
        order: 1 or 3.
    """
    if order not in ORDERS:
        raise ValueError(f"interpolation order must be one of {ORDERS} (got {order})")
    n = states.size
    h = states[1] - states[0]
    u = (np.clip(x, states[0], states[-1]) - states[0]) / h
    k = np.clip(np.floor(u).astype(np.int64), 0, n - 2)
    t = np.clip(u - k, 0.0, 1.0)
    if order == 1:
        return np.stack([k, k + 1], -1), np.stack([1.0 - t, t], -1)
    t2, t3 = t * t, t * t * t
    w = 0.5 * np.stack([-t3 + 2 * t2 - t, 3 * t3 - 5 * t2 + 2, -3 * t3 + 4 * t2 + t, t3 - t2], -1)
    cols = np.clip(k[..., None] + np.arange(-1, 3), 0, n - 1)
    return cols, w


class InterpolationKernel:
    """``T_ijk`` = the weight of ``V_k`` in the interpolant of ``V`` at ``f(s_i, a_j)`` (module docstring).

    Args:
        states: ``(N,)`` uniform grid.
        mean: ``(N, M)`` next states ``f(s_i, a_j)``.
        order: 1 (linear) or 3 (cubic).
    """

    def __init__(self, states: np.ndarray, mean: np.ndarray, order: int = 1):
        n = states.size
        self.order = order
        self.shape = mean.shape + (n,)
        self.interpolation = None
        cols, w = weights(states, mean, order)
        self.width = w.shape[-1]
        rows = mean.size
        # duplicate (clamped) columns are summed by the CSR constructor's canonical form
        self.matrix = sp.csr_matrix((w.ravel(), cols.ravel(), np.arange(0, rows * self.width + 1, self.width)),
                                    shape=(rows, n))
        self.matrix.sum_duplicates()
        self._block = None

    def expect(self, V: np.ndarray, rows: slice | None = None) -> np.ndarray:
        """``(T V)_ij``, shape ``(N, M)``; only the states ``rows`` (a slice) if given."""
        m = self.shape[1]
        if rows is None:
            return (self.matrix @ V).reshape(self.shape[:2])
        if self._block is None or self._block[0] != (rows.start, rows.stop):
            self._block = ((rows.start, rows.stop), self.matrix[rows.start * m:rows.stop * m])
        return (self._block[1] @ V).reshape(-1, m)

    def dense_policy_matrix(self, masses: np.ndarray, rows: slice | None = None) -> None:
        """No dense fast path for interpolation weights: use :meth:`policy_matrix`."""
        return None

    def policy_matrix(self, masses: np.ndarray, rows: slice | None = None) -> sp.csr_matrix:
        """``P^pi_ik = sum_j m_ij T_ijk`` for action masses ``m`` (``(N, M)``, or the rows ``rows``), sparse."""
        n, m = self.shape[0], self.shape[1]
        rows = slice(0, n) if rows is None else rows
        nb = rows.stop - rows.start
        block = self.matrix[rows.start * m:rows.stop * m]
        # P = S diag(m) T: S sums the M action rows of each state
        summer = sp.csr_matrix((masses.ravel(), np.arange(nb * m), np.arange(0, nb * m + 1, m)), shape=(nb, nb * m))
        return (summer @ block).tocsr()
