"""Benchmark: one state (the OU bandit) at equal accuracy, wpgflow against a plain numpy code and the peers.

Problem (issue 14): ``r(a) = -k a^2 / 2``, ``k = 1``, ``tau = 0.5``, actions ``[-5, 5]``, start ``N(2, 0.5^2)``,
``t = 1``; the WPG flow is the OU Fokker-Planck equation, whose solution is the Gaussian of
:func:`solver.oracles.ou_moments`. Every code is run at the cheapest of a few resolutions whose L1 error against
that Gaussian at ``t = 1`` is ``<= L1_BAR``:

* **wpgflow**: ``flow.integrator = "exponential"`` (exact in time for one state, so ``dt`` is free: ``dt = 1``,
  and ``dt = 0.01`` to show the fixed cost of a step); the time loop of :func:`solver.runner.run` (with its
  diagnostics row per step), in process;
* **numpy SG-FV**: :func:`numpy_sg_fv`, a 15-line Scharfetter-Gummel finite-volume code with implicit Euler
  (``scipy.linalg.solve_banded``) - what one writes by hand;
* **FPlanck 0.2.2** and **scikit-fem** (if installed in ``benchmarks/.peers``, a separate venv, never ``.venv``:
  ``python3 -m venv benchmarks/.peers && benchmarks/.peers/bin/pip install fplanck==0.2.2 scikit-fem``), as whole
  processes next to wpgflow's and numpy's whole processes.

Timing: in one process, interleaved A B A B, medians of ``PAIRS`` pairs (the machine is shared and noisy); the
ratios are what to quote. Run with ``make bench`` or ``.venv/bin/python benchmarks/bench_bandit.py``.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / ".peers" / "bin" / "python"
L1_BAR = 7e-4
PAIRS = 7
K, TAU, LOWER, UPPER, M0, S0, T_END = 1.0, 0.5, -5.0, 5.0, 2.0, 0.5, 1.0


def exact(a: np.ndarray, t: float = T_END) -> np.ndarray:
    """The OU density at ``t`` (theory.md §7.3): mean ``M0 e^{-kt}``, variance ``tau/k + (S0^2 - tau/k) e^{-2kt}``."""
    mean = M0 * math.exp(-K * t)
    var = TAU / K + (S0 ** 2 - TAU / K) * math.exp(-2 * K * t)
    return np.exp(-0.5 * (a - mean) ** 2 / var) / math.sqrt(2 * math.pi * var)


def numpy_sg_fv(cells: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The plain code: cell-centred SG fluxes for ``d_t p = d_a(k a p) + tau d_a^2 p``, implicit Euler, Thomas."""
    from scipy.linalg import solve_banded

    h, dt = (UPPER - LOWER) / cells, T_END / steps
    a = LOWER + h * (np.arange(cells) + 0.5)
    x = K * h / TAU * (a[:-1] + h / 2)  # dU / tau across each interior face, U = k a^2 / 2
    bern = lambda z: np.where(z == 0, 1.0, z / np.expm1(np.where(z == 0, 1.0, z)))  # noqa: E731
    fwd, bwd = TAU / h ** 2 * bern(x), TAU / h ** 2 * bern(-x)  # flux_i = fwd p_i - bwd p_{i+1} (left to right)
    ab = np.zeros((3, cells))
    ab[1] = 1.0
    ab[1, :-1] += dt * fwd
    ab[1, 1:] += dt * bwd
    ab[0, 1:] = -dt * bwd
    ab[2, :-1] = -dt * fwd
    p = exact(a, 0.0)
    for _ in range(steps):
        p = solve_banded((1, 1), ab, p, check_finite=False)
    return a, p


def l1_numpy(cells: int, steps: int) -> float:
    a, p = numpy_sg_fv(cells, steps)
    return float(np.sum(np.abs(p - exact(a))) * (UPPER - LOWER) / cells)


def wpgflow_problem(cells: int, dt: float):
    from solver import config, runner

    cfg = config.from_dict({
        "mdp": {"model": "bandit", "gamma": 0.9, "tau": TAU, "params": {"k": K, "center": 0.0}},
        "actions": {"lower": LOWER, "upper": UPPER, "cells": cells},
        "flow": {"dt": dt, "t_end": T_END, "gap_tol": 0.0, "init": "gaussian", "init_mean": M0, "init_std": S0,
                 "integrator": "exponential"}})
    return runner.build(cfg)


def wpgflow_run(problem):
    from solver import runner

    return runner.run(problem)


def l1_wpgflow(problem, result) -> float:
    mdp = problem.mdp
    return float(np.abs(result.final.p[0] - exact(mdp.space.coords[:, 0])) @ mdp.weights)


