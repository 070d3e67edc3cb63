"""Distributed policy evaluation (solver/bellman.py ``DistributedResolvent``): ``mpirun -n 2`` equals serial.

On a 2D state grid above ``bellman.DENSE_STATES`` states a serial run solves ``I - gamma P^pi`` by GMRES; under MPI
each rank keeps its own rows of ``P^pi`` in a PETSc matrix (GMRES over the ranks) and only ``V`` is gathered. The
script below evaluates one random policy both ways on every rank and compares ``V``, ``Q``, the adjoint
(occupancy) solve that rank 0's observers make alone, and a collective solve of another right-hand side.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MPIRUN = shutil.which("mpirun")
ENV = os.environ | {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                    "OMPI_MCA_rmaps_base_oversubscribe": "1", "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"}

SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    from mpi4py import MPI
    from solver import bellman, config, parallel, runner

    cfg = config.load("experiments/lqr_2d_state.toml", ["states.n=[41,41]", "actions.cells=2"])
    mdp = runner.build(cfg).mdp
    comm = MPI.COMM_WORLD
    partition = parallel.Partition(comm, mdp.n_states)
    p = np.random.default_rng(0).uniform(0.2, 2.0, size=(mdp.n_states, mdp.n_actions))
    p /= (p @ mdp.weights)[:, None]
    distributed = bellman.evaluate(mdp, p[partition.rows], partition)  # this rank's rows in, its rows of Q out
    serial = bellman.evaluate(mdp, p)
    Q = partition.gather(distributed.own_Q)
    b = np.random.default_rng(1).normal(size=mdp.n_states)
    x = distributed.resolvent.solve(b)  # collective
    adjoint = distributed.resolvent_adjoint(mdp.rho) if comm.rank == 0 else None  # rank 0 alone: no deadlock
    comm.Barrier()
    if comm.rank == 0:
        scale = float(np.max(np.abs(serial.V)))
        print(json.dumps({
            "method": distributed.resolvent.method, "n": mdp.n_states,
            "V": float(np.max(np.abs(distributed.V - serial.V))) / scale,
            "Q": float(np.max(np.abs(Q - serial.Q))) / scale,
            "solve": float(np.max(np.abs(x - serial.resolvent.solve(b)))),
            "adjoint": float(np.max(np.abs(adjoint - serial.resolvent_adjoint(mdp.rho))))}))
    distributed.resolvent.release()
""")


def _on_two_ranks(tmp_path, source: str):
    """Run ``source`` under ``mpirun -n 2`` from the repository root; the JSON of rank 0's last output line."""
    script = tmp_path / "script.py"
    script.write_text(source)
    out = subprocess.run([MPIRUN, "-n", "2", sys.executable, str(script)], capture_output=True, text=True, env=ENV,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (Debian: openmpi-bin)")
def test_distributed_evaluation_equals_serial(tmp_path):
    result = _on_two_ranks(tmp_path, SCRIPT)
    assert result["method"] == "petsc" and result["n"] == 1681
    # the bar, 1e-10: both GMRES to rtol 1e-14 with cond(I - gamma P) <= 19 (measured 7e-15 in V)
    for key in ("V", "Q", "solve", "adjoint"):
        assert result[key] < 1e-10, result


CHECKED = textwrap.dedent("""
    import json
    import numpy as np
    from mpi4py import MPI
    from solver import bellman, config, parallel, runner
    from solver.flows.base import NumericalError, evaluate_checked

    mdp = runner.build(config.load("experiments/lqr_1d.toml", ["states.n=13", "actions.cells=16"])).mdp
    comm = MPI.COMM_WORLD
    partition = parallel.Partition(comm, mdp.n_states)
    outcomes = []
    for bad in (None, mdp.n_states - 1):  # a NaN in the last state: rank 1's rows only
        p = bellman.uniform_policy(mdp)
        if bad is not None:
            p[bad, 3] = np.nan
        try:
            ev = evaluate_checked(mdp, p[partition.rows], 5, 0.05, partition)
            outcomes.append(float(np.max(np.abs(ev.V - bellman.evaluate(mdp, p).V))))
        except NumericalError as exc:
            outcomes.append(str(exc))
    everyone = comm.gather(outcomes)
    if comm.rank == 0:
        print(json.dumps(everyone))
""")


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (Debian: openmpi-bin)")
def test_checked_evaluation_fails_on_every_rank(tmp_path):
    """Under MPI each rank tests only its own rows of p and Q for non-finite values; the flags are reduced, so a
    NaN in one rank's rows makes every rank raise the same NumericalError (no rank left waiting in a collective),
    and a finite policy evaluates to the serial V."""
    ranks = _on_two_ranks(tmp_path, CHECKED)
    assert len(ranks) == 2 and ranks[0] == ranks[1]
    finite, failed = ranks[0]
    assert finite < 1e-12 and failed == "non-finite values in the policy at step 5 (t = 0.05)"


STATES = textwrap.dedent("""
    import json
    import numpy as np
    from mpi4py import MPI
    from solver import config, flows, parallel, runner

    problem = runner.build(config.load("experiments/lqr_1d.toml", ["states.n=13", "actions.cells=16"]))
    comm = MPI.COMM_WORLD
    partition = parallel.Partition(comm, problem.mdp.n_states)
    p0 = runner.initial_policy(problem.config, problem.mdp)
    serial = flows.trajectory(runner.make_flow(problem), p0)
    distributed = flows.trajectory(runner.make_flow(problem, partition), p0)
    out, rows = [], partition.rows
    for _ in range(4):
        a, b = next(serial), next(distributed)
        ungathered = b.p is None and b.g is None and b.evaluation.Q is None
        own = max(float(np.max(np.abs(a.p[rows] - b.own_p))), float(np.max(np.abs(a.g[rows] - b.own_g))),
                  float(np.max(np.abs(a.evaluation.Q[rows] - b.evaluation.own_Q))))
        b.gather(partition)  # collective
        whole = max(float(np.max(np.abs(a.p - b.p))), float(np.max(np.abs(a.g - b.g))),
                    float(np.max(np.abs(a.evaluation.Q - b.evaluation.Q))))
        out.append([ungathered, own, whole])
    everyone = comm.gather(out)
    if comm.rank == 0:
        print(json.dumps(everyone))
""")


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (Debian: openmpi-bin)")
def test_states_stay_distributed_until_gathered(tmp_path):
    """Under MPI a flow state holds its rank's rows of p, g and Q (the whole arrays are None, so nothing reads rows
    it does not have); those rows equal the serial run's, and FlowState.gather gives the serial arrays on every
    rank (1e-12: the same operations row by row; the replicated LU solve agrees to round-off)."""
    ranks = _on_two_ranks(tmp_path, STATES)
    assert len(ranks) == 2
    for steps in ranks:
        assert len(steps) == 4
        for ungathered, own, whole in steps:
            assert ungathered and own < 1e-12 and whole < 1e-12, steps
