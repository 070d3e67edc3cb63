"""The action space: a P1 Lagrange finite-element space built with DOLFINx.

This is the only module that imports DOLFINx. It turns a mesh into plain arrays that the rest of
wpgflow works with (UFL forms in, NumPy/SciPy out, as in DOLFINx's ``demo_types.py``):

* ``coords``: DOF coordinates, ``(M, d)``;
* ``weights``: lumped-mass weights ``w_j = \\int phi_j da > 0``, ``(M,)``: action integrals are
  ``\\int f da ~ sum_j w_j f(a_j)`` (the trapezoid rule in 1D);
* ``edges`` and ``conductance``: the mesh edges ``(j, k)`` and ``omega_jk = -K_jk`` from the P1
  stiffness matrix ``K_jk = \\int grad phi_j . grad phi_k da``. The edge-averaged (Scharfetter-Gummel)
  scheme of :mod:`solver.flows` is an M-matrix exactly when every ``omega_jk >= 0`` (always in 1D;
  Delaunay meshes in 2D), which :func:`interval_space` checks.

DOFs are renumbered once (by coordinate in 1D) so that every edge couples DOFs at most
``bandwidth`` apart; the flow stepper then solves banded systems.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class ActionSpace:
    """P1 action space as arrays (see the module docstring for the meaning of each field).

    Attributes:
        coords: ``(M, d)`` DOF coordinates.
        weights: ``(M,)`` lumped-mass weights.
        edges: ``(E, 2)`` DOF pairs ``(j, k)`` joined by a mesh edge, ``j < k``.
        conductance: ``(E,)`` ``omega_jk = -K_jk >= 0``.
        cells: ``(C, d + 1)`` cell-to-DOF connectivity (for plotting).
        bandwidth: ``max |j - k|`` over edges.
    """

    coords: np.ndarray
    weights: np.ndarray
    edges: np.ndarray
    conductance: np.ndarray
    cells: np.ndarray
    bandwidth: int

    @property
    def n_dofs(self) -> int:
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        return self.coords.shape[1]

    @property
    def is_chain(self) -> bool:
        """True for a 1D mesh numbered left to right: edges are exactly ``(0, 1), (1, 2), ...``."""
        e = self.edges
        return self.dim == 1 and e.shape[0] == self.n_dofs - 1 and bool(
            np.all(e[:, 0] == np.arange(e.shape[0])) and np.all(e[:, 1] == e[:, 0] + 1))

    @property
    def volume(self) -> float:
        return float(self.weights.sum())


def dolfinx_version() -> str:
    import dolfinx

    return dolfinx.__version__


@contextmanager
def _quiet_jit():
    """FFCx's JIT compiler logs every C build at INFO level on the root logger; keep stderr clean."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # distutils resets the root level itself, so a level would not hold
    try:
        yield
    finally:
        logging.disable(previous)


def interval_space(lower: float, upper: float, cells: int) -> ActionSpace:
    """P1 space on a uniform interval mesh of ``[lower, upper]`` with ``cells`` cells.

    >>> space = interval_space(0.0, 1.0, 4)
    >>> space.weights.tolist()
    [0.125, 0.25, 0.25, 0.25, 0.125]
    """
    from mpi4py import MPI
    import dolfinx.mesh

    with _quiet_jit():
        mesh = dolfinx.mesh.create_interval(MPI.COMM_SELF, cells, [lower, upper])
        return _space_from_mesh(mesh)


def rectangle_space(lower: tuple[float, float], upper: tuple[float, float], cells: tuple[int, int]) -> ActionSpace:
    """P1 space on a structured triangulation of the rectangle ``[lower, upper]`` (``cells`` per side).

    The "crossed" diagonal pattern (four right triangles per square) is Delaunay for any aspect ratio.
    """
    from mpi4py import MPI
    import dolfinx.mesh

    with _quiet_jit():
        mesh = dolfinx.mesh.create_rectangle(MPI.COMM_SELF, [np.asarray(lower, float), np.asarray(upper, float)],
                                             list(cells), diagonal=dolfinx.mesh.DiagonalType.crossed)
        return _space_from_mesh(mesh)


def _space_from_mesh(mesh) -> ActionSpace:
    import dolfinx.fem
    import ufl

    V = dolfinx.fem.FunctionSpace(mesh, ("Lagrange", 1))
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    stiffness = dolfinx.fem.assemble_matrix(dolfinx.fem.form(ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx))
    stiffness.finalize()
    lumped = dolfinx.fem.assemble_vector(dolfinx.fem.form(v * ufl.dx)).array.copy()
    gdim = mesh.geometry.dim
    coords = V.tabulate_dof_coordinates()[:, :gdim].copy()
    dofmap = V.dofmap.list.array.reshape(-1, mesh.topology.dim + 1).copy()
    K = sp.csr_matrix((stiffness.data.copy(), stiffness.indices.copy(), stiffness.indptr.copy()),
                      shape=(coords.shape[0],) * 2)
    return _renumbered(coords, lumped, K, dofmap)


def _renumbered(coords, weights, K, cells) -> ActionSpace:
    """Renumber DOFs to a small bandwidth and extract edges and conductances from ``K``."""
    if coords.shape[1] == 1:
        order = np.argsort(coords[:, 0], kind="stable")
    else:
        from scipy.sparse.csgraph import reverse_cuthill_mckee

        order = reverse_cuthill_mckee(K.tocsr(), symmetric_mode=True)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    K = K[order][:, order].tocoo()
    upper = K.row < K.col
    j, k, omega = K.row[upper], K.col[upper], -K.data[upper]
    scale = np.abs(K.data).max()
    keep = np.abs(omega) > 1e-12 * scale  # structural zeros of right angles in 2D are round-off
    j, k, omega = j[keep], k[keep], omega[keep]
    if np.any(omega < 0):
        raise ValueError(
            f"{int(np.sum(omega < 0))} mesh edges have a positive stiffness coupling; "
            "the scheme needs a Delaunay mesh (non-obtuse opposite angles) to stay positive")
    edges = np.stack([j, k], axis=1).astype(np.int64)
    return ActionSpace(coords=coords[order], weights=weights[order], edges=edges, conductance=omega,
                       cells=inverse[cells], bandwidth=int(np.max(k - j)) if edges.size else 0)
