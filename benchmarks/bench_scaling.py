"""Benchmark: how a WPG run scales with the number of states N and of action DOFs M, and the MPI speed-up.

For ``experiments/lqr_1d.toml`` (1D states and actions; N = 31, 61, 121, 241 states x M = 129, 257, 513, 1025
DOFs), ``experiments/lqr_2d_action.toml`` (2D actions on the crossed-diagonal square, ``fem.rectangle_space``;
41 states x 145 .. 1201 DOFs) and ``experiments/lqr_2d_state.toml`` (2D state grids 11 x 11, 21 x 21, 31 x 31 x
313 DOFs), with ``flow.dt = 0.05`` and ``flow.gap_tol = 1e-8``, prints one table row per size:

* ``S/A``: state and action dimensions;
* ``L``: the kernel window (states reached by one transition, ``2 ceil(9 sigma / h_s) + 1`` per axis);
* ``ms/step``: wall time per step of the whole run loop (evaluation, flow step, diagnostics row);
* ``to 1e-8``: wall time of the run loop until ``gap <= 1e-8`` (setup excluded), and the number of steps;
* the share of one step spent in policy evaluation (``r^pi``, ``P^pi``, LU, solve for ``V``), in the Q
  computation (``Q = R + gamma T V``), in the flow step (edge rates + batched implicit solve) and in the
  diagnostics row (``D^h``, KL, adjoint solve), from separately timed stages (best of several calls).

The log-log plot ``benchmarks/scaling.png`` shows ms/step against ``N M`` with reference slopes 1 and 2: at
fixed ``N`` the cost is linear in ``M``; at fixed ``M`` it grows like ``N L ~ N^2`` (the kernel window ``L`` grows
with ``N`` on a fixed state interval).

Finally the same 1D run (N = 121, M = 257) is timed under ``mpirun -n 1`` and ``mpirun -n 2`` (MPI over states,
:mod:`solver.parallel`): the run loop's wall time from ``summary.json`` and the speed-up.

Run: ``make bench-scaling`` (about 3 minutes on a quiet 2-core machine); ``--quick`` for a small subset.
Timings on a loaded machine are noisy; every number here is wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from solver import bellman, config, diagnostics, flows, runner
from solver.flows import fokker_planck

ROOT = Path(__file__).resolve().parent.parent
CONFIG_1D = ROOT / "experiments" / "lqr_1d.toml"
CONFIG_2D = ROOT / "experiments" / "lqr_2d_action.toml"
CONFIG_2D_STATES = ROOT / "experiments" / "lqr_2d_state.toml"
COMMON = ["flow.dt=0.05", "flow.gap_tol=1e-8", "flow.t_end=40", "output.snapshots=2"]
STATES_1D, CELLS_1D = (31, 61, 121, 241), (128, 256, 512, 1024)
STATES_2D, CELLS_2D = 41, (8, 12, 16, 24)  # crossed cells: (c + 1)^2 + c^2 DOFs = 145, 313, 545, 1201
GRIDS_2D_STATES, CELLS_2D_STATES = (11, 21, 31), 12
MPI_SIZE = ["states.n=121", "actions.cells=256"]
STAGES = ("evaluation", "Q", "flow step", "diagnostics")


def best_of(fn, repeat=3, budget=0.3):
    """Best mean time per call over ``repeat`` batches of at least ``budget`` seconds each (after a warm-up)."""
    fn()
    best = np.inf
    for _ in range(repeat):
        calls, start = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - start < budget:
            fn()
            calls += 1
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def solve_values(mdp, p):
    """The part of :func:`solver.bellman.evaluate` before ``Q``: ``r^pi``, ``P^pi``, the resolvent solve and ``V``."""
    masses = p * mdp.weights
    r_pi = np.einsum("ij,ij->i", masses, mdp.reward) - mdp.tau * bellman.kl_divergence(mdp, p, mdp.log_mu)
    return bellman.Resolvent(mdp.kernel.policy_matrix(masses), mdp.gamma).solve(r_pi)


def measure(path: Path, overrides: list[str]) -> dict:
    """Build the problem, time the stages of one step, then run to gap 1e-8."""
    cfg = config.load(path, COMMON + overrides)
    problem = runner.build(cfg)
    mdp, dt = problem.mdp, cfg.flow.dt
    p = runner.initial_policy(cfg, mdp)
    ev = bellman.evaluate(mdp, p)
    g = flows.potential(mdp, ev.Q)
    masses = p * mdp.weights
    state = flows.FlowState(step=0, t=0.0, dt=0.0, p=p, evaluation=ev, g=g)
    stages = {"evaluation": best_of(lambda: solve_values(mdp, p)), "Q": best_of(lambda: bellman.q_values(mdp, ev.V)),
              "flow step": best_of(lambda: fokker_planck.implicit_step(mdp.space, masses, g, mdp.tau, dt,
                                                                       cfg.flow.scheme)),
              "diagnostics": best_of(lambda: diagnostics.record(runner.make_flow(problem), state, problem.J_star))}
    result = runner.run(problem)
    steps = len(result.rows) - 1
    return {"dims": f"{mdp.states.ndim}D/{mdp.space.dim}D", "N": mdp.n_states, "M": mdp.n_actions,
            "L": "x".join(str(w) for w in np.atleast_1d(mdp.kernel.width)), "steps": steps,
            "status": result.status, "gap": result.rows[-1]["gap"], "loop": result.loop_time,
            "per_step": result.loop_time / max(steps, 1), "stages": stages}


def exponents(rows: list[dict]) -> str:
    """Fitted growth of the cost per step on the 1D/1D rows: ``ms/step ~ N^a`` at each fixed ``M``, ``~ M^b`` at
    each fixed ``N`` (least squares in log-log), the joint fit ``c N^a M^b``, and the largest jump between
    neighbouring sizes against the growth of the work ``N M L`` (the kernel products)."""
    one = [r for r in rows if r["dims"] == "1D/1D"]
    if len(one) < 3:
        return ""
    N, M = np.array([r["N"] for r in one], float), np.array([r["M"] for r in one], float)
    L = np.array([float(r["L"]) for r in one])
    cost = np.array([r["per_step"] for r in one])
    lines = ["fitted exponents of ms/step (1D states and actions):"]
    for m in sorted(set(M)):
        sel = M == m
        if sel.sum() >= 2:
            lines.append(f"  M = {int(m):5d}: ~ N^{np.polyfit(np.log(N[sel]), np.log(cost[sel]), 1)[0]:.2f}")
    for n in sorted(set(N)):
        sel = N == n
        if sel.sum() >= 2:
            lines.append(f"  N = {int(n):5d}: ~ M^{np.polyfit(np.log(M[sel]), np.log(cost[sel]), 1)[0]:.2f}")
    design = np.column_stack([np.ones_like(N), np.log(N), np.log(M)])
    (_, a, b), *_ = np.linalg.lstsq(design, np.log(cost), rcond=None)
    lines.append(f"  joint fit: ms/step ~ N^{a:.2f} M^{b:.2f} (work N M L ~ N^2 M on a fixed interval)")
    worst = None
    for m in sorted(set(M)):
        idx = np.flatnonzero(M == m)[np.argsort(N[M == m])]
        for i, j in zip(idx[:-1], idx[1:]):
            excess = (cost[j] / cost[i]) / (N[j] * L[j] / (N[i] * L[i]))
            if worst is None or excess > worst[0]:
                worst = (excess, int(N[i]), int(N[j]), int(m))
    if worst is not None:
        lines.append(f"  largest step-cost jump over the growth of N M L: {worst[0]:.2f}x "
                     f"(N {worst[1]} -> {worst[2]} at M = {worst[3]}; 1.0 = the cost grows like the work)")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = (f"{'S/A':>5s} {'N':>5s} {'M':>5s} {'L':>5s} {'N*M':>8s} {'ms/step':>9s} {'to 1e-8 (s)':>11s} "
            f"{'steps':>6s}   " + " ".join(f"{name:>11s}" for name in STAGES))
    lines = [head, "-" * len(head)]
    for r in rows:
        total = sum(r["stages"].values())
        shares = " ".join(f"{100 * r['stages'][name] / total:10.0f}%" for name in STAGES)
        reached = f"{r['loop']:11.2f}" if r["status"] == "converged" else f"{'(' + format(r['gap'], '.0e') + ')':>11s}"
        lines.append(f"{r['dims']:>5s} {r['N']:5d} {r['M']:5d} {r['L']:>5s} {r['N'] * r['M']:8d} "
                     f"{1e3 * r['per_step']:9.2f} {reached} {r['steps']:6d}   {shares}")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for dims, marker, label in (("1D/1D", "o", "1D actions, N = {}"), ("1D/2D", "s", "2D actions, N = {}"),
                                ("2D/2D", "^", "2D states, M = {}")):
        sel = [r for r in rows if r["dims"] == dims]
        # 1D states: one curve per N over M; 2D state grids: one curve per M over N
        key, along = ("N", "M") if dims != "2D/2D" else ("M", "N")
        for value in sorted({r[key] for r in sel}):
            line = sorted((r for r in sel if r[key] == value), key=lambda r: r[along])
            ax.loglog([r["N"] * r["M"] for r in line], [1e3 * r["per_step"] for r in line], marker=marker,
                      label=label.format(value))
    x = np.array([r["N"] * r["M"] for r in rows], float)
    y = np.array([1e3 * r["per_step"] for r in rows])
    x0, y0 = x.min(), y[np.argmin(x)]
    lo, hi = 0.5 * y.min(), 2 * y.max()
    for slope, style in ((1, "k--"), (2, "k:")):
        # guide lines through the smallest problem, cut where they leave the y range (they stay inside the axes)
        x_end = min(x.max(), x0 * (hi / y0) ** (1 / slope))
        ref = np.geomspace(x0, x_end, 10)
        ax.loglog(ref, y0 * (ref / x0) ** slope, style, lw=0.8, label=f"slope {slope} (guide)")
    ax.set_xlim(0.8 * x.min(), 1.25 * x.max())
    ax.set_ylim(lo, hi)
    ax.set_xlabel("N M (states x action DOFs)")
    ax.set_ylabel("wall time per step (ms)")
    ax.set_title("wall time per WPG step against N M (lqr, dt = 0.05)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def mpi_speedup(ranks=(1, 2)) -> str:
    """Run the same config under ``mpirun -n K``; return the table of run-loop wall times and speed-ups."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        return "MPI speed-up: skipped (mpirun not installed; Debian: openmpi-bin)"
    wpgflow = str(Path(sys.executable).parent / "wpgflow")
    env = os.environ | {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                        "OMPI_MCA_rmaps_base_oversubscribe": "1",
                        "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"}  # Open MPI 5
    # Open MPI 4's -q drops its banner; Open MPI 5 has no -q (it exits 213)
    quiet = ["-q"] if subprocess.run([mpirun, "-q", "-n", "1", sys.executable, "-c", ""], env=env,
                                     capture_output=True).returncode == 0 else []
    sets = [item for key in COMMON + MPI_SIZE for item in ("--set", key)]
    lines = [f"MPI over states, lqr_1d {' '.join(MPI_SIZE)} (dt 0.05, to gap 1e-8):",
             f"{'ranks':>5s} {'loop (s)':>9s} {'ms/step':>8s} {'steps':>6s} {'speed-up':>9s}"]
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for k in ranks:
            out = Path(tmp) / f"n{k}"
            subprocess.run([mpirun, *quiet, "-n", str(k), wpgflow, "run", str(CONFIG_1D), *sets, "--quiet", "--out",
                            str(out)], check=True, env=env, cwd=ROOT)
            s = json.loads((out / "summary.json").read_text())
            loop = s["wall_time_s"] - s["setup_time_s"]
            base = loop if base is None else base
            lines.append(f"{k:5d} {loop:9.2f} {1e3 * s['time_per_step_s']:8.2f} {s['steps']:6d} {base / loop:9.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes only (N <= 61, M <= 257; 2D actions <= 313 DOFs; 2D states <= 21 x 21)")
    parser.add_argument("--no-2d", action="store_true", help="skip the 2D-action and 2D-state rows")
    parser.add_argument("--no-mpi", action="store_true", help="skip the mpirun speed-up")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "scaling.png", help="plot file")
    args = parser.parse_args(argv)
    states, cells = (STATES_1D[:2], CELLS_1D[:2]) if args.quick else (STATES_1D, CELLS_1D)
    cells_2d = CELLS_2D[:2] if args.quick else CELLS_2D
    grids = GRIDS_2D_STATES[:2] if args.quick else GRIDS_2D_STATES
    cases = [(CONFIG_1D, [f"states.n={n}", f"actions.cells={c}"]) for n in states for c in cells]
    if not args.no_2d:
        cases += [(CONFIG_2D, [f"states.n={STATES_2D}", f"actions.cells={c}"]) for c in cells_2d]
        cases += [(CONFIG_2D_STATES, [f"states.n=[{n},{n}]", f"actions.cells={CELLS_2D_STATES}"]) for n in grids]
    print("lqr, flow.dt = 0.05, run loop to gap 1e-8; stage shares timed separately (best of 3)")
    print("\n".join(table([]).splitlines()[:2]), flush=True)
    rows = []
    for path, overrides in cases:
        rows.append(measure(path, overrides))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print("\n" + exponents(rows))
    plot(rows, args.plot)
    print(f"\nplot: {args.plot}")
    if not args.no_mpi:
        print()
        print(mpi_speedup())


if __name__ == "__main__":
    main()
