"""Shipped action meshes, mesh loading and refusal, the [actions] domain keys, and 2D outputs (density.xdmf/png)."""

import math
import tomllib
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh

from solver import cli, config, fem
from solver.config import ConfigError

SHIPPED = [(shape, res) for shape in ("disk", "lshape", "annulus", "rectangle") for res in fem.RESOLUTIONS]
#: Circles of each shape's boundary (radius), and the exact area of the shape.
CIRCLES = {"disk": (1.0,), "annulus": (0.5, 1.0), "lshape": (), "rectangle": ()}
AREA = {"disk": math.pi, "annulus": 0.75 * math.pi, "lshape": 3.0, "rectangle": 4.0}
J11 = 1.8411837813406593  # first zero of J_1': the unit disk's first non-zero Neumann eigenvalue is J11^2


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The z-component of the cross product of 2-vectors (numpy 2 deprecates ``np.cross`` on 2-vectors)."""
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def load(shape, resolution):
    return fem.mesh_space(fem.MESH_DIR / f"{shape}_{resolution}.xdmf")


def boundary_edges(cells):
    """Edges of exactly one triangle, ``(B, 2)``."""
    e = np.sort(np.concatenate([cells[:, [0, 1]], cells[:, [1, 2]], cells[:, [2, 0]]]), axis=1)
    edges, count = np.unique(e, axis=0, return_counts=True)
    return edges[count == 1]


def cotangent_couplings(coords, cells):
    """``omega_jk = sum over the triangles of edge jk of cot(opposite angle) / 2`` (the P1 stiffness, by hand)."""
    omega = {}
    for i in range(3):
        a, b, c = cells[:, i], cells[:, (i + 1) % 3], cells[:, (i + 2) % 3]
        u, v = coords[b] - coords[a], coords[c] - coords[a]
        cot = np.einsum("ij,ij->i", u, v) / np.abs(_cross(u, v))
        for j, k, w in zip(np.minimum(b, c), np.maximum(b, c), cot / 2):
            omega[(j, k)] = omega.get((j, k), 0.0) + w
    return omega


@pytest.mark.parametrize("shape,resolution", SHIPPED)
def test_shipped_mesh_is_delaunay_and_its_couplings_are_the_cotangent_formula(shape, resolution):
    space = load(shape, resolution)
    assert space.dim == 2 and space.cells.shape[1] == 3
    assert space.conductance.min() > 0  # generate.py's check; the loader would have refused omega < 0
    # DOLFINx's assembled K (renumbered) against the cotangent formula on the same coords/cells: 1e-12 relative
    # is round-off of sums of O(1) cotangents
    omega = cotangent_couplings(space.coords, space.cells)
    by_hand = np.array([omega[tuple(e)] for e in space.edges])
    np.testing.assert_allclose(space.conductance, by_hand, rtol=1e-12, atol=1e-12)
    assert len(omega) - space.edges.shape[0] == sum(abs(w) <= 1e-12 for w in omega.values())  # only right angles
    # lumped weights are a third of the adjacent triangles' areas
    p = space.coords[space.cells]
    area = 0.5 * np.abs(_cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]))
    np.testing.assert_allclose(space.weights, np.bincount(space.cells.ravel(), np.repeat(area / 3, 3)), rtol=1e-12)


@pytest.mark.parametrize("shape,resolution", SHIPPED)
def test_shipped_mesh_area_is_exact_up_to_its_circular_segments(shape, resolution):
    """Polygon area + the circular segments cut off by the boundary chords = the exact area (to round-off).

    A chord of length c on a circle of radius r cuts off r^2 (theta - sin theta) / 2 with theta = 2 asin(c / 2r),
    about c^3 / (12 r); summed over a circle the deficit is at most pi h_b^2 / 6: O(h^2).
    """
    space = load(shape, resolution)
    a = space.coords
    bnd = boundary_edges(space.cells)
    radius = np.linalg.norm(a, axis=1)
    deficit = 0.0
    for r in CIRCLES[shape]:
        on = np.all(np.abs(radius[bnd] - r) < 1e-10, axis=1)  # coordinates are stored to 12 digits
        chord = np.linalg.norm(a[bnd[on, 0]] - a[bnd[on, 1]], axis=1)
        assert chord.sum() == pytest.approx(2 * math.pi * r, rel=2e-3)  # the chords go once round the circle
        theta = 2 * np.arcsin(chord / (2 * r))
        segments = 0.5 * r ** 2 * np.sum(theta - np.sin(theta))
        # the O(h^2) bound of the docstring, with its next-order factor 1 + c^2 / (8 r^2) (theta > c / r)
        assert segments <= math.pi * chord.max() ** 2 / 6 * (1 + (chord.max() / r) ** 2 / 8)
        deficit += segments if r == max(CIRCLES[shape]) else -segments  # an inner circle's polygon is a smaller hole
    if not CIRCLES[shape]:  # polygonal domains: every boundary vertex on the straight sides, area exact
        assert np.all(np.isclose(np.abs(a[bnd.ravel()]).max(axis=1), 1.0) | np.isclose(a[bnd.ravel()].min(axis=1), 0))
    # 1e-10: coordinates rounded to 12 significant digits move the area by ~1e-12 per boundary vertex
    assert space.volume + deficit == pytest.approx(AREA[shape], abs=1e-10)


@pytest.mark.parametrize("shape", ["disk", "lshape", "annulus", "rectangle"])
def test_coarse_and_fine_really_differ(shape):
    coarse, fine = load(shape, "coarse"), load(shape, "fine")

    def longest(space):
        return np.linalg.norm(space.coords[space.edges[:, 0]] - space.coords[space.edges[:, 1]], axis=1).max()

    assert fine.n_dofs > 2.5 * coarse.n_dofs
    assert longest(fine) < 0.6 * longest(coarse)


def neumann_gap(space):
    """Second eigenvalue of K v = lambda W v (K the P1 stiffness from the edge couplings, W the lumped mass)."""
    j, k, w = space.edges[:, 0], space.edges[:, 1], space.conductance
    n = space.n_dofs
    K = sp.coo_matrix((np.concatenate([-w, -w, w, w]), (np.concatenate([j, k, j, k]), np.concatenate([k, j, j, k]))),
                      shape=(n, n)).tocsc()
    return eigsh(K, k=2, M=sp.diags(space.weights).tocsc(), sigma=-1.0, which="LM")[0].max()


def test_fine_disk_poincare_constant_is_second_order_accurate():
    """lambda_2 of the unit disk = j'_11^2 = 3.38996 (theory.md §7.4); P1 with lumped mass converges at O(h^2)."""
    exact = J11 ** 2
    errors = {res: abs(neumann_gap(load("disk", res)) - exact) / exact for res in fem.RESOLUTIONS}
    assert errors["fine"] < 3e-4  # measured 1.6e-4: the fine disk supports a 1e-3 Poincare test
    # target edge lengths 0.1 -> 0.04: O(h^2) predicts a ratio 6.25 (measured 6.5)
    assert 4.5 < errors["coarse"] / errors["fine"] < 9


