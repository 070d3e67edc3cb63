"""Benchmark: peak memory of a whole ``wpgflow run`` on a 2D state grid, 101 x 101 states x ~1000 action DOFs.

Issue 3, item 4. Writes the config of a 2D-state LQR (``A = 0.9 I``, ``B = 0.2 I``, ``sigma = 0.1``; states
``[-2, 2]^2``, so ``h_s = 0.04`` and ``sigma / h_s = 2.5``: the grid resolves the noise; actions ``[-1, 1]^2`` with
``cells x cells`` crossed cells) and runs it in this process for ``--steps`` WPG steps with every stage of a real
run: soft policy iteration for ``pi*``, the set-up of the local-rate check (spectral gaps at ``Q*``), history rows
and snapshots, ``summary.json``, ``solution.npz``, ``density.xdmf`` and the plots. It then prints the times from
``summary.json``, the peak resident memory of the process (``VmHWM``) and the formula of :mod:`solver.mdp`.
The MDP built first for the kernel's sizes is freed before the run (whose own build peaks higher), so the
peak is the run's.

Run: ``make bench-memory`` or ``.venv/bin/python benchmarks/bench_memory.py [--n 101] [--cells 22] [--steps 2]``
(about 10 minutes at the defaults on 2 cores: soft policy iteration and the spectral gaps at ``Q*`` dominate).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from solver import budget, cli, mdp as mdp_module, parallel
from solver.fem import rectangle_space
from solver.models import lqr

GIB = 2 ** 30
PARAMS = {"A": 0.9, "B": [[0.2, 0.0], [0.0, 0.2]], "sigma": 0.1}
CONFIG = """[mdp]
model = "lqr"
gamma = 0.9
tau = 0.5
params = {{ A = {A}, B = {B}, sigma = {sigma} }}

[states]
lower = [-2.0, -2.0]
upper = [2.0, 2.0]
n = [{n}, {n}]

[actions]
domain = "rectangle"
lower = [-1.0, -1.0]
upper = [1.0, 1.0]
cells = {cells}

[flow]
dt = 0.1
t_end = {t_end}
"""


def peak_rss() -> float:
    """Peak resident set size of this process so far, bytes: ``VmHWM`` of ``/proc/self/status`` (Linux).

    Not ``ru_maxrss``: Linux keeps that across ``execve``, so a benchmark started by a large process (pytest)
    would report its parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) * 1024  # kB
    raise SystemExit("no VmHWM in /proc/self/status: this benchmark needs Linux")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=101, help="states per axis (default 101)")
    parser.add_argument("--cells", type=int, default=22,
                        help="action cells per axis (default 22: 1013 DOFs on the crossed mesh)")
    parser.add_argument("--steps", type=int, default=2, help="WPG steps of dt = 0.1 (default 2)")
    parser.add_argument("--recompute-windows", action="store_true",
                        help="never store the kernel windows (the regime of the default size, at any size)")
    args = parser.parse_args(argv)
    if args.recompute_windows:
        budget.WINDOW_STORE_BYTES = 0
    # the kernel's sizes, from the same MDP
    x = np.linspace(-2.0, 2.0, args.n)
    states = mdp_module.product_grid(x, x)
    space = rectangle_space((-1.0, -1.0), (1.0, 1.0), (args.cells, args.cells))
    mdp = mdp_module.build_mdp(lqr(**PARAMS), states, space, 0.9, 0.5)
    n, m, (width, band, stored) = mdp.n_states, mdp.n_actions, (mdp.kernel.width, mdp.kernel.band, mdp.kernel.stored)
    estimate = budget.memory_estimate(n, m, width, band, stored, parallel.compiled_available(n * m))
    del mdp
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "memory.toml"
        config.write_text(CONFIG.format(**PARAMS, n=args.n, cells=args.cells, t_end=0.1 * args.steps))
        if cli.main(["run", str(config), "--out", str(Path(tmp) / "run"), "--quiet"]) != 0:
            raise SystemExit("the run failed")
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
    wall, peak = time.perf_counter() - start, peak_rss()
    print(f"N = {n} states, M = {m} action DOFs, E = {space.edges.shape[0]} edges; windows Lx, Ly = "
          f"{width}, stored: {stored}; bands of P^pi bx, by = {band}")
    print(f"setup (MDP, soft policy iteration) {summary['setup_time_s']:.1f} s; {summary['steps']} WPG steps, "
          f"{summary['time_per_step_s']:.1f} s per step; whole run with outputs and plots {wall:.1f} s")
    print(f"memory formula (solver.budget.memory_estimate): {estimate / GIB:.3f} GiB; measured peak "
          f"{peak / GIB:.3f} GiB")


if __name__ == "__main__":
    main()
