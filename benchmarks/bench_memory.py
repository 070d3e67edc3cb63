"""Benchmark: memory and time of a 2D state grid, 101 x 101 states x ~1000 action DOFs (issue 3, item 4).

Builds the 2D-state LQR (``A = 0.9 I``, ``B = 0.2 I``, ``sigma = 0.1``) on the states ``[-2, 2]^2`` (``h_s = 0.04``,
so ``sigma / h_s = 2.5``: the grid resolves the noise) with a ``cells x cells`` rectangle of actions ``[-1, 1]^2``,
then runs the stages of one WPG step: policy evaluation (``P^pi`` by the tensor-product kernel, GMRES for ``V``,
``Q = R + gamma T V``), the Gibbs policy and one implicit Euler step of all states. After each stage it prints the
wall time and the peak resident memory of the process (``ru_maxrss``), and at the end the memory formula of
:mod:`solver.mdp` evaluated for this problem. Nothing else runs in the process, so the peak is the solver's.

Run: ``.venv/bin/python benchmarks/bench_memory.py [--n 101] [--cells 22]`` (about a minute at the defaults).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from solver import bellman, diagnostics, flows, mdp as mdp_module
from solver.fem import rectangle_space
from solver.models import lqr

GIB = 2 ** 30


def peak_rss() -> float:
    """Peak resident set size of this process so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=101, help="states per axis (default 101)")
    parser.add_argument("--cells", type=int, default=22, help="action cells per axis (default 22: 1013 DOFs on the crossed mesh)")
    args = parser.parse_args()
    print(f"{'stage':<28} {'seconds':>8} {'peak RSS GiB':>13}")
    start = time.perf_counter()

    def stage(name):
        nonlocal start
        print(f"{name:<28} {time.perf_counter() - start:8.2f} {peak_rss() / GIB:13.3f}", flush=True)
        start = time.perf_counter()

    stage("python + numpy + dolfinx")
    x = np.linspace(-2.0, 2.0, args.n)
    states = np.stack(np.meshgrid(x, x, indexing="ij"), axis=-1).reshape(-1, 2)
    space = rectangle_space((-1.0, -1.0), (1.0, 1.0), (args.cells, args.cells))
    model = lqr(A=0.9, B=[[0.2, 0.0], [0.0, 0.2]], sigma=0.1)
    mdp = mdp_module.build_mdp(model, states, space, 0.9, 0.5)
    stage("build MDP (kernel)")
    p = bellman.uniform_policy(mdp)
    ev = bellman.evaluate(mdp, p)
    stage(f"evaluate ({ev.resolvent.method})")
    g = flows.potential(mdp, ev.Q)
    masses = flows.implicit_step(mdp.space, p * mdp.weights, g, mdp.tau, 0.1)
    stage("implicit step, all states")
    ev.resolvent.release()  # as flows.wasserstein_flow does before it evaluates the next policy
    p = masses / mdp.weights
    state = flows.FlowState(step=1, t=0.1, dt=0.1, p=p, evaluation=bellman.evaluate(mdp, p), g=g)
    stage("evaluate the new policy")
    diagnostics.record(mdp, state, 0.0)
    stage("history row (D^h, adjoint)")
    kernel, (n, m) = mdp.kernel, mdp.reward.shape
    P = state.evaluation.resolvent._P
    estimate = mdp_module.memory_estimate(n, m, kernel.width, kernel.band, kernel.stored)
    print(f"\nN = {n} states, M = {m} action DOFs, E = {space.edges.shape[0]} edges; windows Lx, Ly = "
          f"{kernel.width}, bands bx, by = {kernel.band}, windows stored: {kernel.stored}; P^pi: "
          f"{P.nnz / n:.0f} non-zeros per row")
    print(f"memory formula (solver.mdp.memory_estimate): {estimate / GIB:.3f} GiB; measured peak "
          f"{peak_rss() / GIB:.3f} GiB")


if __name__ == "__main__":
    main()
