"""The discretised MDP of math.md §2: state grid, action DOFs, rewards, reference measure, kernel.

Arrays (``N`` states, ``M`` action DOFs):

* ``reward``: ``R_ij = r(s_i, a_j)``, ``(N, M)``;
* ``log_mu``: ``log mu(a_j)``, ``(M,)`` (reference measure: Lebesgue, or the untruncated ``N(0, std^2)``
  density restricted to the action domain, math.md §8.2);
* ``kernel``: ``T_ijk = P(s_k | s_i, a_j)``, a Gaussian centred at ``f(s_i, a_j)`` restricted to the state
  grid and renormalised, stored as one window of ``L`` consecutive states per ``(i, j)``; the full
  ``N x M x N`` tensor is never built. Memory: ``N * M * L`` values with ``L = min(N, 2 ceil(9 sigma/h) + 1)``.
* ``rho``: initial-state distribution, uniform on the grid (math.md §8.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .config import ConfigError
from .fem import ActionSpace
from .models import Model

#: Kernel windows reach 9 standard deviations: the Gaussian weight beyond is < exp(-40.5) ~ 3e-18,
#: below double-precision round-off relative to the window's peak.
KERNEL_REACH = 9.0

#: Largest dense per-state band of the kernel (``N * M * band`` doubles) kept for BLAS products; larger
#: kernels use the windowed storage alone.
DENSE_BAND_BYTES = 256 * 2 ** 20


class GaussianGridKernel:
    """``T_ijk ∝ exp(-(s_k - f_ij)^2 / (2 sigma^2))`` on a uniform grid, renormalised over the grid.

    Each row ``(i, j)`` keeps the ``L`` consecutive grid states nearest to ``f_ij`` (shifted inwards at the
    ends of the grid so that every window has the same length); the weights outside the window are below
    round-off. Normalisation uses the log-sum-exp shift, so a mean far outside the grid puts its mass on
    the nearest grid states instead of underflowing.

    Args:
        states: ``(N,)`` uniform grid.
        mean: ``(N, M)`` next-state means ``f(s_i, a_j)``.
        sigma: noise standard deviation.
    """

    def __init__(self, states: np.ndarray, mean: np.ndarray, sigma: float):
        n = states.size
        self.shape = mean.shape + (n,)
        if n == 1:
            half = 0
        else:
            h = states[1] - states[0]
            half = int(math.ceil(KERNEL_REACH * sigma / h))
        width = min(n, 2 * half + 1)
        if n > 1:
            centre = np.rint((mean - states[0]) / (states[1] - states[0])).astype(np.int64)
        else:
            centre = np.zeros(mean.shape, dtype=np.int64)
        start = np.clip(centre - half, 0, n - width)
        cols = start[..., None] + np.arange(width)  # (N, M, L)
        logits = -0.5 * ((states[cols] - mean[..., None]) / sigma) ** 2 if n > 1 else np.zeros(cols.shape)
        values = np.exp(logits - logits.max(axis=-1, keepdims=True))
        values /= values.sum(axis=-1, keepdims=True)
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
        local = cols - lo[:, None, None]
        if values.size * band / width * 8 <= DENSE_BAND_BYTES:
            # Small problems (all of 1D): scatter the windows into a dense (N, M, band) array once; the
            # contraction over actions is then one einsum instead of a scatter-add.
            self._dense = np.zeros(mean.shape + (band,))
            np.put_along_axis(self._dense, local, values, axis=-1)
        else:
            self._dense = None
            self._scatter = (np.arange(mean.shape[0])[:, None, None] * band + local).ravel()

    def expect(self, V: np.ndarray, rows: slice | None = None) -> np.ndarray:
        """``(T V)_ij = sum_k T_ijk V_k``, shape ``(N, M)``; only the states ``rows`` (a slice) if given."""
        if rows is None:
            return (self.matrix @ V).reshape(self.shape[:2])
        m = self.shape[1]
        block = self._row_blocks.get((rows.start, rows.stop))
        if block is None:  # built once per block: scipy copies a CSR made of slices of a larger array
            block = self.matrix[rows.start * m:rows.stop * m]
            self._row_blocks = {(rows.start, rows.stop): block}
        return (block @ V).reshape(-1, m)

    def policy_matrix(self, masses: np.ndarray, rows: slice | None = None) -> sp.csr_matrix:
        """``P^pi_ik = sum_j m_ij T_ijk`` for action masses ``m`` ``(N, M)``, as a sparse ``(N, N)`` matrix.

        With ``rows`` (a slice of states), ``masses`` holds those rows only and the result is the
        ``(rows, N)`` block, computed by the same operations per row (MPI over states, :mod:`solver.parallel`).
        """
        n, band = self.shape[0], self._band
        rows = slice(0, n) if rows is None else rows
        nb = rows.stop - rows.start
        if self._dense is not None:
            data = np.einsum("ij,ijb->ib", masses, self._dense[rows]).ravel()
        else:
            per_state = self.shape[1] * self.width
            scatter = self._scatter[rows.start * per_state:rows.stop * per_state] - rows.start * band
            data = np.bincount(scatter, weights=(masses[..., None] * self._values[rows]).ravel(),
                               minlength=nb * band)
        return sp.csr_matrix((data, self._band_cols[rows.start * band:rows.stop * band],
                              np.arange(0, nb * band + 1, band)), shape=(nb, n))


@dataclass(frozen=True)
class MDP:
    """A discretised entropy-regularised MDP (math.md §2). See the module docstring for the arrays."""

    states: np.ndarray
    space: ActionSpace
    reward: np.ndarray
    log_mu: np.ndarray
    kernel: GaussianGridKernel
    gamma: float
    tau: float
    rho: np.ndarray

    @property
    def n_states(self) -> int:
        return self.states.size

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

    The model sees ``a`` of shape ``(1, M)`` for a 1D action space and ``(1, M, 2)`` for a 2D one.

    Raises:
        ConfigError: if the model's ``action_dim`` is not the dimension of ``space``.
    """
    if model.action_dim != space.dim:
        raise ConfigError(f"actions: the model has {model.action_dim}D actions but the action domain is {space.dim}D")
    s = states[:, None]
    a = space.coords[None, :, :] if model.action_dim == 2 else space.coords[:, 0][None, :]
    reward = np.broadcast_to(np.asarray(model.reward(s, a), dtype=float), (states.size, space.n_dofs)).copy()
    if model.single_state:
        mean = np.zeros((states.size, space.n_dofs)) + states[:, None]
        kernel = GaussianGridKernel(states, mean, 1.0)
    else:
        mean = np.broadcast_to(np.asarray(model.dynamics(s, a), dtype=float), reward.shape).copy()
        kernel = GaussianGridKernel(states, mean, model.sigma)
    rho = np.full(states.size, 1.0 / states.size)
    return MDP(states=states, space=space, reward=reward, log_mu=log_reference(space, reference, reference_std),
               kernel=kernel, gamma=gamma, tau=tau, rho=rho)
