"""Benchmark: how the cost of a WPG step scales with the number of states N and of action DOFs M, fitted.

For ``experiments/lqr_1d.toml`` (1D states and actions; N = 31, 61, 121, 241 states x M = 129, 257, 513, 1025
DOFs, and N = 481, 961 beyond the storage switches, :data:`BEYOND_1D`), ``experiments/lqr_2d_action.toml`` (2D
actions on the crossed-diagonal square, ``fem.rectangle_space``; 41 states x 145 .. 1201 DOFs) and
``experiments/lqr_2d_state.toml`` (2D state grids 11 x 11, 21 x 21, 31 x 31 x 313 DOFs), with ``flow.dt = 0.05``
and ``flow.gap_tol = 1e-8``, prints one table row per size:

* ``S/A``: state and action dimensions;
* ``L``: the kernel window (states reached by one transition, ``2 ceil(9 sigma / h_s) + 1`` per axis);
* ``band``: whether the 1D kernel's dense ``(N, M, band)`` array fits :data:`solver.budget.DENSE_BAND_BYTES`
  (``yes``) or the numpy path of :meth:`~solver.mdp.GaussianGridKernel.policy_matrix` scatter-adds the windows
  (``no``: the windowed storage); serial runs only use it where ``P^pi`` is neither interpolated nor compiled;
* ``P^pi``, ``T V``, ``LU``: the paths a serial step takes: ``P^pi`` interpolated over a grid of means
  (:class:`solver.mdp.InterpolatedPolicy`, up to :data:`solver.mdp.DENSE_POLICY_STATES` states), by the compiled
  windowed product (numba, from :data:`solver.parallel.COMPILED_MIN_ENTRIES` pairs), from the dense band, from the
  windows, or the 2D-grid bands; ``T V`` interpolated (:class:`solver.mdp.MeanInterpolation`) or windowed; the
  resolvent dense (LAPACK, up to :data:`solver.bellman.DENSE_STATES` states), SuperLU or GMRES;
* ``ms/step``: wall time per step of the whole run loop (evaluation, flow step, diagnostics row), the fastest of
  up to :data:`RUN_REPEATS` runs while they take less than :data:`RUN_BUDGET_S` in all, and of a second pass
  over the runs shorter than :data:`SECOND_PASS_S` (after all the others);
* ``to 1e-8``: wall time of that run loop until ``gap <= 1e-8`` (setup excluded), and the number of steps;
* the share of one step spent in policy evaluation (``r^pi``, ``P^pi`` as :func:`solver.bellman.evaluate` takes it,
  LU, solve for ``V``), in the Q computation (``Q = R + gamma T V``), in the flow step (edge rates + batched
  implicit solve) and in the diagnostics row (``D^h``, KL, adjoint solve), from separately timed stages (best of 3).

Then the fitted exponents: ``ms/step ~ c N^a`` at each fixed ``M`` and ``~ c M^b`` at each fixed ``N``, by least
squares on ``log ms/step`` for each family (1D/1D, 1D/2D, 2D/2D): the pooled exponent (one slope, one intercept
per fixed value), the range of the per-fixed-value slopes, and the number of points. Then, at every pair of
neighbouring 1D sizes between which a storage or path switch happens, the cost ratio against the ratio of the
work ``N M L`` of the windowed kernel products (a ratio/work below 1: no jump beyond the growth of the work).

The log-log plot ``benchmarks/scaling.png`` shows ms/step against ``N`` (fixed ``M``) and against ``M`` (fixed
``N``), with the fitted slopes in the legend; hollow markers are 1D kernels in the windowed storage.

Finally (unless ``--no-mpi``) the same 1D run (N = 121, M = 257) is timed under ``mpirun -n 1`` and ``-n 2``
(MPI over states, :mod:`solver.parallel`): the run loop's wall time from ``summary.json`` and the speed-up.

Run: ``make bench-scaling`` (about 9 minutes on a 2-core machine shared with one other job, of which ~2 for the
N = 481, 961 rows: their kernel set-up is ``O(N M L)``, ~1 min at 961 x 257; plus the MPI runs); ``--quick`` for
a small subset, ``--no-beyond`` without the N = 481, 961 rows, ``--no-mpi`` without the MPI runs, ``--json`` to
keep the rows and ``--from-json`` to print and plot them again. Timings on a loaded machine are noisy (the load
average is printed); every number is wall time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from solver import bellman, budget, config, diagnostics, flows, parallel, runner
from solver.flows import fokker_planck

ROOT = Path(__file__).resolve().parent.parent
CONFIG_1D = ROOT / "experiments" / "lqr_1d.toml"
CONFIG_2D = ROOT / "experiments" / "lqr_2d_action.toml"
CONFIG_2D_STATES = ROOT / "experiments" / "lqr_2d_state.toml"
COMMON = ["flow.dt=0.05", "flow.gap_tol=1e-8", "flow.t_end=40", "output.snapshots=2"]
STATES_1D, CELLS_1D = (31, 61, 121, 241), (128, 256, 512, 1024)
#: 1D sizes past the dense-band switch (241 x 257 fits the 256 MiB band, 481 x 257 does not) and up to the
#: largest grid with a dense LU below DENSE_STATES: (states, cells). 961 x 257 holds ~4.4 GiB while it is built.
BEYOND_1D = ((481, 256), (481, 512), (961, 256))
STATES_2D, CELLS_2D = 41, (8, 12, 16, 24)  # crossed cells: (c + 1)^2 + c^2 DOFs = 145, 313, 545, 1201
GRIDS_2D_STATES, CELLS_2D_STATES = (11, 21, 31), 12
MPI_SIZE = ["states.n=121", "actions.cells=256"]
STAGES = ("evaluation", "Q", "flow step", "diagnostics")
#: The run loop is repeated (the fastest counts) up to this many times while the loops so far took < RUN_BUDGET_S:
#: on a shared 2-core machine one short loop can be 2x slower than the next.
RUN_REPEATS, RUN_BUDGET_S = 5, 3.0
#: Runs whose loop took less than this are timed again after all the others (a second pass, the faster counts).
SECOND_PASS_S = 1.0
FAMILIES = (("1D/1D", "1D states, 1D actions"), ("1D/2D", "1D states, 2D actions"), ("2D/2D", "2D states, 2D actions"))


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
    """The part of serial :func:`solver.bellman.evaluate` before ``Q``: ``r^pi``, ``P^pi`` (dense by interpolation
    where the kernel built it, as ``evaluate`` takes it), the resolvent and ``V``."""
    masses = p * mdp.weights
    r_pi = np.einsum("ij,ij->i", masses, mdp.reward) - mdp.tau * bellman.kl_divergence(mdp, p, mdp.log_mu)
    P = mdp.kernel.dense_policy_matrix(masses)
    return bellman.Resolvent(mdp.kernel.policy_matrix(masses) if P is None else P, mdp.gamma).solve(r_pi)


def paths(mdp) -> dict:
    """The storage and the paths of a serial step: dense band (1D), ``P^pi``, ``T V`` and the resolvent."""
    kernel, n = mdp.kernel, mdp.n_states
    if mdp.states.ndim == 2:
        return {"band": "-", "P": "2D bands", "TV": "2D bands", "LU": "dense" if n <= bellman.DENSE_STATES else "gmres"}
    band = getattr(kernel, "dense_band", False)
    if getattr(kernel, "policy_interpolation", None) is not None:
        P = "interp"
    elif parallel.compiled_available(n * mdp.n_actions):
        P = "compiled"
    else:
        P = "band" if band else "windows"
    return {"band": "yes" if band else "no", "P": P,
            "TV": "interp" if getattr(kernel, "interpolation", None) is not None else "windows",
            "LU": "dense" if n <= bellman.DENSE_STATES else "splu"}


def stage_times(problem) -> dict:
    """Best-of times of the stages of one step (:data:`STAGES`) at the initial policy."""
    cfg, mdp = problem.config, problem.mdp
    p = runner.initial_policy(cfg, mdp)
    ev = bellman.evaluate(mdp, p)
    g = flows.potential(mdp, ev.Q)
    masses = p * mdp.weights
    state = flows.FlowState(step=0, t=0.0, dt=0.0, p=p, evaluation=ev, g=g)
    return {"evaluation": best_of(lambda: solve_values(mdp, p)), "Q": best_of(lambda: bellman.q_values(mdp, ev.V)),
            "flow step": best_of(lambda: fokker_planck.implicit_step(mdp.space, masses, g, mdp.tau, cfg.flow.dt,
                                                                     cfg.flow.scheme)),
            "diagnostics": best_of(lambda: diagnostics.record(runner.make_flow(problem), state, problem.J_star))}


def measure(path: Path, overrides: list[str], stages: bool = True) -> dict:
    """Build the problem, time the stages of one step (unless not ``stages``), then run to gap 1e-8."""
    problem = runner.build(config.load(path, COMMON + overrides))
    mdp = problem.mdp
    times = stage_times(problem) if stages else {}
    runs = [runner.run(problem)]  # the same run again while it is short: the fastest loop (noise only adds)
    while len(runs) < RUN_REPEATS and sum(r.loop_time for r in runs) < RUN_BUDGET_S:
        runs.append(runner.run(problem))
    result = min(runs, key=lambda r: r.loop_time)
    steps = len(result.rows) - 1
    width = np.atleast_1d(mdp.kernel.width)
    row = {"dims": f"{mdp.states.ndim}D/{mdp.space.dim}D", "N": mdp.n_states, "M": mdp.n_actions,
           "L": "x".join(str(w) for w in width), "work": mdp.n_states * mdp.n_actions * int(np.prod(width)),
           "steps": steps, "status": result.status, "gap": result.rows[-1]["gap"], "loop": result.loop_time,
           "per_step": result.loop_time / max(steps, 1), "stages": times, **paths(mdp)}
    return row


def slope_fit(rows: list[dict], along: str, fixed: str):
    """Least squares on ``log ms/step = c_fixed + b log along``: the pooled ``b`` (one intercept per value of
    ``fixed``), the per-value slopes, and the number of points; None without two sizes at some fixed value."""
    groups = {}
    for r in rows:
        groups.setdefault(r[fixed], []).append(r)
    groups = {k: g for k, g in groups.items() if len({r[along] for r in g}) >= 2}
    if not groups:
        return None
    points = [r for g in groups.values() for r in g]
    keys = sorted(groups)
    design = np.zeros((len(points), len(keys) + 1))
    for i, r in enumerate(points):
        design[i, keys.index(r[fixed])] = 1.0
        design[i, -1] = np.log(r[along])
    coef, *_ = np.linalg.lstsq(design, np.log([r["per_step"] for r in points]), rcond=None)
    each = {k: float(np.polyfit(np.log([r[along] for r in g]), np.log([r["per_step"] for r in g]), 1)[0])
            for k, g in groups.items()}
    return float(coef[-1]), each, len(points)


def fits(rows: list[dict]) -> list[tuple]:
    """``(family, along, fixed, pooled exponent, per-fixed-value exponents, points)`` for every family with data."""
    out = []
    for dims, _ in FAMILIES:
        sel = [r for r in rows if r["dims"] == dims]
        for along, fixed in (("N", "M"), ("M", "N")):
            fit = slope_fit(sel, along, fixed)
            if fit is not None:
                out.append((dims, along, fixed, *fit))
    return out


def exponents(rows: list[dict]) -> str:
    """The table of fitted exponents (:func:`fits`)."""
    lines = ["fitted exponents, ms/step ~ c x^b (least squares on log ms/step; pooled: one slope, an intercept per "
             "fixed value)",
             f"{'family':>6s} {'x':>2s} {'fixed':>6s} {'b pooled':>9s} {'b over the fixed values':>24s} "
             f"{'fixed values':>16s} {'points':>6s}"]
    for dims, along, fixed, pooled, each, points in fits(rows):
        lo, hi = min(each.values()), max(each.values())
        values = ",".join(str(k) for k in sorted(each))
        lines.append(f"{dims:>6s} {along:>2s} {fixed:>6s} {pooled:9.2f} {f'{lo:.2f} .. {hi:.2f}':>24s} "
                     f"{fixed + '=' + values:>16s} {points:6d}")
    return "\n".join(lines)


def switches(rows: list[dict]) -> str:
    """Neighbouring 1D/1D sizes (same M, next N; same N, next M) between which the dense band, the ``P^pi`` or
    ``T V`` path or the resolvent changes: the cost ratio against the ratio of the work ``N M L``."""
    one = [r for r in rows if r["dims"] == "1D/1D"]
    lines = ["storage and path switches (1D/1D, neighbouring sizes): cost ratio vs work N M L ratio",
             f"{'from':>10s} {'to':>10s} {'switch':<40s} {'cost x':>7s} {'work x':>7s} {'cost/work':>9s}"]
    worst, overall = None, (0.0, "")
    for along, fixed in (("N", "M"), ("M", "N")):
        for value in sorted({r[fixed] for r in one}):
            line = sorted((r for r in one if r[fixed] == value), key=lambda r: r[along])
            for a, b in zip(line[:-1], line[1:]):
                cost, work = b["per_step"] / a["per_step"], b["work"] / a["work"]
                overall = max(overall, (cost / work, f"{a['N']}x{a['M']} -> {b['N']}x{b['M']}"))
                changed = [f"{key} {a[key]}->{b[key]}" for key in ("band", "P", "TV", "LU") if a[key] != b[key]]
                if not changed:
                    continue
                worst = max(worst or 0.0, cost / work)
                lines.append(f"{str(a['N']) + 'x' + str(a['M']):>10s} {str(b['N']) + 'x' + str(b['M']):>10s} "
                             f"{', '.join(changed):<40s} {cost:7.2f} {work:7.2f} {cost / work:9.2f}")
    if worst is None:
        return "no storage or path switch between neighbouring 1D sizes here"
    lines.append(f"largest cost/work ratio at a switch: {worst:.2f} (<= 1: no jump beyond the growth of the work); "
                 f"over all neighbouring 1D sizes: {overall[0]:.2f} ({overall[1]})")
    lines.append(f"switch points: dense band while 8 N M band <= {budget.DENSE_BAND_BYTES // budget.MIB} MiB "
                 f"(solver.budget.DENSE_BAND_BYTES), else windowed storage; P^pi interpolated up to "
                 f"DENSE_POLICY_STATES = 1500 states, dense LU up to bellman.DENSE_STATES = {bellman.DENSE_STATES}")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = (f"{'S/A':>5s} {'N':>5s} {'M':>5s} {'L':>5s} {'band':>4s} {'P^pi':>8s} {'T V':>8s} {'LU':>5s} "
            f"{'ms/step':>8s} {'to 1e-8 (s)':>11s} {'steps':>5s}  " + " ".join(f"{name:>11s}" for name in STAGES))
    lines = [head, "-" * len(head)]
    for r in rows:
        total = sum(r["stages"].values())
        shares = " ".join(f"{100 * r['stages'][name] / total:10.0f}%" for name in STAGES)
        reached = f"{r['loop']:11.2f}" if r["status"] == "converged" else f"{'(' + format(r['gap'], '.0e') + ')':>11s}"
        lines.append(f"{r['dims']:>5s} {r['N']:5d} {r['M']:5d} {r['L']:>5s} {r['band']:>4s} {r['P']:>8s} "
                     f"{r['TV']:>8s} {r['LU']:>5s} {1e3 * r['per_step']:8.2f} {reached} {r['steps']:5d}  {shares}")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path, note: str = "") -> None:
    """Two log-log panels: ms/step against N at fixed M, and against M at fixed N, with the fitted slopes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fitted = {(f[0], f[1]): f for f in fits(rows)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), sharey=True)
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3)
    markers = {"1D/1D": "o", "1D/2D": "s", "2D/2D": "^"}
    for ax, (along, fixed) in zip(axes, (("N", "M"), ("M", "N"))):
        shown = []  # the rows on a curve of this panel
        for dims, name in FAMILIES:
            sel = [r for r in rows if r["dims"] == dims]
            for value in sorted({r[fixed] for r in sel}):
                line = sorted((r for r in sel if r[fixed] == value), key=lambda r: r[along])
                if len({r[along] for r in line}) < 2:
                    continue
                colour = next(colours)
                shown += line
                x, y = [r[along] for r in line], [1e3 * r["per_step"] for r in line]
                ax.loglog(x, y, "-", color=colour, lw=1.2, label=f"{name}, {fixed} = {value}")
                for r, xi, yi in zip(line, x, y):  # hollow: the 1D kernel's windowed storage (dense band too big)
                    ax.loglog([xi], [yi], markers[dims], color=colour, ms=6,
                              mfc="none" if r["band"] == "no" else colour)
        x_all = np.array([r[along] for r in shown], float)
        y_all = np.array([1e3 * r["per_step"] for r in shown])
        x0, y0 = x_all.min(), y_all[np.argmin(x_all)]
        for slope, style in ((1, "k--"), (2, "k:")):
            ref = np.geomspace(x0, x_all.max(), 10)
            keep = y0 * (ref / x0) ** slope <= 2 * y_all.max()
            ax.loglog(ref[keep], y0 * (ref[keep] / x0) ** slope, style, lw=0.8, label=f"slope {slope} (guide)")
        ticks = sorted({int(v) for v in x_all})
        ax.set_xticks(ticks)
        ax.set_xticks([], minor=True)
        labels, low = [], False  # a label within 25% of the previous one goes one line lower (441 / 481)
        for before, t in zip([None] + ticks, ticks):
            low = before is not None and t < 1.25 * before and not low
            labels.append(("\n" if low else "") + str(t))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_xlabel({"N": "N, number of states (at fixed M)", "M": "M, action DOFs (at fixed N)"}[along])
        ax.set_title(f"cost per step against {along} at fixed {fixed}", fontsize=10)
        ax.grid(True, which="major", lw=0.3, alpha=0.6)
        ax.legend(fontsize=7, loc="upper left")
        text = [f"fitted ms/step ~ {along}^b (least squares, log-log):"]
        for dims, name in FAMILIES:
            if (dims, along) in fitted:
                _, _, _, pooled, each, points = fitted[dims, along]
                text.append(f"{dims}: b = {pooled:.2f} (per {fixed}: {min(each.values()):.2f} .. "
                            f"{max(each.values()):.2f}; {points} points)")
        ax.text(0.98, 0.03, "\n".join(text), transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                bbox={"boxstyle": "round", "fc": "white", "ec": "0.7"})
    axes[0].set_ylabel("wall time per step (ms)")
    fig.suptitle("WPG step on lqr (dt = 0.05, run to gap 1e-8); hollow markers: 1D kernel in windowed storage "
                 f"(dense band > {budget.DENSE_BAND_BYTES // budget.MIB} MiB)" + (f"\n{note}" if note else ""),
                 fontsize=9)
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


