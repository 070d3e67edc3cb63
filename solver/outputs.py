"""Run directories: stable file names and columns that other tools read.

A run directory holds

* ``config.toml``: the resolved configuration (defaults filled in, ``--set`` overrides applied);
* ``history.csv``: one row per time step, columns :data:`solver.diagnostics.HISTORY_COLUMNS`, written and
  flushed as the run goes, so a failed run keeps what it computed;
* ``summary.json``: scalar results (see the README for every key);
* ``solution.npz``: ``states (N,)``, ``actions (M,)`` DOF coordinates, ``weights (M,)`` lumped masses,
  ``V_star (N,)``, ``Q_star (N, M)``, ``pi_star (N, M)``, ``V_final (N,)``, ``pi_final (N, M)``,
  ``snapshots_t (K,)``, ``snapshots_pi (K, N, M)``; policies are densities w.r.t. Lebesgue measure;
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

FILES = ("config.toml", "history.csv", "summary.json", "solution.npz", "convergence.png", "density.png",
         "policy.png")


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
    np.savez_compressed(
        path / "solution.npz",
        states=mdp.states, actions=mdp.space.coords[:, 0], weights=mdp.weights,
        V_star=optimum.V, Q_star=optimum.Q, pi_star=optimum.p,
        V_final=final.evaluation.V if final else np.full(mdp.n_states, np.nan),
        pi_final=final.p if final else np.full((mdp.n_states, mdp.n_actions), np.nan),
        snapshots_t=np.array(snapshots.times),
        snapshots_pi=np.array(snapshots.policies).reshape(len(snapshots.times), mdp.n_states, mdp.n_actions))


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