def test_mesh_map_scales_and_moves_the_domain():
    unit = load("disk", "coarse")
    moved = fem.domain_space("disk", resolution="coarse", scale=2.0, center=(1.0, -1.0))
    np.testing.assert_allclose(moved.coords, 1.0 * np.array([1.0, -1.0]) + 2.0 * unit.coords, atol=1e-14)
    assert moved.volume == pytest.approx(4 * unit.volume, rel=1e-13)
    np.testing.assert_allclose(moved.conductance, unit.conductance, rtol=1e-12)  # 2D Laplacian: scale-invariant


def test_builtin_rectangle_domain():
    space = fem.domain_space("rectangle", [-1.0, -1.0], [1.0, 2.0], [4, 6])
    assert space.n_dofs == 5 * 7 + 4 * 6  # crossed diagonals: vertices plus one centre per square
    assert space.volume == pytest.approx(6.0, rel=1e-14)


# --- refusing bad meshes -------------------------------------------------------------------------------------

KITE = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, 0.2], [0.0, -0.2]])


def write_mesh(path, points, cells):
    """A minimal XDMF triangle mesh, XY geometry (XYZ if ``points`` has three columns)."""
    # repr of a plain float (shortest round-trip digits); numpy >= 2 writes np.float64 scalars as "np.float64(-1.0)"
    coords = "\n".join(" ".join(repr(float(x)) for x in p) for p in points)
    geometry = "XY" if points.shape[1] == 2 else "XYZ"
    topology = "\n".join(" ".join(map(str, c)) for c in cells)
    path.write_text(
        '<?xml version="1.0"?>\n<Xdmf Version="3.0">\n<Domain>\n<Grid Name="mesh" GridType="Uniform">\n'
        f'<Topology TopologyType="Triangle" NumberOfElements="{len(cells)}" NodesPerElement="3">\n'
        f'<DataItem Dimensions="{len(cells)} 3" NumberType="Int" Format="XML">\n{topology}\n</DataItem>\n'
        f'</Topology>\n<Geometry GeometryType="{geometry}">\n'
        f'<DataItem Dimensions="{len(points)} {points.shape[1]}" Format="XML">\n'
        f"{coords}\n</DataItem>\n</Geometry>\n</Grid>\n</Domain>\n</Xdmf>\n")
    return path


