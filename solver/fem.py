"""The action space: a P1 Lagrange finite-element space built with DOLFINx.

This is the only module that imports DOLFINx. It turns a mesh into plain arrays that the rest of
wpgflow works with (UFL forms in, NumPy/SciPy out, as in DOLFINx's ``demo_types.py``):

* ``coords``: DOF coordinates, ``(M, d)``;
* ``weights``: lumped-mass weights ``w_j = \\int phi_j da > 0``, ``(M,)``: action integrals are
  ``\\int f da ~ sum_j w_j f(a_j)`` (the trapezoid rule in 1D);
* ``edges`` and ``conductance``: the mesh edges ``(j, k)`` and ``omega_jk = -K_jk`` from the P1
  stiffness matrix ``K_jk = \\int grad phi_j . grad phi_k da``. The edge-averaged (Scharfetter-Gummel)
  scheme of :mod:`solver.flows` is an M-matrix exactly when every ``omega_jk >= 0`` (always in 1D;
  Delaunay meshes in 2D), which every constructor below checks.

DOFs are renumbered once (by coordinate in 1D) so that every edge couples DOFs at most
``bandwidth`` apart; the flow stepper then solves banded systems.

Action domains (``[actions] domain``, see :mod:`solver.config`): :func:`interval_space` and
:func:`rectangle_space` mesh in memory; :func:`mesh_space` reads a triangle mesh from an XDMF file, such as the
shipped ``meshes/<shape>_<resolution>.xdmf`` (:data:`MESH_SHAPES` x :data:`RESOLUTIONS`, made by
``meshes/generate.py``); :func:`domain_space` dispatches on the domain name. Every mesh is read on
``MPI.COMM_SELF`` (each MPI rank holds the whole action mesh).

DOLFINx 0.5 (Debian 12) and 0.7 or later (Debian 13: 0.9) are supported; where their APIs differ (function space
constructor, finalising the assembled matrix, the dofmap's cell list), the helpers at the end of this module
pick the call by feature detection, never by version number.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .config import MESH_RESOLUTIONS, MESH_SHAPES, ConfigError

#: Directory of the shipped meshes ``<shape>_<resolution>.xdmf`` (shapes :data:`MESH_SHAPES` of unit size: the
#: disk ``|a| <= 1``; the L-shape ``[-1, 1]^2`` minus ``(0, 1]^2``; the annulus ``1/2 <= |a| <= 1``).
MESH_DIR = Path(__file__).resolve().parent.parent / "meshes"
RESOLUTIONS = MESH_RESOLUTIONS


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

    @cached_property  # the frozen dataclass has a __dict__: computed once per space (4 calls per step)
    def is_chain(self) -> bool:
        """True for a 1D mesh numbered left to right: edges are exactly ``(0, 1), (1, 2), ...``."""
        e = self.edges
        return self.dim == 1 and e.shape[0] == self.n_dofs - 1 and bool(
            np.all(e[:, 0] == np.arange(e.shape[0])) and np.all(e[:, 1] == e[:, 0] + 1))

    @cached_property
    def incidences(self) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """``(E, M)`` 0/1 matrices with a one at ``(e, edges[e, 0])``, resp. ``(e, edges[e, 1])``: ``x @ S`` sums
        edge values ``(n, E)`` into their start, resp. end, nodes. Built once per space."""
        e, m = self.edges.shape[0], self.n_dofs
        return tuple(sp.csr_matrix((np.ones(e), (np.arange(e), self.edges[:, c])), shape=(e, m)) for c in (0, 1))

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

    The "crossed" diagonal pattern (four triangles per cell) is Delaunay only for square cells; other aspect
    ratios give positive stiffness couplings, which the M-matrix check refuses.
    """
    from mpi4py import MPI
    import dolfinx.mesh

    with _quiet_jit():
        mesh = dolfinx.mesh.create_rectangle(MPI.COMM_SELF, [np.asarray(lower, float), np.asarray(upper, float)],
                                             list(cells), diagonal=dolfinx.mesh.DiagonalType.crossed)
        return _space_from_mesh(mesh)


def mesh_space(path: str | Path, scale: float = 1.0, center: tuple[float, float] = (0.0, 0.0),
               key: str = "actions.domain") -> ActionSpace:
    """P1 space on the triangle mesh in the XDMF file ``path``, mapped by ``a -> center + scale a``.

    The file holds one grid named ``mesh`` with triangle cells and XY (or XYZ with z = 0) geometry, data inline
    as XML (what ``meshes/generate.py`` writes) or in an HDF5 file beside it (what DOLFINx writes).

    Raises:
        ConfigError: (naming ``key``) if the file is missing or unreadable, is not a planar triangle mesh, has a
            degenerate cell, or has an edge with a negative coupling ``omega_jk`` (not Delaunay), which would
            make the scheme lose positivity.
    """
    from mpi4py import MPI
    import dolfinx.io

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: mesh file {path} not found (a built-in domain name or a path to an .xdmf mesh)")
    encoding = dolfinx.io.XDMFFile.Encoding
    encoding = encoding.HDF5 if 'Format="HDF"' in path.read_text(errors="replace") else encoding.ASCII
    try:
        with dolfinx.io.XDMFFile(MPI.COMM_SELF, str(path), "r", encoding=encoding) as xdmf:
            mesh = xdmf.read_mesh()
    except RuntimeError as exc:
        raise ConfigError(f"{key}: cannot read mesh {path} as XDMF ({' '.join(str(exc).split())})") from None
    if mesh.topology.cell_type.name != "triangle":
        raise ConfigError(f"{key}: mesh {path} has {mesh.topology.cell_type.name} cells; 2D action domains need "
                          "triangles")
    x = mesh.geometry.x
    if np.any(x[:, 2] != 0):
        raise ConfigError(f"{key}: mesh {path} is not planar (z != 0); action meshes live in the plane")
    x[:, :2] = np.asarray(center, float) + scale * x[:, :2]
    with _quiet_jit():
        return _space_from_mesh(mesh, f"{key}: mesh {path}")