def interleaved(a, b, pairs: int = PAIRS) -> tuple[float, float]:
    """Medians of ``pairs`` interleaved timings of the callables ``a`` and ``b`` (A B A B ...)."""
    ta, tb = [], []
    for _ in range(pairs):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def cheapest_numpy() -> tuple[int, int, float]:
    """The cheapest ``(cells, steps)`` of the numpy code meeting ``L1_BAR`` (cost ~ cells * steps)."""
    options = sorted(((c, s) for c in (192, 256, 320, 384) for s in (1000, 2000, 4000, 8000)),
                     key=lambda x: x[0] * x[1])
    for cells, steps in options:
        error = l1_numpy(cells, steps)
        if error <= L1_BAR:
            return cells, steps, error
    raise RuntimeError("no numpy resolution meets the bar")


def cheapest_wpgflow(dt: float) -> tuple[int, object, float]:
    for cells in (160, 192, 224, 256, 320):
        problem = wpgflow_problem(cells, dt)
        error = l1_wpgflow(problem, wpgflow_run(problem))
        if error <= L1_BAR:
            return cells, problem, error
    raise RuntimeError("no wpgflow resolution meets the bar")


# --- whole processes -------------------------------------------------------------------------------------------

CHILD = {  # each prints "L1 setup_seconds solve_seconds" (solve: from the initial density to the one at t = 1)
    "wpgflow": "import sys, time; sys.path.insert(0, {root!r}); from benchmarks.bench_bandit import *; "
               "t0 = time.perf_counter(); p = wpgflow_problem({cells}, 1.0); t1 = time.perf_counter(); "
               "r = wpgflow_run(p); t2 = time.perf_counter(); print(l1_wpgflow(p, r), t1 - t0, t2 - t1)",
    "numpy": "import sys, time; sys.path.insert(0, {root!r}); from benchmarks.bench_bandit import *; "
             "t1 = time.perf_counter(); a, p = numpy_sg_fv({cells}, {steps}); t2 = time.perf_counter(); "
             "print(float(np.sum(np.abs(p - exact(a))) * (UPPER - LOWER) / {cells}), 0.0, t2 - t1)",
    "fplanck": "import sys; sys.path.insert(0, {root!r}); from benchmarks.bench_bandit import fplanck_l1; "
               "print(*fplanck_l1({cells}, {steps}))",
    "skfem": "import sys; sys.path.insert(0, {root!r}); from benchmarks.bench_bandit import skfem_l1; "
             "print(*skfem_l1({cells}, {steps}))",
}


def fplanck_l1(cells: int, steps: int) -> tuple[float, float, float]:
    """FPlanck 0.2.2: its finite-volume master equation (rates ``D/h^2 exp(-beta dU / 2)``), propagated exactly in
    time by ``expm_multiply`` (``steps`` is unused). ``k_B T = tau`` and drag 1 give ``D = tau`` and
    ``beta U' = k a / tau``."""
    import fplanck
    from scipy import constants

    h = (UPPER - LOWER) / cells
    t0 = time.perf_counter()
    sim = fplanck.fokker_planck(temperature=TAU / constants.k, drag=1.0, extent=[UPPER - LOWER], resolution=h,
                                boundary=fplanck.boundary.reflecting, potential=fplanck.harmonic_potential(0.0, K))
    a = sim.grid[0]  # cell centres of [-5, 5]
    t1 = time.perf_counter()
    p = sim.propagate(lambda x: exact(x, 0.0), T_END) / h  # cell probabilities -> density
    t2 = time.perf_counter()
    return float(np.sum(np.abs(p - exact(a))) * h), t1 - t0, t2 - t1


def skfem_l1(cells: int, steps: int) -> tuple[float, float, float]:
    """scikit-fem: P1 Galerkin (consistent mass, no upwinding) for ``(p_t, v) + (tau p' + k a p, v') = 0``,
    implicit Euler with one sparse LU reused for every step."""
    import scipy.sparse.linalg as spla
    import skfem
    from skfem.helpers import dot, grad

    t0 = time.perf_counter()
    mesh = skfem.MeshLine(np.linspace(LOWER, UPPER, cells + 1))
    basis = skfem.Basis(mesh, skfem.ElementLineP1())

    @skfem.BilinearForm
    def stiffness(u, v, w):  # weak form of -(tau p' + k a p)' with no flux: (tau u' + k a u) v'
        return TAU * dot(grad(u), grad(v)) + K * w.x[0] * u * grad(v)[0]

    @skfem.BilinearForm
    def mass(u, v, _):
        return u * v

    A, Mm = stiffness.assemble(basis), mass.assemble(basis)
    t1 = time.perf_counter()
    dt = T_END / steps
    lu = spla.splu((Mm + dt * A).tocsc())
    a = mesh.p[0]
    p = exact(a, 0.0)
    for _ in range(steps):
        p = lu.solve(Mm @ p)
    t2 = time.perf_counter()
    w = np.full(a.size, (UPPER - LOWER) / cells)
    w[[0, -1]] /= 2
    return float(np.abs(p - exact(a)) @ w), t1 - t0, t2 - t1