def test_non_delaunay_mesh_is_refused_with_a_config_error(tmp_path):
    """A flat kite split along its long diagonal: both angles opposite it are ~157 degrees, so omega < 0 there."""
    bad = write_mesh(tmp_path / "bad.xdmf", KITE, [[0, 1, 2], [0, 3, 1]])
    with pytest.raises(ConfigError) as err:
        fem.mesh_space(bad)
    message = str(err.value)
    assert message.startswith(f"actions.domain: mesh {bad} has 1 edge with a positive stiffness coupling")
    assert "Delaunay" in message and "\n" not in message
    # the same four points split along the short diagonal are Delaunay and load
    good = fem.mesh_space(write_mesh(tmp_path / "good.xdmf", KITE, [[0, 3, 2], [1, 2, 3]]))
    assert good.conductance.min() > 0 and good.volume == pytest.approx(0.4, rel=1e-14)


BANDIT_2D = '[mdp]\nmodel = "bandit"\ngamma = 0.9\ntau = 0.5\nparams = {k = 1.0, center = [0.3, -0.2]}\n'


def test_non_delaunay_mesh_is_refused_by_the_cli(tmp_path, capsys):
    bad = write_mesh(tmp_path / "bad.xdmf", KITE, [[0, 1, 2], [0, 3, 1]])
    cfg = tmp_path / "bad.toml"
    cfg.write_text(BANDIT_2D + f'[actions]\ndomain = "{bad}"\n')
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"wpgflow: error: actions.domain: mesh {bad} has 1 edge") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_xyz_geometry_must_be_planar(tmp_path):
    flat = fem.mesh_space(write_mesh(tmp_path / "xyz.xdmf", np.column_stack([KITE, np.zeros(4)]),
                                     [[0, 3, 2], [1, 2, 3]]))
    assert flat.dim == 2 and flat.volume == pytest.approx(0.4, rel=1e-14)
    tilted = write_mesh(tmp_path / "tilted.xdmf", np.column_stack([KITE, [0, 0, 0, 1]]), [[0, 3, 2], [1, 2, 3]])
    with pytest.raises(ConfigError, match="actions.domain: mesh .* is not planar"):
        fem.mesh_space(tilted)


def test_degenerate_mesh_is_refused(tmp_path):
    points = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [1.0, 1.0]])
    flat = write_mesh(tmp_path / "flat.xdmf", points, [[0, 1, 3], [1, 2, 3], [0, 1, 2]])  # last cell: collinear
    with pytest.raises(ConfigError, match="actions.domain: mesh .* has degenerate"):
        fem.mesh_space(flat)


@pytest.mark.parametrize("text,message", [
    (None, "not found"),
    ("not xml at all", "cannot read mesh"),
])
def test_missing_or_unreadable_mesh_file(tmp_path, text, message):
    path = tmp_path / "m.xdmf"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=f"actions.domain: .*{message}"):
        fem.mesh_space(path)


# --- [actions] keys ------------------------------------------------------------------------------------------

def actions(**table):
    raw = {"mdp": {"model": "bandit", "gamma": 0.9, "tau": 0.5}, "actions": table}
    return config.from_dict(raw).actions


