"""Run directories: stable file names and columns that other tools read.

A run directory holds

* ``config.toml``: the resolved configuration (defaults filled in, ``--set`` overrides applied);
* ``history.csv``: one row per time step, columns :data:`solver.diagnostics.HISTORY_COLUMNS`, written and
  flushed as the run goes, so a failed run keeps what it computed;
* ``summary.json``: scalar results (see the README for every key);
* ``solution.npz``: ``states (N,)``, ``actions (M,)`` DOF coordinates, ``weights (M,)`` lumped masses,
  ``V_star (N,)``, ``Q_star (N, M)``, ``pi_star (N, M)``, ``V_final (N,)``, ``pi_final (N, M)``,
  ``snapshots_t (K,)``, ``snapshot_states (S,)``, ``snapshots_pi (K, S, M)`` (the policies at those states),
  ``snapshots_V (K, N)``; policies are densities w.r.t. Lebesgue measure. ``snapshot_states`` is every state
  unless ``K N M`` doubles exceed :data:`SNAPSHOT_BYTES` (:func:`snapshot_states`).
  For 2D actions ``actions`` is ``(M, 2)`` and there is also ``cells (C, 3)``, the triangles as DOF indices;
  for a 2D state grid ``states`` is ``(N, 2)``, row-major (state ``kx * ny + ky`` is ``(x_kx, y_ky)``);
* ``density.xdmf``: the snapshots for ParaView (:func:`write_density_xdmf`): a time series of P1 fields on the
  action mesh, ``density_s<i>`` and ``pi_star_s<i>`` for the states ``i`` in :func:`xdmf_states`;
* ``convergence.png``, ``density.png``, ``policy.png`` (see :mod:`solver.plots`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from .config import Config, ConfigError, to_toml
from .diagnostics import HISTORY_COLUMNS
from .flows import FlowState
from .observers import Snapshots

#: Snapshots keep the policy of every state while ``K N M`` doubles fit in this budget; above it, only the states
#: drawn in ``density.png`` and written to ``density.xdmf``, so that a run's memory stays ``O(N M)``.
SNAPSHOT_BYTES = 64 * 2 ** 20

FILES = ("config.toml", "history.csv", "summary.json", "solution.npz", "density.xdmf", "convergence.png",
         "density.png", "policy.png", "rates.csv", "rates.png")


def prepare_run_dir(path: Path, force: bool) -> Path:
    """Create ``path``; refuse (:class:`ConfigError`) if it already holds a run and ``force`` is False.

    With ``force`` only wpgflow's own files are replaced; nothing else in the directory is touched.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: exists and is not a directory")
    existing = [name for name in FILES if (path / name).exists()]
    if existing and not force:
        raise ConfigError(f"--out {path}: run directory exists (has {existing[0]}); "
                          "use --force to overwrite or --out to choose another")
    path.mkdir(parents=True, exist_ok=True)
    for name in existing:
        (path / name).unlink()
    return path


def write_config(path: Path, config: Config) -> None:
    (path / "config.toml").write_text(to_toml(config.to_dict()))