def process_time(kind: str, python: str, **args) -> tuple[float, float, float, float]:
    """Wall time of a whole process (interpreter start, imports, setup, run, error), and the L1, setup and solve
    times it prints."""
    code = CHILD[kind].format(root=str(ROOT), **args)
    start = time.perf_counter()
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    wall = time.perf_counter() - start
    error, setup, solve = map(float, out.stdout.strip().splitlines()[-1].split())
    return wall, error, setup, solve


def main() -> None:
    print(f"OU bandit: tau = {TAU}, k = {K}, actions [{LOWER}, {UPPER}], start N({M0}, {S0}^2), t = {T_END}; "
          f"every code at its cheapest resolution with L1 <= {L1_BAR:g} against the exact Gaussian")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; medians of {PAIRS} interleaved "
          "pairs\n")
    cells_np, steps_np, err_np = cheapest_numpy()
    cells_w, problem, err_w = cheapest_wpgflow(1.0)
    problem_fine = wpgflow_problem(cells_w, 0.01)
    err_fine = l1_wpgflow(problem_fine, wpgflow_run(problem_fine))
    print(f"{'code':44s} {'resolution':>22s} {'L1':>9s}")
    print(f"{'numpy SG-FV (implicit Euler, Thomas)':44s} {f'{cells_np} cells, {steps_np} steps':>22s} {err_np:9.2e}")
    print(f"{'wpgflow, exponential, dt = 1':44s} {f'{cells_w} cells, 1 step':>22s} {err_w:9.2e}")
    print(f"{'wpgflow, exponential, dt = 0.01':44s} {f'{cells_w} cells, 100 steps':>22s} {err_fine:9.2e}\n")

    t_np, t_w = interleaved(lambda: numpy_sg_fv(cells_np, steps_np), lambda: wpgflow_run(problem))
    print(f"in process: numpy {1e3 * t_np:.2f} ms, wpgflow (dt = 1) {1e3 * t_w:.2f} ms: "
          f"wpgflow / numpy = {t_w / t_np:.2f}")
    t_np, t_f = interleaved(lambda: numpy_sg_fv(cells_np, steps_np), lambda: wpgflow_run(problem_fine))
    print(f"in process: numpy {1e3 * t_np:.2f} ms, wpgflow (dt = 0.01, 100 steps) {1e3 * t_f:.2f} ms: "
          f"wpgflow / numpy = {t_f / t_np:.2f}; wpgflow's fixed cost {1e6 * t_f / 100:.0f} us per step "
          f"(numpy: {1e6 * t_np / steps_np:.0f} us per step)")

    venv = str(ROOT / ".venv" / "bin" / "python")
    candidates = {"wpgflow": (venv, [{"cells": cells_w}]), "numpy": (venv, [{"cells": cells_np, "steps": steps_np}])}
    if PEERS.exists():
        candidates["fplanck"] = (str(PEERS), [{"cells": c, "steps": 1} for c in (64, 80, 96, 112, 128, 160)])
        resolutions = ((128, 1000), (160, 1000), (128, 2000), (192, 1000), (160, 2000), (256, 1000), (256, 2000))
        candidates["skfem"] = (str(PEERS), [{"cells": c, "steps": s} for c, s in resolutions])
    else:
        print("\n(FPlanck / scikit-fem: not installed in benchmarks/.peers; see the module docstring)")
    whole = {}
    for kind, (python, options) in candidates.items():  # the cheapest resolution meeting the bar (one untimed run)
        for args in options:
            try:
                _, error, _, _ = process_time(kind, python, **args)
            except subprocess.CalledProcessError as exc:
                lines = (exc.stderr or "").strip().splitlines()
                print(f"{kind}: failed ({lines[-1] if lines else exc})")
                break
            if error <= L1_BAR:
                whole[kind] = (python, args)
                break
    runs: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in whole}
    for _ in range(5):  # whole processes take seconds: 5 interleaved rounds
        for kind, (python, args) in whole.items():
            runs[kind].append(process_time(kind, python, **args))
    print(f"\n{'whole process':12s} {'resolution':>26s} {'L1':>9s} {'process s':>10s} {'/ wpgflow':>10s} "
          f"{'setup s':>9s} {'solve s':>9s} {'/ wpgflow':>10s}")
    med = {k: [statistics.median(x[i] for x in v) for i in range(4)] for k, v in runs.items()}
    for kind, (wall, error, setup, solve) in med.items():
        print(f"{kind:12s} {str(whole[kind][1]):>26s} {error:9.2e} {wall:10.2f} {wall / med['wpgflow'][0]:10.2f} "
              f"{setup:9.3f} {solve:9.4f} {solve / med['wpgflow'][3]:10.2f}")
    print("(solve: the time loop from the initial density to t = 1 after setup; for FPlanck its expm_multiply)")


if __name__ == "__main__":
    main()
