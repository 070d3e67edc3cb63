"""MPI over states (solver/parallel.py): ``mpirun -n 2 wpgflow run`` equals the serial run.

Each rank computes its rows by the same operations as the serial run (row slices, block-diagonal per-state
solves) and the LU is replicated on identical gathered data, so the runs agree to round-off; the issue asks
for 1e-10.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from solver import parallel
from solver.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
WPGFLOW = str(Path(sys.executable).parent / "wpgflow")
MPIRUN = shutil.which("mpirun")
#: Open MPI refuses to run as root without the first two; the others allow more ranks than cores (Open MPI 4 reads
#: OMPI_MCA_*, Open MPI 5, i.e. PRRTE, reads PRTE_MCA_*; each ignores the other's), so 2 ranks start on any machine.
MPI_ENV = os.environ | {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                        "OMPI_MCA_rmaps_base_oversubscribe": "1",
                        "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"}
#: Small lqr_1d: 31 states split 16 + 15, 65 action DOFs; adaptive steps exercise the reduced error estimate.
SMALL = ["--set", "states.n=31", "--set", "actions.cells=64", "--set", "flow.t_end=0.25",
         "--set", "flow.adaptive=true", "--set", "output.snapshots=6", "--quiet"]
#: lqr_2d_state on a 41 x 41 grid: 1681 states > bellman.DENSE_STATES, so every rank runs the same GMRES on the
#: gathered P^pi; 145 action DOFs keep it short.
SMALL_2D_STATES = ["--set", "states.n=[41,41]", "--set", "actions.cells=8", "--set", "flow.t_end=0.3",
                   "--set", "output.snapshots=3", "--quiet"]
#: The issue's requirement. Measured: lqr_1d agrees bit for bit; the 41 x 41 grid to 2.8e-13 (round-off in V*).
TOLERANCE = 1e-10

needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (Debian: openmpi-bin)")


def _wpgflow(out: Path, *extra: str, ranks: int | None = None, case: str = "lqr_1d",
             resume: bool = False) -> subprocess.CompletedProcess:
    """``wpgflow run`` of ``case`` (or, ``resume``, of ``extra`` alone: ``--resume DIR ...``), on ``ranks``."""
    small = {"lqr_1d": SMALL, "lqr_2d_state": SMALL_2D_STATES}[case]
    command = [WPGFLOW, "run", "--quiet", *extra] if resume else [
        WPGFLOW, "run", str(ROOT / "experiments" / f"{case}.toml"), *small, "--out", str(out), *extra]
    if ranks is not None:
        command = [MPIRUN, *_quiet_flag(), "-n", str(ranks), *command]
    return subprocess.run(command, capture_output=True, text=True, env=MPI_ENV, cwd=ROOT, timeout=300)


@functools.cache
def _quiet_flag() -> tuple[str, ...]:
    """``("-q",)`` if this mpirun takes it (Open MPI 4: no banner of its own when a rank exits non-zero), else ``()``
    (Open MPI 5 refuses ``-q`` as an unrecognised option, exit code 213)."""
    probe = subprocess.run([MPIRUN, "-q", "-n", "1", sys.executable, "-c", ""], capture_output=True, env=MPI_ENV,
                           timeout=60)
    return ("-q",) if probe.returncode == 0 else ()


def _error_lines(stderr: str) -> list[str]:
    """wpgflow's lines of an mpirun's stderr (those starting ``wpgflow:``).

    With ``-q`` (Open MPI 4) they must be all of stderr. Without it (Open MPI 5), mpirun adds its own banner
    ("prterun detected that one or more processes exited with non-zero status ...") after them: that is
    mpirun's, not ours, so it is allowed, but nothing from Python (no traceback, no ``XError:``/``XWarning:`` line).
    """
    lines = stderr.strip().splitlines()
    ours = [line for line in lines if line.startswith("wpgflow:")]
    if _quiet_flag():
        assert ours == lines, stderr
    else:
        python = re.compile(r"\s*(Traceback|\w+(Error|Exception|Warning): )")
        assert not any(python.match(line) for line in lines), stderr
    return ours


def _history(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path / "history.csv") as f:
        rows = list(csv.reader(f))
    return rows[0], np.array(rows[1:], dtype=float)


def _numeric(path: Path, name: str = "rates.csv") -> tuple[list[str], np.ndarray]:
    """A results CSV's columns and its numeric columns (the text columns, such as a status, dropped)."""
    with open(path / name) as f:
        rows = list(csv.reader(f))
    numeric = [j for j, value in enumerate(rows[1]) if _is_number(value)]
    return [rows[0][j] for j in numeric], np.array([[row[j] for j in numeric] for row in rows[1:]], dtype=float)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


