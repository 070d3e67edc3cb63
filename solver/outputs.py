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
  unless ``K N M`` doubles exceed :data:`solver.budget.SNAPSHOT_BYTES` (:func:`snapshot_states`).
  For 2D actions ``actions`` is ``(M, 2)`` and there is also ``cells (C, 3)``, the triangles as DOF indices;
  for a 2D state grid ``states`` is ``(N, 2)``, row-major (state ``kx * ny + ky`` is ``(x_kx, y_ky)``);
* ``density.xdmf``: the snapshots for ParaView (:func:`write_density_xdmf`): a time series of P1 fields on the
  action mesh, ``density_s<i>`` and ``pi_star_s<i>`` for the states ``i`` in :func:`xdmf_states`;
* ``policy.xdmf``: one grid (what ``meshio.read`` opens) with the final policy and ``pi*`` at those states;
* ``rates.csv`` (:mod:`solver.along_flow`) and ``hypotheses.csv`` (:mod:`solver.ledger`): along-flow checks;
* ``convergence.png``, ``density.png``, ``policy.png``, ``rates.png``, ``regularity.png`` (see :mod:`solver.plots`),
  ``density.gif`` (``wpgflow animate``, or ``output.animation = true``);
* ``checkpoint.npz``: the state to resume from (:func:`write_checkpoint`, ``wpgflow run --resume``);
* ``.lock``: locked (``fcntl.flock``) while a run writes the directory (:func:`prepare_run_dir`).

Crash safety: every file but ``history.csv`` is written whole to a temporary file in the run directory and renamed
over its name (:func:`atomic_file`, ``os.replace``), so a reader sees the old file or the new one, never half of
one; ``history.csv`` is appended and flushed row by row. ``summary.json`` says ``status = "running"`` from before
the first step until the run ends (``converged``, ``t_end``, ``interrupted`` or ``failed``). Files are replaced,
never written through: a symlink in the run directory is replaced by the new file, not followed.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from . import budget
from .config import Config, ConfigError, to_toml
from .diagnostics import HISTORY_COLUMNS
from .flows.base import FlowState
from .observers import Snapshots

#: Columns of ``rates.csv`` (:mod:`solver.along_flow`), one row per checked snapshot.
RATES_COLUMNS = ("t", "local_rate", "kappa", "certified_bound", "certified_holds", "certified_margin", "C_h_lo",
                 "C_lo", "bound_continuum", "continuum_holds")

FILES = ("config.toml", "history.csv", "summary.json", "solution.npz", "density.xdmf", "policy.xdmf",
         "convergence.png", "density.png", "policy.png", "rates.csv", "rates.png", "hypotheses.csv", "regularity.png",
         "density.gif", "density.mp4")


#: Written while a run resumes from it (:func:`write_checkpoint`); replaced like the others by ``--force``.
CHECKPOINT = "checkpoint.npz"

#: The lock file of a run directory (never removed: the lock is on the open file, :class:`RunLock`).
LOCK = ".lock"