def domain_space(domain: str, lower=None, upper=None, cells=None, resolution: str = "fine", scale: float = 1.0,
                 center: tuple[float, float] = (0.0, 0.0)) -> ActionSpace:
    """The P1 action space of ``[actions] domain`` (validated by :mod:`solver.config`).

    Args:
        domain: "interval" (``lower``, ``upper`` numbers, ``cells`` an int), "rectangle" (``lower``, ``upper``
            2-vectors, ``cells`` ``[nx, ny]``), a shipped shape in :data:`MESH_SHAPES` (the file
            ``MESH_DIR/<domain>_<resolution>.xdmf``), or a path to an XDMF triangle mesh.
        scale, center: the map ``a -> center + scale a`` applied to a mesh read from a file.
    """
    if domain == "interval":
        return interval_space(lower, upper, cells)
    if domain == "rectangle":
        return rectangle_space(tuple(lower), tuple(upper), tuple(cells))
    if domain in MESH_SHAPES:
        return mesh_space(MESH_DIR / f"{domain}_{resolution}.xdmf", scale, center)
    return mesh_space(domain, scale, center)


def _space_from_mesh(mesh, source: str = "mesh") -> ActionSpace:
    import dolfinx.fem
    import ufl

    V = _p1_space(mesh)
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    K = _csr(dolfinx.fem.assemble_matrix(dolfinx.fem.form(ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx)), V)
    lumped = np.array(dolfinx.fem.assemble_vector(dolfinx.fem.form(v * ufl.dx)).array, dtype=float)
    tdim = mesh.topology.dim  # planar meshes only (mesh_space checks z = 0): the coordinates that matter
    coords = np.array(V.tabulate_dof_coordinates()[:, :tdim], dtype=float)
    dofmap = _cell_dofs(V.dofmap, tdim + 1)
    if not (np.all(np.isfinite(K.data)) and np.all(lumped > 0)):
        raise ConfigError(f"{source} has degenerate (zero-area) cells or unused vertices")
    return _renumbered(coords, lumped, K, dofmap, source)


# --- DOLFINx version differences, chosen by feature detection (Debian 12: 0.5.2; Debian 13: 0.9.0; newer) ----

def _p1_space(mesh):
    """The P1 Lagrange space on ``mesh``: ``dolfinx.fem.functionspace`` (0.7 and later), else the 0.5/0.6
    class constructor ``FunctionSpace(mesh, ("Lagrange", 1))`` (from 0.7 on ``FunctionSpace`` is a class that
    wraps an existing C++ space and takes other arguments)."""
    import dolfinx.fem

    make = getattr(dolfinx.fem, "functionspace", None) or dolfinx.fem.FunctionSpace
    return make(mesh, ("Lagrange", 1))


def _csr(A, V) -> sp.csr_matrix:
    """A DOLFINx ``MatrixCSR`` (assembled on ``MPI.COMM_SELF``) as a SciPy CSR matrix of shape ``(M, M)``.

    Ghost contributions are accumulated first: ``finalize()`` in 0.5/0.6, ``scatter_reverse()`` from 0.7 on (on
    one rank there are none, so this only keeps the call correct). The CSR arrays are ``data``/``indices``/
    ``indptr`` in every version (the C++ object in 0.5, the Python wrapper from 0.7 on); they are copied, because
    the matrix owns them, in their own integer types. Ghost rows (a bug on one rank) raise RuntimeError, ghost
    columns SciPy's ValueError.
    """
    (getattr(A, "scatter_reverse", None) or A.finalize)()
    n = V.dofmap.index_map.size_local * V.dofmap.index_map_bs
    indptr = np.array(A.indptr)
    if indptr.size != n + 1:
        raise RuntimeError(f"DOLFINx matrix has {indptr.size - 1} rows for {n} DOFs (ghost rows on one rank?)")
    return sp.csr_matrix((np.array(A.data, dtype=float), np.array(A.indices), indptr), shape=(n, n))


def _cell_dofs(dofmap, per_cell: int) -> np.ndarray:
    """Cell-to-DOF connectivity ``(C, per_cell)``: ``dofmap.list`` is an ``AdjacencyList`` with a flat
    ``.array`` in 0.5/0.6 and a 2D NumPy array from 0.7 on."""
    cells = dofmap.list
    return np.array(getattr(cells, "array", cells)).reshape(-1, per_cell)


def _renumbered(coords, weights, K, cells, source: str = "mesh") -> ActionSpace:
    """Renumber DOFs to a small bandwidth and extract edges and conductances from ``K``.

    Raises:
        ConfigError: (message starting with ``source``) if some ``omega_jk < 0``.
    """
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
        bad = int(np.sum(omega < 0))
        raise ConfigError(
            f"{source} has {bad} edge{'s' if bad > 1 else ''} with a positive stiffness coupling K_jk > 0 "
            "(not Delaunay: an interior edge whose two opposite angles sum to more than 180 degrees, or an obtuse "
            "angle opposite a boundary edge); the scheme is an M-matrix (density >= 0) only if every "
            "omega_jk = -K_jk >= 0: remesh with a Delaunay mesher and flip such edges (see meshes/generate.py)")
    edges = np.stack([j, k], axis=1).astype(np.int64)
    return ActionSpace(coords=coords[order], weights=weights[order], edges=edges, conductance=omega,
                       cells=inverse[cells], bandwidth=int(np.max(k - j)) if edges.size else 0)
