"""Memory of 2D state grids: the formula of solver.mdp bounds the measured peak (issue 3, item 4)."""

import re
import subprocess
import sys
from pathlib import Path

from solver import mdp as mdp_module

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"
GIB = 2 ** 30


def test_formula_bounds_the_measured_peak_rss():
    """Run the memory benchmark on 41 x 41 states x 1013 action DOFs in a fresh process: peak RSS <= formula.

    At this size the policy-sized arrays and ``P^pi`` are ~60% of the estimate, so an under-counted array
    (each ~14 MB) or a chunk workspace that grows with N would show.
    """
    out = subprocess.run([sys.executable, str(BENCH), "--n", "41"], capture_output=True, text=True, check=True).stdout
    estimate, measured = map(float, re.search(r"memory_estimate\): ([\d.]+) GiB; measured peak ([\d.]+) GiB",
                                              out).groups())
    assert measured <= estimate
    assert measured >= 0.6 * estimate  # and the bound is not vacuous


def test_101_by_101_states_with_1000_action_dofs_fit_in_2_gib():
    """The issue's size: 101 x 101 states x 1013 DOFs, sigma / h_s = 2.5 (L = 47), band 57 per axis."""
    n, m = 101 * 101, 1013
    assert not mdp_module.window_bytes(n, m, 47, 47) <= mdp_module.WINDOW_STORE_BYTES  # windows recomputed
    assert mdp_module.memory_estimate(n, m, (47, 47), (57, 57), stored=False) < 2 * GIB