def _existing(path: Path) -> list[str]:
    """wpgflow's files in ``path``, dangling symlinks included."""
    return [name for name in (*FILES, CHECKPOINT) if os.path.lexists(path / name)]


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<run dir>/.lock``, held until :meth:`release` (or the process ends).

    A second run into the same directory fails to take it at once (no waiting) and is refused.
    """

    def __init__(self, path: Path):
        import fcntl

        self.path = Path(path)
        file = self.path / LOCK
        try:  # O_NOFOLLOW: a symlink named .lock is refused, never followed out of the run directory
            self._fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"--out {path}: cannot write in this directory ({_strerror(exc, file)})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"--out {path}: another wpgflow run is writing this run directory "
                                  "(it holds .lock); wait for it or choose another --out") from None
            raise ConfigError(f"--out {path}: cannot lock the run directory ({_strerror(exc, file)})") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _strerror(exc: OSError, file=None) -> str:
    return f"{exc.strerror or exc}: {exc.filename or file}" if (exc.filename or file) else str(exc.strerror or exc)


def refuse_existing(out: Path, run_dirs: list[tuple[str, Path]], files: tuple[str, ...]) -> None:
    """Refuse (:class:`ConfigError`) a grid of runs under ``out`` whose run directories (``(name, path)``) already
    hold a run, or where one of ``files`` (the grid's own tables and plots) exists: nothing is overwritten
    without ``--force``."""
    for name, path in run_dirs:
        existing = [f for f in FILES if (path / f).exists()]
        if existing:
            raise ConfigError(f"--out {out}: run directory {name} exists (has {existing[0]}); "
                              "use --force to overwrite or --out to choose another")
    for name in files:
        if (out / name).exists():
            raise ConfigError(f"--out {out}: {name} exists; use --force to overwrite or --out to choose another")


def prepare_run_dir(path: Path, force: bool, keep: tuple[str, ...] = ()) -> RunLock:
    """Create ``path`` and lock it (:class:`RunLock`); refuse (:class:`ConfigError`) if it already holds a run and
    ``force`` is False, if another run holds its lock, or if it cannot be created or written.

    With ``force`` only wpgflow's own files are removed (``keep``: those of them to keep, for a resumed run); a
    symlink among them is unlinked, never followed. Nothing else in the directory is touched.

    Returns:
        the lock, held for the run (release it at the end; the process's exit releases it too).
    """
    if os.path.lexists(path) and not path.is_dir():
        raise ConfigError(f"--out {path}: exists and is not a directory")
    existing = [name for name in _existing(path) if name not in keep] if path.is_dir() else []
    if existing and not force:  # refused before anything is created
        raise ConfigError(f"--out {path}: run directory exists (has {existing[0]}); "
                          "use --force to overwrite, --resume to continue it, or --out to choose another")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot create the run directory ({_strerror(exc)})") from None
    except ValueError as exc:  # a NUL byte in the path
        raise ConfigError(f"--out {path!r}: not a usable path ({exc})") from None
    lock = RunLock(path)
    try:
        existing = [name for name in _existing(path) if name not in keep]  # again, under the lock
        if existing and not force:
            raise ConfigError(f"--out {path}: run directory exists (has {existing[0]}); "
                              "use --force to overwrite, --resume to continue it, or --out to choose another")
        for name in existing:
            try:
                (path / name).unlink()  # a symlink is removed itself: its target is never touched
            except IsADirectoryError:
                raise ConfigError(f"--out {path}: {name} is a directory; remove it or choose another --out") from None
            except OSError as exc:
                raise ConfigError(f"--out {path}: cannot remove {name} ({_strerror(exc)})") from None
    except BaseException:
        lock.release()
        raise
    return lock


@contextlib.contextmanager
def atomic_file(file: Path, binary: bool = True, sync: bool = True):
    """Write ``file`` atomically: yield a temporary file in the same directory, then ``os.replace`` it over ``file``.

    The temporary file is created with ``O_EXCL`` (never through a symlink), flushed (and fsync'ed if ``sync``:
    the rename is then safe against a power loss too, not only against a killed process) before the rename; on
    any error (a full disk, an interrupt) it is removed and ``file`` is left as it was. A symlink named ``file`` is
    replaced by the new file, not followed.
    """
    file = Path(file)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # the permissions of a normally created file, not mkstemp's 0600
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as f:
            fd = None
            yield f
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(file: Path, text: str) -> None:
    """``file.write_text(text)``, atomically (:func:`atomic_file`)."""
    with atomic_file(file) as f:
        f.write(text.encode("utf-8"))


def write_npz(file: Path, arrays: dict, compress: bool = True, sync: bool = True) -> None:
    """``numpy.savez(_compressed)`` of ``arrays``, atomic and deterministic (byte-identical for equal arrays).

    ``numpy.savez`` stamps each member with the current time; here every member has the fixed date 1980-01-01,
    so equal inputs give equal files. Readable by :func:`numpy.load`; no pickles.
    """
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with atomic_file(file, sync=sync) as f, zipfile.ZipFile(f, "w", compression=method) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = method
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def write_config(path: Path, config: Config) -> None:
    write_text_atomic(path / "config.toml", to_toml(config.to_dict()))


def write_summary(path: Path, summary: dict) -> None:
    """Write ``summary.json`` atomically (NaN and infinities as null)."""
    write_text_atomic(path / "summary.json", json.dumps(jsonable(summary), indent=2) + "\n")


def write_failed_summary(path: Path, summary: dict) -> None:
    """Last resort when :func:`write_summary` itself fails (a full disk): truncate ``summary.json`` in place (which
    frees its blocks) and write ``summary`` there. Not atomic, but a reader finds ``status`` = ``failed`` rather
    than a stale ``running``."""
    with contextlib.suppress(OSError):
        with open(path / "summary.json", "w") as f:
            f.write(json.dumps(jsonable(summary)) + "\n")


def truncate_partial_line(file: Path) -> None:
    """Cut ``file`` after its last newline (a row half-written when the disk filled up); no-op if complete."""
    with contextlib.suppress(OSError):
        with open(file, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)


def jsonable(value):
    """NaN and infinities are not JSON: write them as null (tuples as lists)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
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
    write_npz(path / "solution.npz", dict(
        states=mdp.states, **mesh, weights=mdp.weights,
        V_star=optimum.V, Q_star=optimum.Q, pi_star=optimum.p,
        V_final=final.evaluation.V if final else np.full(mdp.n_states, np.nan),
        pi_final=final.p if final else np.full((mdp.n_states, mdp.n_actions), np.nan),
        snapshots_t=times, snapshot_states=states, snapshots_pi=policies,
        snapshots_V=np.array(snapshots.values).reshape(times.size, mdp.n_states)))
    write_density_xdmf(path / "density.xdmf", space.coords, space.cells, times, policies, states, optimum.p)


def xdmf_states(n_states: int) -> list[int]:
    """States written to ``density.xdmf``: the first, the middle and the last."""
    return sorted({0, n_states // 2, n_states - 1})


def shown_states(n_states: int) -> list[int]:
    """States drawn in ``density.png``: at a quarter, half and three quarters of the state order."""
    n = n_states
    return sorted({n // 4, n // 2, (3 * n) // 4}) if n >= 3 else list(range(n))


def snapshot_states(n_states: int, n_actions: int, count: int) -> np.ndarray | None:
    """The states whose snapshot policies a run keeps: None (all) within :data:`solver.budget.SNAPSHOT_BYTES`, else the
    union of :func:`shown_states` and :func:`xdmf_states` (``count + 1`` snapshots: the final state is added)."""
    if 8 * (count + 1) * n_states * n_actions <= budget.SNAPSHOT_BYTES:
        return None
    return np.array(sorted(set(shown_states(n_states)) | set(xdmf_states(n_states))))


def snapshot_rows(kept: np.ndarray, states) -> np.ndarray:
    """Rows of ``snapshots_pi`` holding ``states``, given the sorted ``snapshot_states`` ``kept``."""
    return np.searchsorted(kept, states)


def xdmf_time(t: float) -> str:
    """A flow time as written in XDMF: 12 significant digits, so ``0.15000000000000002`` is ``0.15``."""
    return f"{float(t):.12g}"


def _xdmf_item(array: np.ndarray, fmt: str, number: str = "Float") -> str:
    """An inline XML ``DataItem`` of ``array`` (rows on lines), 8-byte floats (XDMF's default is 4-byte)."""
    rows = "\n".join(" ".join(fmt % v for v in row) for row in array.reshape(array.shape[0], -1))
    precision = ' Precision="8"' if number == "Float" else ""
    return (f'<DataItem Dimensions="{" ".join(map(str, array.shape))}" NumberType="{number}"{precision} '
            f'Format="XML">\n{rows}\n</DataItem>')


def _xdmf_mesh(coords: np.ndarray, cells: np.ndarray, fields: list[tuple[str, np.ndarray]]) -> list[str]:
    """The uniform grid ``mesh``: topology (triangles, or 2-node ``Polyline`` segments in 1D with ``y = 0``),
    geometry ``XY`` and the nodal ``fields``."""
    m, d = coords.shape
    xy = coords if d == 2 else np.column_stack([coords[:, 0], np.zeros(m)])
    topology = "Triangle" if d == 2 else "Polyline"
    parts = ['<Grid Name="mesh" GridType="Uniform">',
             f'<Topology TopologyType="{topology}" NumberOfElements="{cells.shape[0]}" NodesPerElement="{d + 1}">',
             _xdmf_item(cells, "%d", "Int"), "</Topology>", '<Geometry GeometryType="XY">', _xdmf_item(xy, "%.17g"),
             "</Geometry>"]
    parts += _xdmf_fields(fields)
    return parts + ["</Grid>"]


def _xdmf_fields(fields: list[tuple[str, np.ndarray]]) -> list[str]:
    parts = []
    for name, field in fields:
        parts += [f'<Attribute Name="{name}" AttributeType="Scalar" Center="Node">', _xdmf_item(field, "%.10g"),
                  "</Attribute>"]
    return parts


_XDMF_HEAD = ['<?xml version="1.0"?>', '<Xdmf Version="3.0" xmlns:xi="http://www.w3.org/2001/XInclude">', "<Domain>"]
_XDMF_TAIL = ["</Domain>", "</Xdmf>", ""]


def write_density_xdmf(file: Path, coords: np.ndarray, cells: np.ndarray, times: np.ndarray, policies: np.ndarray,
                       states: np.ndarray, pi_star: np.ndarray) -> None:
    """Write ``density.xdmf`` (the time series) and ``policy.xdmf`` (one grid) beside it; XDMF 3, data inline as XML.

    ``density.xdmf``: a grid ``mesh`` (geometry and topology: triangles, or line segments in 1D with ``y = 0``)
    followed by a temporal collection with one grid per snapshot time, which includes the mesh by XPointer (the
    layout DOLFINx and meshio's ``TimeSeriesWriter`` write) and carries the nodal (P1) fields ``density_s<i>``
    (the policy density at state ``i``, w.r.t. Lebesgue measure) and ``pi_star_s<i>`` (the optimum, the same at
    every time) for ``i`` in :func:`xdmf_states`. Times are written by :func:`xdmf_time`. Readers: ParaView's
    Xdmf3 readers, ``meshio.xdmf.TimeSeriesReader``, DOLFINx (the ``mesh`` grid: ``solver.fem.mesh_space``).

    ``policy.xdmf``: the single uniform grid ``mesh`` with the nodal fields ``pi_final_s<i>`` (the last snapshot,
    the final policy) and ``pi_star_s<i>``. ``meshio.read`` opens only files with exactly one grid (every meshio
    release: "Only supports one grid right now"), which a time series cannot be; this is the file for it.

    Args:
        coords: ``(M, d)`` DOF coordinates; cells: ``(C, d + 1)`` DOF indices; times: ``(K,)``;
        policies: ``(K, S, M)`` at the states ``states (S,)`` (which include :func:`xdmf_states`);
        pi_star: ``(N, M)``.
    """
    file = Path(file)
    written = xdmf_states(pi_star.shape[0])
    policies = policies[:, snapshot_rows(states, written)]
    mesh = "xpointer(/Xdmf/Domain/Grid[@Name='mesh']/{})"
    parts = _XDMF_HEAD + _xdmf_mesh(coords, cells, []) + [
        '<Grid Name="density" GridType="Collection" CollectionType="Temporal">']
    for t, p in zip(times, policies):
        parts += ['<Grid Name="density" GridType="Uniform">', f'<xi:include xpointer="{mesh.format("Geometry")}"/>',
                  f'<xi:include xpointer="{mesh.format("Topology")}"/>', f'<Time Value="{xdmf_time(t)}"/>']
        parts += _xdmf_fields([(f"{prefix}_s{i}", field) for row, i in enumerate(written)
                               for prefix, field in (("density", p[row]), ("pi_star", pi_star[i]))])
        parts.append("</Grid>")
    parts += ["</Grid>"] + _XDMF_TAIL
    with atomic_file(file, binary=False) as f:  # both files atomic, like every other file of a run
        f.write("\n".join(parts))
    if policies.shape[0]:
        final = [(f"{prefix}_s{i}", field) for row, i in enumerate(written)
                 for prefix, field in (("pi_final", policies[-1, row]), ("pi_star", pi_star[i]))]
        with atomic_file(file.with_name("policy.xdmf"), binary=False) as f:
            f.write("\n".join(_XDMF_HEAD + _xdmf_mesh(coords, cells, final) + _XDMF_TAIL))


def history_rows(path: Path) -> list[dict[str, float]]:
    """The rows of ``<run dir>/history.csv`` as dicts of floats (the exact values: they are written by ``repr``).

    A last line cut short (a run killed while writing it) is dropped.

    Raises:
        ConfigError: naming the file, if it is missing, unreadable, lacks a column of
            :data:`~solver.diagnostics.HISTORY_COLUMNS` or holds a value that is not a number.
    """
    file = Path(path) / "history.csv"
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{file}: missing (not a run directory?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read it ({exc.__class__.__name__})") from None
    complete = text if text.endswith("\n") or "\n" not in text else text[:text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(complete))
    missing = [c for c in HISTORY_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ConfigError(f"{file}: damaged or not a wpgflow history (missing column {missing[0]!r}; "
                          f"expected {', '.join(HISTORY_COLUMNS)})")
    rows = []
    for number, row in enumerate(reader, start=2):
        try:
            rows.append({c: float(row[c]) for c in HISTORY_COLUMNS})
        except (TypeError, ValueError):
            raise ConfigError(f"{file}: damaged at line {number} (a value is missing or not a number)") from None
    return rows


def read_history(path: Path) -> dict[str, np.ndarray]:
    """The columns of ``history.csv`` (:func:`history_rows`)."""
    rows = history_rows(path)
    return {c: np.array([r[c] for r in rows], dtype=float) for c in HISTORY_COLUMNS}


def read_summary(path: Path) -> dict:
    """``summary.json`` of a run directory; :class:`ConfigError` naming the file if it is missing or damaged."""
    file = Path(path) / "summary.json"
    try:
        summary = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: missing (not a run directory?)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{file}: damaged or not JSON ({exc.__class__.__name__}); rerun with --force") from None
    if not isinstance(summary, dict) or "status" not in summary:
        raise ConfigError(f"{file}: damaged (no 'status' key)")
    return summary


def read_npz(file: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file; :class:`ConfigError` naming it if it is missing, truncated or corrupt."""
    file = Path(file)
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise ConfigError(f"{file}: missing") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError) as exc:
        raise ConfigError(f"{file}: damaged or truncated ({exc.__class__.__name__}); rerun the run") from None


#: Arrays of ``solution.npz`` that every reader may index.
SOLUTION_KEYS = ("states", "actions", "weights", "V_star", "Q_star", "pi_star", "V_final", "pi_final",
                 "snapshots_t", "snapshot_states", "snapshots_pi", "snapshots_V")


def read_run(path: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(summary, history, solution)`` of a run directory; :class:`ConfigError` naming the damaged file otherwise.

    An interrupted or failed run is read from what it wrote; a run still running (or killed without a chance to
    finish, ``status = "running"``) has no ``solution.npz`` yet and is refused, naming the missing file.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a run directory (no such directory)")
    missing = [name for name in ("summary.json", "history.csv", "solution.npz") if not (path / name).exists()]
    if missing:
        status = ""
        if missing[0] == "solution.npz" and (path / "summary.json").exists():
            with contextlib.suppress(ConfigError):
                status = f"; its summary says status {read_summary(path)['status']!r}"
        raise ConfigError(f"{path}: not a run directory, or not a complete one (missing {missing[0]}{status})")
    summary = read_summary(path)
    solution = read_npz(path / "solution.npz")
    absent = [k for k in SOLUTION_KEYS if k not in solution]
    if absent:
        raise ConfigError(f"{path / 'solution.npz'}: damaged (no array {absent[0]!r})")
    history = read_history(path)
    if history["t"].size == 0:
        raise ConfigError(f"{path / 'history.csv'}: holds no rows")
    return summary, history, solution


def write_checkpoint(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write ``checkpoint.npz`` atomically: ``arrays`` plus ``meta`` as JSON text in the array ``meta`` (no pickles).
    Uncompressed and not fsync'ed, as it is rewritten often during the run (atomic against a killed process)."""
    write_npz(Path(path) / CHECKPOINT, {**arrays, "meta": np.array(json.dumps(jsonable(meta)))}, compress=False,
              sync=False)


def read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """``(arrays, meta)`` of ``checkpoint.npz`` (:func:`write_checkpoint`); :class:`ConfigError` naming the file."""
    arrays = read_npz(Path(path) / CHECKPOINT)
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except (KeyError, ValueError):
        raise ConfigError(f"{Path(path) / CHECKPOINT}: damaged (no readable 'meta')") from None
    return arrays, meta


def write_rates(path, along) -> None:
    """Write ``rates.csv`` (columns :data:`RATES_COLUMNS`, one row per snapshot) into the run directory ``path``."""
    with atomic_file(Path(path) / "rates.csv", binary=False) as f:
        writer = csv.writer(f)
        writer.writerow(RATES_COLUMNS)
        for row in along.rows():
            writer.writerow([("true" if row[c] else "false") if isinstance(row[c], bool) else repr(row[c])
                             for c in RATES_COLUMNS])


def read_rates(path) -> dict[str, np.ndarray] | None:
    """The columns of ``rates.csv`` in the run directory ``path`` (those its header names), or None if there is none."""
    file = Path(path) / "rates.csv"
    if not file.exists():
        return None
    try:
        with open(file, newline="") as f:
            rows = list(csv.DictReader(f))
        value = {"true": 1.0, "false": 0.0}  # booleans are written true / false
        return {c: np.array([value[r[c]] if r[c] in value else float(r[c]) for r in rows])
                for c in (rows[0].keys() if rows else RATES_COLUMNS)}
    except (OSError, UnicodeDecodeError, TypeError, ValueError, csv.Error) as exc:
        raise ConfigError(f"{file}: damaged ({exc.__class__.__name__})") from None