def test_domain_defaults_and_resolved_config():
    a = actions(lower=-1, upper=2)  # a 1D config without domain is an interval, as before
    assert (a.domain, a.lower, a.upper, a.cells) == ("interval", -1.0, 2.0, 256)
    assert (a.resolution, a.radius, a.scale, a.center) == (None,) * 4
    d = actions(domain="disk")
    assert (d.resolution, d.radius, d.center, d.scale) == ("fine", 1.0, [0.0, 0.0], None)
    r = actions(domain="rectangle", lower=[-1, 0], upper=[1, 2], cells=8)
    assert (r.lower, r.upper, r.cells) == ([-1.0, 0.0], [1.0, 2.0], [8, 8])
    assert actions(domain="rectangle", lower=[0, 0], upper=[1, 1]).cells == [16, 16]
    assert actions(domain="annulus", scale=2, center=[1, 1], resolution="fine").scale == 2.0
    assert actions(domain="meshes/x.xdmf").resolution is None
    # the run's config.toml holds only the domain's keys and loads back to the same config
    cfg = config.from_dict({"mdp": {"model": "bandit", "gamma": 0.9, "tau": 0.5}, "actions": {"domain": "disk"}})
    written = cfg.to_dict()
    assert set(written["actions"]) == {"domain", "resolution", "radius", "center", "reference", "reference_std"}
    assert config.from_dict(tomllib.loads(config.to_toml(written))) == cfg


@pytest.mark.parametrize("table,message", [
    ({"domain": "sphere"}, "actions.domain: must be one of 'interval', 'rectangle', 'disk', 'lshape', 'annulus' or a "
                           "path to an .xdmf mesh (got 'sphere')"),
    ({"domain": 3}, "actions.domain: must be a string"),
    ({"domain": "disk", "resolution": "medium"}, "actions.resolution: must be one of 'coarse', 'fine'"),
    ({"domain": "disk", "cells": 10},
     "actions.cells: not used by domain 'disk' (its keys: resolution, radius, center)"),
    ({"domain": "disk", "scale": 2}, "actions.scale: not used by domain 'disk'"),
    ({"domain": "lshape", "radius": 2}, "actions.radius: not used by domain 'lshape'"),
    ({"domain": "disk", "radius": -1}, "actions.radius: must be a finite number > 0"),
    ({"domain": "disk", "center": [0, 1, 2]}, "actions.center: must be a list [x, y] of two finite numbers"),
    ({"domain": "disk", "center": [0, float("nan")]}, "actions.center: must be a list [x, y]"),
    ({"domain": "annulus", "scale": 0}, "actions.scale: must be a finite number > 0"),
    ({"domain": "m.xdmf", "resolution": "fine"}, "actions.resolution: not used by domain 'm.xdmf' (its keys: scale"),
    ({"domain": "interval", "upper": 1}, "actions.lower: missing required key"),
    ({"lower": [0, 0], "upper": 1}, "actions.lower: must be a number"),
    ({"lower": 0, "upper": 1, "cells": 1}, "actions.cells: must be an integer >= 2"),
    ({"lower": 0, "upper": 1, "cells": [4, 4]}, "actions.cells: must be an integer"),
    ({"lower": 0, "upper": 1, "radius": 1}, "actions.radius: not used by domain 'interval'"),
    ({"lower": 2, "upper": 1}, "actions.lower: must be < actions.upper"),
    ({"domain": "rectangle", "lower": 0, "upper": [1, 1]}, "actions.lower: must be a list [x, y]"),
    ({"domain": "rectangle", "lower": [0, 1], "upper": [1, 1]}, "actions.lower: must be < actions.upper in both"),
    ({"domain": "rectangle", "lower": [0, 0], "upper": [1, 1], "cells": [4, 0]}, "actions.cells: must be an integer "
                                                                                  ">= 1 or a list [nx, ny]"),
    ({"domain": "rectangle", "lower": [0, 0], "upper": [1, 1], "cells": [4, True]}, "actions.cells: must be"),
    ({"domain": "rectangle", "upper": [1, 1]}, "actions.lower: missing required key"),
])
def test_bad_domain_keys_name_the_key(table, message):
    with pytest.raises(ConfigError) as err:
        actions(**table)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_domain_file_is_refused_at_build(tmp_path):
    from solver import runner

    cfg = config.from_dict({"mdp": {"model": "bandit", "gamma": 0.9, "tau": 0.5, "params": {"center": [0, 0]}},
                            "actions": {"domain": str(tmp_path / "none.xdmf")}})
    with pytest.raises(ConfigError, match="actions.domain: mesh file .*none.xdmf not found"):
        runner.build(cfg)


# --- 2D runs end to end and density.xdmf ---------------------------------------------------------------------

