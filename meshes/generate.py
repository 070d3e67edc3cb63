"""Regenerate the XDMF action meshes of ``meshes/`` from their gmsh ``.geo`` sources (``make meshes``).

Run with Debian's ``/usr/bin/python3`` (it needs the ``gmsh`` binary and ``python3-meshio``; wpgflow itself
needs neither: it reads the committed XDMF files). For every shape in :data:`SHAPES` and resolution in
:data:`RESOLUTIONS`:

1. ``gmsh -2`` meshes ``<shape>.geo`` (gmsh's Delaunay algorithm) with target edge length ``h`` into a ``.msh``;
2. meshio reads the triangles; unused points (circle centres) are dropped, coordinates are rounded to the
   12 significant digits that the XDMF file stores, and every triangle is made counter-clockwise;
3. Lawson edge flips make the triangulation constrained-Delaunay: an interior edge is flipped while the two
   angles opposite it sum to more than pi, i.e. while its P1 stiffness coupling
   ``omega_jk = -K_jk = (cot alpha + cot beta) / 2`` is negative. Boundary edges are never flipped, so the
   domain does not change. A boundary edge with an obtuse opposite angle (no flip can fix that) is split at
   its midpoint (moved onto the circle for a curved boundary) and the flips are repeated;
4. the mesh is checked: every ``omega_jk >= 0`` (interior edges Delaunay and no obtuse angle opposite a
   boundary edge), which is what keeps the edge-averaged scheme of :mod:`solver.flows` an M-matrix. A mesh
   that fails is not written (the script exits with status 1);
5. the mesh is written as ``<shape>_<resolution>.xdmf``: XDMF 3 with the data inline as XML (no HDF5 file), grid
   name ``mesh``, which ``dolfinx.io.XDMFFile(MPI.COMM_SELF, path, "r").read_mesh()`` reads.

It prints one line per mesh: vertices (= P1 DOFs), triangles, longest edge h, smallest angle, smallest coupling.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import meshio
import numpy as np

HERE = Path(__file__).resolve().parent

#: Shapes (one ``<shape>.geo`` each; unit size, see the .geo comments) and the radii of their circular
#: boundaries (a new boundary vertex on a circle is moved onto it).
SHAPES = {"rectangle": (), "disk": (1.0,), "lshape": (), "annulus": (0.5, 1.0)}
#: Target edge length per resolution. "coarse" is the default of ``[actions] resolution``. The fine disk
#: is finer than the other fine meshes: its P1 Neumann eigenvalue (the Poincare constant (j'_11 / R)^2)
#: is within 5e-4 (consistent mass) and 2e-4 (lumped mass) relative of the exact one.
RESOLUTIONS = {"coarse": 0.1, "fine": 0.05}
FINER = {("disk", "fine"): 0.04}
DIGITS = 12
#: Round-off floor for a coupling to count as zero (right angles of structured patches give cot = 1e-17).
ZERO = 1e-10


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The z-component of the cross product of 2-vectors (numpy 2 deprecates ``np.cross`` on 2-vectors)."""
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def gmsh_triangles(geo: Path, h: float) -> tuple[np.ndarray, np.ndarray]:
    """Mesh ``geo`` with gmsh; return points ``(n, 2)`` (unused ones dropped) and triangles ``(c, 3)``."""
    with tempfile.TemporaryDirectory() as tmp:
        msh = Path(tmp) / "mesh.msh"
        subprocess.run(["gmsh", "-2", "-format", "msh41", "-setnumber", "h", repr(h), str(geo), "-o", str(msh)],
                       check=True, capture_output=True)
        with contextlib.redirect_stdout(io.StringIO()):  # meshio prints an empty line for .msh files
            mesh = meshio.read(msh)
    triangles = np.concatenate([c.data for c in mesh.cells if c.type == "triangle"])
    used, triangles = np.unique(triangles, return_inverse=True)
    points = mesh.points[used, :2]
    return np.array([float(f"{x:.{DIGITS}g}") for x in points.ravel()]).reshape(-1, 2), triangles.reshape(-1, 3)