@needs_mpirun
@pytest.mark.parametrize("case", ["lqr_1d", "lqr_2d_state"])
def test_mpirun_two_ranks_equals_serial(tmp_path, case):
    """history.csv, solution.npz and rates.csv of ``mpirun -n 2`` equal the serial run's to 1e-10. lqr_1d runs to
    t = 0.25 and is then extended (``--resume --extend 0.5``) in both: the checkpoint (the flow's and the collective
    local-rate check's warm starts, gathered) and its restore on every rank are part of what is compared."""
    serial, mpi = _wpgflow(tmp_path / "serial", case=case), _wpgflow(tmp_path / "mpi", ranks=2, case=case)
    assert serial.returncode == 0, serial.stderr
    assert mpi.returncode == 0, mpi.stderr
    if case == "lqr_1d":
        for out, ranks in ((tmp_path / "serial", None), (tmp_path / "mpi", 2)):
            extended = _wpgflow(out, "--resume", str(out), "--extend", "0.5", ranks=ranks, resume=True)
            assert extended.returncode == 0, extended.stderr
    assert json.loads((tmp_path / "mpi" / "summary.json").read_text())["mpi_ranks"] == 2  # really split
    assert json.loads((tmp_path / "serial" / "summary.json").read_text())["mpi_ranks"] == 1
    columns, a = _history(tmp_path / "serial")
    columns_mpi, b = _history(tmp_path / "mpi")
    assert columns == columns_mpi and a.shape == b.shape and a.shape[0] > 3
    assert np.array_equal(np.isnan(a), np.isnan(b))
    assert np.nanmax(np.abs(a - b)) <= TOLERANCE
    s, m = np.load(tmp_path / "serial" / "solution.npz"), np.load(tmp_path / "mpi" / "solution.npz")
    assert sorted(s.files) == sorted(m.files)
    for key in s.files:
        assert s[key].shape == m[key].shape and np.max(np.abs(s[key] - m[key])) <= TOLERANCE, key
    # the local-rate check and the hypothesis ledger split their states over the ranks (collective observers):
    # the same rates.csv and hypotheses.csv (one row per snapshot and state)
    for name, rows in (("rates.csv", 3), ("hypotheses.csv", 3 * s["V_star"].size)):
        columns, a = _numeric(tmp_path / "serial", name)
        columns_mpi, b = _numeric(tmp_path / "mpi", name)
        assert columns == columns_mpi and a.shape == b.shape and a.shape[0] >= rows, name
        assert np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(np.isinf(a), np.isinf(b)), name
        finite = np.isfinite(a)
        scale = np.maximum(1.0, np.abs(a[finite]))  # rates, constants and norms of order 1..1e3: relative 1e-10
        assert np.max(np.abs(a[finite] - b[finite]) / scale) <= TOLERANCE, name
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("serial", "mpi")]
    for key in ("certified_status", "local_rate_check", "continuum_vacuous_states"):
        assert summaries[0][key] == summaries[1][key], key


@needs_mpirun
@pytest.mark.parametrize("extra, key", [
    (["--set", "flow.kind=fisher_rao", "--set", "flow.adaptive=false"], "flow.kind"),  # not MPI-parallel
    (["--set", "flow.dt=-1"], "flow.dt"),  # refused by the config loader on every rank
])
def test_mpirun_config_error_exits_2_with_one_line(tmp_path, extra, key):
    result = _wpgflow(tmp_path / "run", *extra, ranks=2)
    assert result.returncode == 2
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"wpgflow: error: {key}"), result.stderr
    assert not (tmp_path / "run").exists()


@needs_mpirun
def test_mpirun_error_on_rank_0_only_stops_every_rank(tmp_path):
    """An existing run directory is seen by rank 0 alone; every rank must still exit 2 (no hang)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "history.csv").write_text("")
    result = _wpgflow(tmp_path / "run", ranks=2)
    assert result.returncode == 2
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "run directory exists" in lines[0], result.stderr


def test_partition_blocks():
    """Contiguous blocks covering 0..n-1, sizes differing by at most one; the serial gathers are identities."""
    part = parallel.Partition(None, 7)
    assert part.serial and part.rows == slice(0, 7) and part.counts.tolist() == [7]
    x = np.arange(14.0).reshape(7, 2)
    assert part.gather(x) is x and part.max(3.0) == 3.0 and part.bcast("a") == "a"

    class FakeComm:  # sizes and ranks only: the block arithmetic, without MPI
        def __init__(self, size, rank):
            self.size, self.rank = size, rank

        def Get_size(self):
            return self.size

        def Get_rank(self):
            return self.rank

    blocks = [parallel.Partition(FakeComm(3, r), 7).rows for r in range(3)]
    assert blocks == [slice(0, 3), slice(3, 5), slice(5, 7)]
    with pytest.raises(ConfigError, match="states.n"):
        parallel.Partition(FakeComm(3, 0), 2)


@pytest.mark.parametrize("dense", [True, False])
def test_kernel_row_blocks_equal_full_rows(monkeypatch, dense):
    """``policy_matrix``/``expect`` on a block of states reproduce those rows of the full call bit for bit,
    for the dense-band storage and for the windowed scatter-add storage (forced by a zero dense budget)."""
    from solver import budget, mdp as mdp_module
    from solver.fem import interval_space
    from solver.models import build

    if not dense:
        monkeypatch.setattr(budget, "DENSE_BAND_BYTES", 0)
    states = np.linspace(-3, 3, 13)
    mdp = mdp_module.build_mdp(build("lqr", {}), states, interval_space(-3, 3, 16), 0.9, 0.5)
    rng = np.random.default_rng(0)
    masses, V = rng.random((13, 17)), rng.standard_normal(13)
    full_P, full_TV = mdp.kernel.policy_matrix(masses).toarray(), mdp.kernel.expect(V)
    assert (mdp.kernel._dense is not None) == dense  # the dense band is built by the first policy_matrix call
    for rows in (slice(0, 7), slice(7, 13), slice(4, 5)):
        assert np.array_equal(mdp.kernel.policy_matrix(masses[rows], rows).toarray(), full_P[rows])
        assert np.array_equal(mdp.kernel.expect(V, rows), full_TV[rows])
