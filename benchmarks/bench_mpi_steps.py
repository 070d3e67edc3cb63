"""Benchmark: the MPI speed-up of the coupled step, in one ``mpirun -n 2`` job, interleaved (issue 14).

Whole processes (``bench_mpi.py``) are minutes apart, and this machine's speed drifts by 20-50% over minutes, so
their ratio moves by +-0.1. Here both ranks build the problem once and then alternate, in rounds of ``STEPS``
steps (a step as a run takes it: flow step, evaluation, diagnostics row, the stopping test's broadcast):

* **one rank**: rank 0 steps a serial flow; rank 1 sleeps (a polled non-blocking barrier, not a busy wait);
* **two ranks**: both step the distributed flow (:class:`solver.parallel.Partition` over the states);
* **two copies**: each rank steps its own serial flow at the same time, with no communication: the cost of
  sharing the machine (memory bandwidth, caches, the host) with no MPI at all.

Medians over ``ROUNDS`` rounds. ``speed-up``: the median over the rounds of ``one rank / two ranks`` within a
round (a round takes ~1 s, so the machine's drift mostly cancels; the ratio of the medians is printed too).
``contention = two copies / one rank`` is the slowdown of the same work when the other core is busy, so
``2 / contention`` bounds any 2-rank speed-up of this step on this machine. Run with
``.venv/bin/python benchmarks/bench_mpi_steps.py [lqr_1d|lqr_2d_state]`` (it starts ``mpirun -n 2`` itself).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "lqr_1d": ["states.n=241", "actions.cells=1024", "flow.gap_tol=0"],
    "lqr_2d_state": ["states.n=[41,41]", "actions.cells=8", "flow.gap_tol=0"],
}
ROUNDS, STEPS = 21, 10


def launch(case: str) -> int:
    """Run this script under ``mpirun -n 2`` (the benchmark proper)."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        print("mpirun not installed (Debian: openmpi-bin)")
        return 0
    env = os.environ | {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                        "OMPI_MCA_rmaps_base_oversubscribe": "1", "WPGFLOW_BENCH_RANKS": "2"}
    return subprocess.run([mpirun, "-q", "-n", "2", sys.executable, __file__, case], env=env, cwd=ROOT).returncode


class Stepper:
    """A run's step: advance, evaluate, diagnostics row, and the loop's one broadcast (``bench_lqr_1d.Stepper``
    with the stopping test)."""

    def __init__(self, problem, partition):
        from solver import diagnostics, flows, runner

        self.problem, self.record = problem, diagnostics.record
        self.flow = runner.make_flow(problem, partition)
        self.states = flows.trajectory(self.flow, runner.initial_policy(problem.config, problem.mdp))
        self.state = next(self.states)
        self.previous = self.record(self.flow, self.state, problem.J_star)

    def __call__(self):
        self.state.release()
        self.state = next(self.states)
        self.previous = self.record(self.flow, self.state, self.problem.J_star, self.previous)
        self.flow.partition.bcast((self.previous["gap"] <= 0.0, False))


def idle(comm) -> None:
    """Wait for the other rank without using the core: a non-blocking barrier, tested every millisecond."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(1e-3)


def bench(case: str) -> None:
    from mpi4py import MPI

    from solver import config, parallel, runner

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    cfg = config.load(ROOT / "experiments" / f"{case}.toml", CASES[case])
    problem = runner.build(cfg)
    n = problem.mdp.n_states
    serial = Stepper(problem, parallel.Partition(None, n))
    distributed = Stepper(problem, parallel.Partition(comm, n))
    times: dict[str, list[float]] = {"one rank": [], "two ranks": [], "two copies": []}

    def timed(step) -> float:
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(STEPS):
            step()
        elapsed = time.perf_counter() - start
        comm.Barrier()
        return elapsed / STEPS

    for _ in range(ROUNDS):
        if rank == 0:
            comm.Barrier()
            start = time.perf_counter()
            for _ in range(STEPS):
                serial()
            times["one rank"].append((time.perf_counter() - start) / STEPS)
            idle(comm)
        else:
            comm.Barrier()
            idle(comm)
        times["two ranks"].append(timed(distributed))
        times["two copies"].append(timed(serial))
    for stepper in (serial, distributed):  # PETSc's objects go before MPI is finalised
        stepper.state.release()
    if rank != 0:
        return
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{case} ({problem.mdp.n_states} states x {problem.mdp.n_actions} action DOFs), mpirun -n 2, "
          f"{ROUNDS} interleaved rounds of {STEPS} steps; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    for name, t in med.items():
        spread = f"{1e3 * min(times[name]):.2f}-{1e3 * max(times[name]):.2f}"
        print(f"  {name:11s} {1e3 * t:8.2f} ms/step (rounds {spread})")
    paired = statistics.median(a / b for a, b in zip(times["one rank"], times["two ranks"]))
    contention = statistics.median(c / a for a, c in zip(times["one rank"], times["two copies"]))
    print(f"  speed-up one rank / two ranks: {paired:.2f}x (median of the rounds; ratio of the medians "
          f"{med['one rank'] / med['two ranks']:.2f}x); contention (two copies / one rank): {contention:.2f}, so at "
          f"most {2 / contention:.2f}x for two ranks on this machine")


if __name__ == "__main__":
    chosen = sys.argv[1] if len(sys.argv) > 1 else "lqr_1d"
    if os.environ.get("WPGFLOW_BENCH_RANKS") == "2":
        bench(chosen)
    else:
        sys.exit(launch(chosen))