def counter_clockwise(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    p = points[triangles]
    area2 = _cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    triangles = triangles.copy()
    triangles[area2 < 0] = triangles[area2 < 0][:, [0, 2, 1]]
    return triangles


def cotangents(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """``(c, 3)``: cotangent of the angle at each corner of each triangle."""
    p = points[triangles]
    cot = np.empty(triangles.shape)
    for i in range(3):
        u, v = p[:, (i + 1) % 3] - p[:, i], p[:, (i + 2) % 3] - p[:, i]
        cot[:, i] = np.einsum("ij,ij->i", u, v) / np.abs(_cross(u, v))
    return cot


def couplings(points: np.ndarray, triangles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges ``(e, 2)``, ``omega = -K`` per edge ``(e,)`` and the number of triangles per edge ``(e,)``.

    The edge opposite corner ``i`` of a triangle gets ``cot(angle at i) / 2`` from that triangle.
    """
    opposite = np.concatenate([triangles[:, [1, 2]], triangles[:, [2, 0]], triangles[:, [0, 1]]])
    half_cot = 0.5 * cotangents(points, triangles).T.ravel()
    edges, inverse, count = np.unique(np.sort(opposite, axis=1), axis=0, return_inverse=True, return_counts=True)
    return edges, np.bincount(inverse.ravel(), weights=half_cot, minlength=edges.shape[0]), count


def lawson_flips(points: np.ndarray, triangles: np.ndarray) -> tuple[np.ndarray, int]:
    """Flip interior edges with ``cot alpha + cot beta < 0`` until none is left; return triangles and flip count."""
    triangles = triangles.copy()
    flips = 0
    while True:
        cot = cotangents(points, triangles)
        owner = {}
        bad = None
        for t, tri in enumerate(triangles):
            for i in range(3):
                key = tuple(sorted((tri[(i + 1) % 3], tri[(i + 2) % 3])))
                if key in owner:
                    s, k = owner[key]
                    if cot[t, i] + cot[s, k] < -ZERO:
                        bad = (t, i, s, k)
                        break
                else:
                    owner[key] = (t, i)
            if bad:
                break
        if bad is None:
            return triangles, flips
        t, i, s, k = bad
        a, b, c = triangles[t, i], triangles[t, (i + 1) % 3], triangles[t, (i + 2) % 3]  # edge (b, c)
        d = triangles[s, k]
        triangles[t] = (a, b, d)
        triangles[s] = (a, d, c)
        flips += 1


def split_boundary_edges(points: np.ndarray, triangles: np.ndarray, radii: tuple[float, ...]):
    """Split every boundary edge whose opposite angle is obtuse at its midpoint (moved onto its circle, if any).

    The angle opposite a boundary edge must be <= pi / 2 for ``omega >= 0`` there, and no flip can fix it.
    The midpoint of a straight boundary edge is on the boundary; on a circle of radius ``r`` (both ends at
    ``|a| = r``) it is moved out to ``|a| = r``, so the polygon approaches the circle.
    """
    edges, omega, count = couplings(points, triangles)
    bad = edges[(count == 1) & (omega < -ZERO)]
    if not bad.size:
        return points, triangles
    triangles = [tuple(t) for t in triangles]
    points = list(map(tuple, points))
    for b, c in bad:
        m = 0.5 * (np.asarray(points[b]) + np.asarray(points[c]))
        for r in radii:
            if abs(np.hypot(*points[b]) - r) < 1e-9 and abs(np.hypot(*points[c]) - r) < 1e-9:
                m *= r / np.hypot(*m)
        points.append(tuple(float(f"{x:.{DIGITS}g}") for x in m))
        new = len(points) - 1
        t = next(i for i, tri in enumerate(triangles) if b in tri and c in tri)
        a = next(v for v in triangles[t] if v not in (b, c))
        triangles[t:t + 1] = [(a, b, new), (a, new, c)]
    return np.array(points), counter_clockwise(np.array(points), np.array(triangles))


def write_xdmf(path: Path, points: np.ndarray, triangles: np.ndarray) -> None:
    """XDMF 3, data inline as XML, one uniform grid named ``mesh`` (DOLFINx's default name)."""
    coords = "\n".join(f"{x:.{DIGITS}g} {y:.{DIGITS}g}" for x, y in points)
    cells = "\n".join(" ".join(map(str, t)) for t in triangles)
    path.write_text(
        '<?xml version="1.0"?>\n<Xdmf Version="3.0" xmlns:xi="http://www.w3.org/2001/XInclude">\n<Domain>\n'
        '<Grid Name="mesh" GridType="Uniform">\n'
        f'<Topology TopologyType="Triangle" NumberOfElements="{triangles.shape[0]}" NodesPerElement="3">\n'
        f'<DataItem Dimensions="{triangles.shape[0]} 3" NumberType="Int" Format="XML">\n{cells}\n</DataItem>\n'
        '</Topology>\n<Geometry GeometryType="XY">\n'
        f'<DataItem Dimensions="{points.shape[0]} 2" NumberType="Float" Precision="8" Format="XML">\n{coords}\n'
        '</DataItem>\n'
        '</Geometry>\n</Grid>\n</Domain>\n</Xdmf>\n')


def main() -> int:
    failed = False
    for shape, radii in SHAPES.items():
        for resolution, h in RESOLUTIONS.items():
            points, triangles = gmsh_triangles(HERE / f"{shape}.geo", FINER.get((shape, resolution), h))
            triangles, flips = lawson_flips(points, counter_clockwise(points, triangles))
            for _ in range(10):  # a split may need a further flip; each round halves the offending edges
                points, split = split_boundary_edges(points, triangles, radii)
                if split.shape == triangles.shape:
                    break
                triangles, more = lawson_flips(points, split)
                flips += more
            edges, omega, count = couplings(points, triangles)
            length = np.linalg.norm(points[edges[:, 0]] - points[edges[:, 1]], axis=1)
            angle = np.degrees(np.arctan(1 / cotangents(points, triangles)) % np.pi)
            bad = int(np.sum(omega < -ZERO))
            name = f"{shape}_{resolution}.xdmf"
            print(f"{name:24s} {points.shape[0]:5d} vertices {triangles.shape[0]:5d} triangles  h = {length.max():.4f}"
                  f"  min angle {angle.min():5.2f} deg  max angle {angle.max():6.2f} deg  {flips} flips"
                  f"  min omega {omega.min():.3e} ({int(np.sum(count == 1))} boundary edges)"
                  + (f"  FAILED: {bad} negative couplings, not written" if bad else ""))
            if bad:
                failed = True
                continue
            write_xdmf(HERE / name, points, triangles)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
