"""Benchmark: one batched implicit WPG step on 2D action meshes, banded LAPACK vs SuperLU (fokker_planck.implicit_step).

For crossed-diagonal meshes of the square [-3, 3]^2 with about 250, 550, 1000 and 4000 DOFs and N = 1, 41, 121
states, prints the time of one ``implicit_step`` (edge rates + assembly + solve) for ``method="banded"`` and
``method="sparse"``, their ratio, the method ``"auto"`` picks, and the largest difference between the two.
A 1D row (interval, 257 DOFs) shows why 1D stays banded. Potentials are random Gaussians bumps (the cost does
not depend on the values). Run: ``.venv/bin/python benchmarks/bench_2d_action.py`` (about a minute).
"""

from __future__ import annotations

import time

import numpy as np

from solver.flows import fokker_planck
from solver.fem import interval_space, rectangle_space


def seconds_per_call(fn, budget=1.0, min_calls=2):
    """Mean wall time per call over at least ``min_calls`` calls and ``budget`` seconds (after one warm-up)."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < budget:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def case(space, n, rng):
    """Random masses and potentials for ``n`` states on ``space``."""
    centres = rng.uniform(-1, 1, size=(n, 1, space.dim))
    g = -np.sum((space.coords[None] - centres) ** 2, axis=-1) / 0.5
    p = rng.uniform(0.1, 1.0, size=(n, space.n_dofs))
    return p / (p @ space.weights)[:, None] * space.weights, g


def main():
    rng = np.random.default_rng(0)
    spaces = [("interval", interval_space(-3.0, 3.0, 256))]
    spaces += [("square", rectangle_space((-3.0, -3.0), (3.0, 3.0), (c, c))) for c in (11, 16, 22, 45)]
    header = f"{'mesh':>8} {'DOFs':>5} {'bw':>4} {'N':>4} {'banded ms':>10} {'sparse ms':>10} " \
             f"{'banded/sparse':>13} {'auto':>7} {'max diff':>9}"
    print("One implicit Euler step, all states (tau = 0.5, dt = 0.1, scheme sg); best method per row in 'auto'.")
    print(header)
    print("-" * len(header))
    for name, space in spaces:
        auto = "banded" if space.is_chain or space.bandwidth <= fokker_planck.BANDED_MAX_BANDWIDTH else "sparse"
        for n in (1, 41, 121):
            masses, g = case(space, n, rng)
            times, results = {}, {}
            for method in ("banded", "sparse"):
                def step(method=method):
                    results[method] = fokker_planck.implicit_step(space, masses, g, 0.5, 0.1, method=method)
                times[method] = seconds_per_call(step)
            diff = np.abs(results["banded"] - results["sparse"]).max()
            print(f"{name:>8} {space.n_dofs:5d} {space.bandwidth:4d} {n:4d} {1e3 * times['banded']:10.2f} "
                  f"{1e3 * times['sparse']:10.2f} {times['banded'] / times['sparse']:13.2f} {auto:>7} {diff:9.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
