"""Benchmark: ``mpirun -n 1`` against ``-n 2`` on lqr_1d at 241 states x 1025 action DOFs and on a 41 x 41 state
grid (lqr_2d_state, 145 action DOFs: ``I - gamma P^pi`` solved distributed by PETSc under MPI) (issue 14).

Whole ``wpgflow run`` processes, interleaved (1 2 1 2 ...), medians of ``ROUNDS`` rounds of the time loop
(``wall_time_s - setup_time_s`` from ``summary.json``), and the largest difference of ``history.csv`` between the
two rank counts (the runs must agree to 1e-10). Run with ``.venv/bin/python benchmarks/bench_mpi.py``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "lqr_1d": ["states.n=241", "actions.cells=1024", "flow.t_end=0.5", "flow.gap_tol=0", "output.snapshots=2"],
    "lqr_2d_state": ["states.n=[41,41]", "actions.cells=8", "flow.t_end=0.3", "flow.gap_tol=0", "output.snapshots=2"],
}
ROUNDS = 3


def run(ranks: int, out: Path, case: str = "lqr_1d") -> dict:
    mpirun = shutil.which("mpirun")
    wpgflow = str(Path(sys.executable).parent / "wpgflow")
    env = os.environ | {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                        "OMPI_MCA_rmaps_base_oversubscribe": "1"}
    sets = [item for key in CASES[case] for item in ("--set", key)]
    config = str(ROOT / "experiments" / f"{case}.toml")
    subprocess.run([mpirun, "-q", "-n", str(ranks), wpgflow, "run", config, *sets, "--quiet", "--force",
                    "--out", str(out)], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def history(out: Path) -> list[dict]:
    with open(out / "history.csv") as f:
        return list(csv.DictReader(f))


def main(argv=None) -> None:
    cases = (argv if argv is not None else sys.argv[1:]) or list(CASES)
    if shutil.which("mpirun") is None:
        print("mpirun not installed (Debian: openmpi-bin)")
        return
    for case in cases:
        print(f"{case} {' '.join(CASES[case])}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        loops: dict[int, list[float]] = {1: [], 2: []}
        per_step: dict[int, list[float]] = {1: [], 2: []}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(ROUNDS):
                for k in (1, 2):
                    s = run(k, Path(tmp) / f"n{k}", case)
                    loops[k].append(s["wall_time_s"] - s["setup_time_s"])
                    per_step[k].append(s["time_per_step_s"])
            a, b = history(Path(tmp) / "n1"), history(Path(tmp) / "n2")
            diff = max(abs(float(x[c]) - float(y[c])) for x, y in zip(a, b) for c in ("J", "gap", "kl_gibbs_max")
                       if x[c] not in ("", "nan"))
        print(f"{'ranks':>5s} {'loop s':>8s} {'ms/step':>8s} {'speed-up':>9s}")
        base = statistics.median(loops[1])
        for k in (1, 2):
            loop = statistics.median(loops[k])
            print(f"{k:5d} {loop:8.2f} {1e3 * statistics.median(per_step[k]):8.2f} {base / loop:9.2f}")
        print(f"largest difference of history.csv (J, gap, kl_gibbs_max) between 1 and 2 ranks: {diff:.1e}\n")


if __name__ == "__main__":
    main()
