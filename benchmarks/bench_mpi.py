"""Benchmark: ``mpirun -n 1`` against ``-n 2`` on lqr_1d at 241 states x 1025 action DOFs (200 steps) and on a
41 x 41 state grid (lqr_2d_state, 145 action DOFs: ``I - gamma P^pi`` solved distributed by PETSc under MPI)
(issue 14).

Whole ``wpgflow run`` processes, interleaved (1 2 1 2 ...), medians of ``ROUNDS`` rounds of the time loop
(``wall_time_s - setup_time_s`` from ``summary.json``), and the largest difference of ``history.csv`` between the
two rank counts (the runs must agree to 1e-10); rank 0's time inside wpgflow's collectives
(``mpi_collective_time_s``: gathers, reductions, broadcasts, including the wait for the other rank) and the model
``T_K = T_rep + T_par / K + C_K`` solved from the two rank counts. Run with
``.venv/bin/python benchmarks/bench_mpi.py [lqr_1d] [lqr_2d_state]``.
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
    "lqr_1d": ["states.n=241", "actions.cells=1024", "flow.t_end=2", "flow.gap_tol=0", "output.snapshots=2"],
    "lqr_2d_state": ["states.n=[41,41]", "actions.cells=8", "flow.t_end=0.3", "flow.gap_tol=0", "output.snapshots=2"],
}
ROUNDS = 5


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
        collective: dict[int, list[float]] = {1: [], 2: []}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(ROUNDS):
                for k in (1, 2):
                    s = run(k, Path(tmp) / f"n{k}", case)
                    loops[k].append(s["wall_time_s"] - s["setup_time_s"])
                    per_step[k].append(s["time_per_step_s"])
                    collective[k].append(s.get("mpi_collective_time_s", 0.0))
            a, b = history(Path(tmp) / "n1"), history(Path(tmp) / "n2")
            diff = max(abs(float(x[c]) - float(y[c])) for x, y in zip(a, b) for c in ("J", "gap", "kl_gibbs_max")
                       if x[c] not in ("", "nan"))
        print(f"{'ranks':>5s} {'loop s':>8s} {'ms/step':>8s} {'in MPI s':>9s} {'speed-up':>9s}")
        loop = {k: statistics.median(loops[k]) for k in (1, 2)}
        for k in (1, 2):
            print(f"{k:5d} {loop[k]:8.2f} {1e3 * statistics.median(per_step[k]):8.2f} "
                  f"{statistics.median(collective[k]):9.2f} {loop[1] / loop[k]:9.2f}")
        # Model T_K = T_rep + T_par / K + C_K (replicated work, divided work, rank 0's time in collectives),
        # solved from the two measurements: T_1 = T_rep + T_par, T_2 - C_2 = T_rep + T_par / 2.
        c2 = statistics.median(collective[2])
        t_par = max(0.0, 2.0 * (loop[1] - (loop[2] - c2)))
        t_rep = max(0.0, loop[1] - t_par)
        print(f"model T_K = T_rep + T_par/K + C_K: T_rep {t_rep:.2f} s ({t_rep / loop[1]:.0%} of one rank's loop), "
              f"T_par {t_par:.2f} s, C_2 {c2:.2f} s; with C_K = C_2: "
              + ", ".join(f"K = {k} -> {loop[1] / (t_rep + t_par / k + c2):.2f}x" for k in (4, 8))
              + f", limit {loop[1] / (t_rep + c2):.2f}x")
        print(f"largest difference of history.csv (J, gap, kl_gibbs_max) between 1 and 2 ranks: {diff:.1e}\n")


if __name__ == "__main__":
    main()