def write_summary(path: Path, summary: dict) -> None:
    (path / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")


def _jsonable(value):
    """NaN and infinities are not JSON: write them as null."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_solution(path: Path, mdp, optimum, final: FlowState | None, snapshots: Snapshots) -> None:
    """Write ``solution.npz`` and ``density.xdmf`` (module docstring)."""
    space = mdp.space
    times = np.array(snapshots.times)
    states = np.arange(mdp.n_states) if snapshots.states is None else snapshots.states
    policies = np.array(snapshots.policies).reshape(times.size, states.size, mdp.n_actions)
    mesh = {"actions": space.coords[:, 0]} if space.dim == 1 else {"actions": space.coords, "cells": space.cells}
    np.savez_compressed(
        path / "solution.npz",
        states=mdp.states, **mesh, weights=mdp.weights,
        V_star=optimum.V, Q_star=optimum.Q, pi_star=optimum.p,
        V_final=final.evaluation.V if final else np.full(mdp.n_states, np.nan),
        pi_final=final.p if final else np.full((mdp.n_states, mdp.n_actions), np.nan),
        snapshots_t=times, snapshot_states=states, snapshots_pi=policies,
        snapshots_V=np.array(snapshots.values).reshape(times.size, mdp.n_states))
    write_density_xdmf(path / "density.xdmf", space.coords, space.cells, times, policies, states, optimum.p)


def xdmf_states(n_states: int) -> list[int]:
    """States written to ``density.xdmf``: the first, the middle and the last."""
    return sorted({0, n_states // 2, n_states - 1})


def shown_states(n_states: int) -> list[int]:
    """States drawn in ``density.png``: at a quarter, half and three quarters of the state order."""
    n = n_states
    return sorted({n // 4, n // 2, (3 * n) // 4}) if n >= 3 else list(range(n))


def snapshot_states(n_states: int, n_actions: int, count: int) -> np.ndarray | None:
    """The states whose snapshot policies a run keeps: None (all) within :data:`SNAPSHOT_BYTES`, else the
    union of :func:`shown_states` and :func:`xdmf_states` (``count + 1`` snapshots: the final state is added)."""
    if 8 * (count + 1) * n_states * n_actions <= SNAPSHOT_BYTES:
        return None
    return np.array(sorted(set(shown_states(n_states)) | set(xdmf_states(n_states))))


def snapshot_rows(kept: np.ndarray, states) -> np.ndarray:
    """Rows of ``snapshots_pi`` holding ``states``, given the sorted ``snapshot_states`` ``kept``."""
    return np.searchsorted(kept, states)


def write_density_xdmf(file: Path, coords: np.ndarray, cells: np.ndarray, times: np.ndarray, policies: np.ndarray,
                       states: np.ndarray, pi_star: np.ndarray) -> None:
    """XDMF 3 time series of the policy densities on the action mesh (readable by ParaView), data inline as XML.

    A grid ``mesh`` (geometry and topology: triangles, or line segments in 1D with ``y = 0``) is followed by a
    temporal collection with one grid per snapshot time, which includes the mesh by XPointer (the layout DOLFINx
    writes) and carries the nodal (P1) fields ``density_s<i>`` (the policy density at state ``i``, w.r.t.
    Lebesgue measure) and ``pi_star_s<i>`` (the optimum, the same at every time) for ``i`` in :func:`xdmf_states`.
    DOLFINx reads the ``mesh`` grid back (``solver.fem.mesh_space``).

    Args:
        coords: ``(M, d)`` DOF coordinates; cells: ``(C, d + 1)`` DOF indices; times: ``(K,)``;
        policies: ``(K, S, M)`` at the states ``states (S,)`` (which include :func:`xdmf_states`);
        pi_star: ``(N, M)``.
    """
    m, d = coords.shape
    xy = coords if d == 2 else np.column_stack([coords[:, 0], np.zeros(m)])
    topology = "Triangle" if d == 2 else "Polyline"

    def item(array: np.ndarray, fmt: str, number: str = "Float") -> str:
        rows = "\n".join(" ".join(fmt % v for v in row) for row in array.reshape(array.shape[0], -1))
        precision = ' Precision="8"' if number == "Float" else ""  # XDMF's default is 4-byte floats
        return (f'<DataItem Dimensions="{" ".join(map(str, array.shape))}" NumberType="{number}"{precision} '
                f'Format="XML">\n{rows}\n</DataItem>')

    mesh = "xpointer(/Xdmf/Domain/Grid[@Name='mesh']/{})"
    parts = ['<?xml version="1.0"?>', '<Xdmf Version="3.0" xmlns:xi="http://www.w3.org/2001/XInclude">', "<Domain>",
             '<Grid Name="mesh" GridType="Uniform">',
             f'<Topology TopologyType="{topology}" NumberOfElements="{cells.shape[0]}" NodesPerElement="{d + 1}">',
             item(cells, "%d", "Int"), "</Topology>", '<Geometry GeometryType="XY">', item(xy, "%.17g"),
             "</Geometry>", "</Grid>", '<Grid Name="density" GridType="Collection" CollectionType="Temporal">']
    written = xdmf_states(pi_star.shape[0])
    policies = policies[:, snapshot_rows(states, written)]
    for t, p in zip(times, policies):
        parts += ['<Grid Name="density" GridType="Uniform">', f'<xi:include xpointer="{mesh.format("Geometry")}"/>',
                  f'<xi:include xpointer="{mesh.format("Topology")}"/>', f'<Time Value="{float(t)!r}"/>']
        for name, field in ((f"{prefix}_s{i}", field) for row, i in enumerate(written)
                            for prefix, field in (("density", p[row]), ("pi_star", pi_star[i]))):
            parts += [f'<Attribute Name="{name}" AttributeType="Scalar" Center="Node">', item(field, "%.10g"),
                      "</Attribute>"]
        parts.append("</Grid>")
    parts += ["</Grid>", "</Domain>", "</Xdmf>", ""]
    file.write_text("\n".join(parts))


def read_history(path: Path) -> dict[str, np.ndarray]:
    with open(path / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {c: np.array([float(r[c]) for r in rows]) for c in HISTORY_COLUMNS}


def read_run(path: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(summary, history, solution)`` of a run directory; :class:`ConfigError` if it is not one."""
    missing = [name for name in ("summary.json", "history.csv", "solution.npz") if not (path / name).exists()]
    if missing:
        raise ConfigError(f"{path}: not a run directory (missing {missing[0]})")
    summary = json.loads((path / "summary.json").read_text())
    with np.load(path / "solution.npz") as npz:
        solution = {k: npz[k] for k in npz.files}
    return summary, read_history(path), solution