def read_xdmf(path):
    """``(coords, cells, times, fields)`` of a density.xdmf, by plain XML parsing."""
    root = ET.parse(path).getroot()
    mesh = root.find("Domain/Grid[@Name='mesh']")

    def data(node):
        item = node.find("DataItem")
        shape = tuple(int(n) for n in item.get("Dimensions").split())
        return np.array(item.text.split(), float).reshape(shape)

    grids = root.findall("Domain/Grid[@Name='density']/Grid")
    times = np.array([float(g.find("Time").get("Value")) for g in grids])
    fields = [{a.get("Name"): data(a) for a in g.findall("Attribute")} for g in grids]
    return data(mesh.find("Geometry")), data(mesh.find("Topology")).astype(int), times, fields


def test_2d_bandit_on_the_coarse_disk_end_to_end(tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "disk.toml"
    cfg.write_text(BANDIT_2D + '[actions]\ndomain = "disk"\nresolution = "coarse"\n'
                   '[flow]\ndt = 0.05\nt_end = 0.2\n[output]\nsnapshots = 3\n')
    assert cli.main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    for name in ("density.xdmf", "density.png", "policy.png", "solution.npz", "summary.json"):
        assert (out / name).stat().st_size > 0
    with np.load(out / "solution.npz") as npz:
        sol = {k: npz[k] for k in npz.files}
    space = load("disk", "coarse")
    assert sol["actions"].shape == (space.n_dofs, 2) and sol["cells"].shape == space.cells.shape
    np.testing.assert_array_equal(sol["cells"], space.cells)
    # density.xdmf holds the same mesh and snapshots (10 significant digits written) ...
    coords, cells, times, fields = read_xdmf(out / "density.xdmf")
    np.testing.assert_array_equal(coords, sol["actions"])
    np.testing.assert_array_equal(cells, sol["cells"])
    np.testing.assert_array_equal(times, sol["snapshots_t"])
    assert times.tolist() == pytest.approx([0.0, 0.05, 0.2])
    for k, f in enumerate(fields):
        assert set(f) == {"density_s0", "pi_star_s0"}
        np.testing.assert_allclose(f["density_s0"], sol["snapshots_pi"][k, 0], rtol=1e-9)
        np.testing.assert_allclose(f["pi_star_s0"], sol["pi_star"][0], rtol=1e-9)
        assert f["density_s0"] @ space.weights == pytest.approx(1.0, abs=1e-9)  # mass 1 in the file's densities
    # ... and its mesh grid is a valid XDMF mesh for DOLFINx
    assert fem.mesh_space(out / "density.xdmf").volume == pytest.approx(space.volume, rel=1e-14)
    # an independent XDMF reader, where installed (Debian's python3-meshio; not on the clean-clone CI)
    meshio = pytest.importorskip("meshio")
    with meshio.xdmf.TimeSeriesReader(out / "density.xdmf") as reader:
        points, _ = reader.read_points_cells()
        t, point_data, _ = reader.read_data(reader.num_steps - 1)
    np.testing.assert_array_equal(points, sol["actions"])
    assert t == times[-1] and np.allclose(point_data["density_s0"], sol["snapshots_pi"][-1, 0], rtol=1e-9)


def test_1d_run_writes_a_polyline_density_xdmf(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["run", "experiments/bandit_ou.toml", "--out", str(out), "--quiet", "--set", "actions.cells=16",
                     "--set", "flow.t_end=0.05", "--set", "flow.dt=0.01", "--set", "output.snapshots=3"]) == 0
    with np.load(out / "solution.npz") as npz:
        a, snaps, pi_star = npz["actions"], npz["snapshots_pi"], npz["pi_star"]
        assert a.shape == (17,) and "cells" not in npz.files  # the 1D arrays are as before
    coords, cells, times, fields = read_xdmf(out / "density.xdmf")
    assert ET.parse(out / "density.xdmf").getroot().find("Domain/Grid/Topology").get("TopologyType") == "Polyline"
    np.testing.assert_array_equal(coords, np.column_stack([a, np.zeros_like(a)]))
    assert cells.shape == (16, 2) and np.all(np.abs(a[cells[:, 1]] - a[cells[:, 0]]) == pytest.approx(0.75))
    np.testing.assert_allclose(fields[-1]["density_s0"], snaps[-1, 0], rtol=1e-9)
    np.testing.assert_allclose(fields[0]["pi_star_s0"], pi_star[0], rtol=1e-9)