def report(rows: list[dict], load, end, plot_file: Path) -> None:
    """Print the load average at the end, the fitted exponents and the switches; write the plot."""
    print(f"load average {end[0]:.2f} {end[1]:.2f} {end[2]:.2f} at the end")
    print("\n" + exponents(rows))
    print("\n" + switches(rows))
    plot(rows, plot_file, note=f"{os.cpu_count()} cores, load average {load[0]:.1f} at the start, "
                               f"{end[0]:.1f} at the end")
    print(f"\nplot: {plot_file}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes only (N <= 61, M <= 257; 2D actions <= 313 DOFs; 2D states <= 21 x 21)")
    parser.add_argument("--no-2d", action="store_true", help="skip the 2D-action and 2D-state rows")
    parser.add_argument("--no-beyond", action="store_true", help="skip the 1D rows N = 481, 961 (BEYOND_1D)")
    parser.add_argument("--no-mpi", action="store_true", help="skip the mpirun speed-up")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "scaling.png", help="plot file")
    parser.add_argument("--json", type=Path, help="also write the measured rows to this JSON file")
    parser.add_argument("--from-json", type=Path,
                        help="measure nothing: print the table, fits and switches and plot the rows of this file")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        rows, load, end = saved["rows"], saved["load"], saved["load_end"]
        print("\n".join(table(rows).splitlines()))
        report(rows, load, end, args.plot)
        return
    states, cells = (STATES_1D[:2], CELLS_1D[:2]) if args.quick else (STATES_1D, CELLS_1D)
    cells_2d = CELLS_2D[:2] if args.quick else CELLS_2D
    grids = GRIDS_2D_STATES[:2] if args.quick else GRIDS_2D_STATES
    sizes = [(n, c) for n in states for c in cells] + ([] if args.quick or args.no_beyond else list(BEYOND_1D))
    cases = [(CONFIG_1D, [f"states.n={n}", f"actions.cells={c}"]) for n, c in sizes]
    if not args.no_2d:
        cases += [(CONFIG_2D, [f"states.n={STATES_2D}", f"actions.cells={c}"]) for c in cells_2d]
        cases += [(CONFIG_2D_STATES, [f"states.n=[{n},{n}]", f"actions.cells={CELLS_2D_STATES}"]) for n in grids]
    load = os.getloadavg()
    print(f"lqr, flow.dt = 0.05, run loop to gap 1e-8 (fastest of <= {RUN_REPEATS} runs within {RUN_BUDGET_S:g} s); "
          f"stage shares timed separately (best of 3); numba kernels "
          f"{'on' if parallel.compiled_available(parallel.COMPILED_MIN_ENTRIES) else 'off'}; "
          f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the start")
    print("\n".join(table([]).splitlines()[:2]), flush=True)
    rows = []
    for path, overrides in cases:
        rows.append(measure(path, overrides))
        gc.collect()  # the previous kernel (GiBs at N = 961) is gone before the next is built
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    again = [i for i, row in enumerate(rows) if row["loop"] < SECOND_PASS_S]
    for i in again:  # short runs again, after the others: a burst of load in the first pass does not stay
        second = measure(*cases[i], stages=False)
        if second["per_step"] < rows[i]["per_step"]:
            rows[i].update({key: second[key] for key in ("loop", "per_step", "steps", "status", "gap")})
    if again:
        print(f"\nthe same, the runs under {SECOND_PASS_S:g} s timed again (the faster pass counts):")
        print(table(rows), flush=True)
    end = os.getloadavg()
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "load": load, "load_end": end}, indent=1))
    report(rows, load, end, args.plot)
    if not args.no_mpi:
        print()
        print(mpi_speedup())


if __name__ == "__main__":
    main()
