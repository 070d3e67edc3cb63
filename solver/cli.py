"""Command line: ``wpgflow run CONFIG``, ``wpgflow plot RUN_DIR``, ``wpgflow sweep CONFIG`` (:mod:`solver.sweep`) and
``wpgflow lsi RUN_DIR`` (:mod:`solver.lsi`).

Exit codes: 0 success; 1 the run failed numerically (what was computed is kept); 2 bad input (one line on
stderr naming the key and what is allowed; nothing is written).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__, parallel
from .bellman import ConvergenceError
from .config import ConfigError


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit with code 2."""

    def error(self, message: str):
        self.exit(2, f"wpgflow: error: {message} (see 'wpgflow --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wpgflow", description="Wasserstein policy-gradient flows of entropy-regularised MDPs.")
    parser.add_argument("--version", action="version", version=f"wpgflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run the experiment described by a TOML config")
    run.add_argument("config", type=Path, help="experiment config (TOML), e.g. experiments/lqr_1d.toml")
    run.add_argument("--out", type=Path, help="run directory (default: runs/<config stem>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set mdp.tau=0.5 --set flow.dt=0.02 (repeatable)")
    run.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    run.add_argument("--quiet", action="store_true", help="no progress bar and no report")
    plot = sub.add_parser("plot", help="redraw the plots of a run directory")
    plot.add_argument("run_dir", type=Path)
    lsi = sub.add_parser("lsi", help="LSI bracket and Poincare constant of a Gibbs policy of a run (math.md §5)")
    lsi.add_argument("run_dir", type=Path)
    lsi.add_argument("--state", type=int, help="state index (default: the slowest state, smallest generator gap)")
    lsi.add_argument("--time", type=float, help="use the snapshot nearest this flow time (default: the optimum Q*)")
    sweep = sub.add_parser("sweep", help="run a grid of runs (parameter values x flow kinds) in parallel processes")
    sweep.add_argument("config", type=Path, help="experiment config (TOML), e.g. experiments/sweep_tau_lqr.toml")
    sweep.add_argument("--param", metavar="KEY=V1,V2,...",
                       help="swept key and values, e.g. mdp.tau=0.05,0.1,0.2 (default: the config's [sweep] table)")
    sweep.add_argument("--kinds", metavar="K1,K2",
                       help="flow kinds, e.g. wasserstein,fisher_rao (default: [sweep].kinds, else flow.kind)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key in every run (repeatable)")
    sweep.add_argument("--out", type=Path, help="sweep directory (default: runs/<config stem>)")
    sweep.add_argument("--jobs", type=int, help="parallel worker processes (default and maximum: the number of cores)")
    sweep.add_argument("--force", action="store_true", help="overwrite existing run directories and sweep files")
    sweep.add_argument("--quiet", action="store_true", help="no per-run progress lines and no report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command != "run" and parallel.launched_size() > 1:
            raise ConfigError(f"mpirun: only 'wpgflow run' runs on several MPI ranks (got 'wpgflow {args.command}')")
        if args.command == "run":
            return _run(args)
        if args.command == "sweep":
            from .sweep import command
            return command(args)
        if args.command == "lsi":
            return _lsi(args)
        return _plot(args)
    except ConfigError as exc:
        if parallel.launched_rank() == 0:  # under mpirun every rank raises it; rank 0 says it once
            print(f"wpgflow: error: {exc}", file=sys.stderr)
        return 2
    except ConvergenceError as exc:
        if parallel.launched_rank() == 0:
            print(f"wpgflow: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("wpgflow: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    from . import config as config_module

    cfg = config_module.load(args.config, args.overrides)
    out = args.out if args.out is not None else Path("runs") / args.config.stem
    summary = execute(cfg, out, args.force, progress_bar=not args.quiet)
    root = parallel.launched_rank() == 0
    if summary["status"] == "failed":
        if root:
            print(f"wpgflow: run failed: {summary['message']}; results up to the failure are in {out}/",
                  file=sys.stderr)
        return 1
    if root and not args.quiet:
        print(_report(summary, out))
    return 0


def execute(cfg, out: Path, force: bool = False, progress_bar: bool = False) -> dict:
    """One run, config to run directory: build, flow, write every file of ``out``; return ``summary.json``'s dict.

    This is all of ``wpgflow run`` after the config is loaded (``wpgflow sweep`` calls it once per run).
    Raises :class:`ConfigError` / :class:`ConvergenceError` before anything is written; a numerical failure
    of the flow is reported as ``summary["status"] == "failed"`` with the files up to the failure written.

    Under ``mpirun -n K`` (K > 1) the states are split over the ranks (:mod:`solver.parallel`); a ConfigError
    on any rank is raised on every rank; rank 0 alone writes ``out`` and returns the full summary, the other
    ranks return only ``status`` and ``message``.
    """
    from . import plots

    summary, root = _run_and_write(cfg, out, force, progress_bar)
    if root:  # the plots read the run directory: the run's arrays are freed by now
        _return_freed_memory()
        plots.plot_run(out)
    return summary


def _return_freed_memory() -> None:
    """Give the heap freed by a run back to the OS (glibc keeps it otherwise, and the plots' arrays would come
    on top of it in the peak resident memory; measured: 631 -> 149 MiB after 61 x 61 states x 1013 DOFs).
    A no-op where ``malloc_trim`` does not exist."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _run_and_write(cfg, out: Path, force: bool, progress_bar: bool) -> tuple[dict, bool]:
    """:func:`execute` but the plots; returns ``(summary, is rank 0)``."""
    from . import experiment, lsi, outputs
    from .observers import HistoryCSV, Progress, Snapshots

    comm = parallel.world_comm()
    root = comm is None or comm.Get_rank() == 0
    start = time.perf_counter()
    error = None
    try:  # all validation happens before anything is written
        if comm is not None and cfg.flow.kind != "wasserstein":
            raise ConfigError(f"flow.kind: only 'wasserstein' runs on several MPI ranks (got {cfg.flow.kind!r}); "
                              "run it without mpirun")
        problem = experiment.build(cfg)
        partition = parallel.Partition(comm, problem.mdp.n_states)
        if root:
            outputs.prepare_run_dir(out, force)
            outputs.write_config(out, cfg)
    except ConfigError as exc:
        error = exc
    parallel.agree(error, comm)
    setup_time = time.perf_counter() - start
    history = HistoryCSV(out) if root else None
    mdp = problem.mdp
    snapshots = Snapshots(cfg.output.snapshots, cfg.flow.dt, cfg.flow.t_end,
                          outputs.snapshot_states(mdp.n_states, mdp.n_actions, cfg.output.snapshots))
    rates = None
    if root and cfg.flow.kind == "wasserstein" and mdp.n_actions > 1:
        rates = snapshots.on_snapshot = lsi.LocalRates(problem)  # math.md §5.3(c) at every snapshot
    observers = [history, snapshots] if root else []
    progress = Progress(cfg.flow.t_end) if progress_bar and root else None
    if progress:
        observers.append(progress)
    try:
        result = experiment.run(problem, observers, None if partition.serial else partition)
    finally:
        if history:
            history.close()
        if progress:
            progress.close()
    if not root:
        return {"status": result.status, "message": result.message}, root
    snapshots.finish(result.final)
    along = rates.result() if rates is not None and result.rows else None
    if along is not None:
        lsi.write_rates(out, along)
    summary = experiment.summarise(problem, result, setup_time, along) | {"mpi_ranks": partition.size}
    outputs.write_summary(out, summary)
    outputs.write_solution(out, problem.mdp, problem.optimum, result.final, snapshots)
    return summary, root


def _report(s: dict, out: Path) -> str:
    rate = "n/a" if s["rate"] is None else f"{s['rate']:.6g} (r^2 {s['rate_r2']:.5f})"
    predicted = "n/a" if s["predicted_rate"] is None else f"{s['predicted_rate']:.6g}"
    lines = [
        f"{s['model']}: {s['n_states']} states x {s['n_action_dofs']} action DOFs, {s['status']} after "
        f"{s['steps']} steps (t = {s['t_final']:.4g})",
        f"  J* = {s['J_star']:.12g}   J = {s['J_final']:.12g}   gap {s['gap_initial']:.3e} -> {s['gap_final']:.3e}",
        f"  rate: fitted {rate}, predicted asymptotic {predicted}",
        f"  monotone: {s['monotone']}   max mass error {s['max_mass_error']:.1e}   min density {s['min_density']:.2e}",
        f"  time per step {1e3 * (s['time_per_step_s'] or 0):.2f} ms, wall {s['wall_time_s']:.1f} s",
        f"  results in {out}/",
    ]
    return "\n".join(lines)


def _lsi(args) -> int:
    """``wpgflow lsi RUN_DIR [--state i] [--time t]``: bracket of ``G^{pi_t}_s`` (``Q*`` without ``--time``)."""
    import math

    import numpy as np

    from . import bellman, config as config_module, experiment, lsi, outputs

    if not (args.run_dir / "config.toml").exists():
        raise ConfigError(f"{args.run_dir}: not a run directory (missing config.toml)")
    _, _, solution = outputs.read_run(args.run_dir)
    problem = experiment.build(config_module.load(args.run_dir / "config.toml"))
    mdp = problem.mdp
    if args.state is not None and not 0 <= args.state < mdp.n_states:
        raise ConfigError(f"--state: must be a state index in 0..{mdp.n_states - 1} (got {args.state})")
    if args.time is None:
        Q, where = problem.optimum.Q, "optimum Q*"
    else:
        times = solution["snapshots_t"]
        if not (math.isfinite(args.time) and times.size and 0 <= args.time <= times[-1] * (1 + 1e-12)):
            raise ConfigError(f"--time: must be a flow time in [0, {times[-1] if times.size else 0:g}] "
                              f"(the run's snapshots; got {args.time:g})")
        k = int(np.argmin(np.abs(times - args.time)))
        Q, where = bellman.q_values(mdp, solution["snapshots_V"][k]), f"snapshot t = {times[k]:.6g}"
    r = lsi.state_report(problem, Q, args.state)
    print(f"Gibbs policy G_s at state {r['state']} (s = {np.ravel(mdp.states[r['state']]).tolist()}), {where}, "
          f"tau = {r['tau']:g}")
    print(f"  LSI constant C in [{r['lower']:.6g}, {r['upper']:.6g}]")
    print(f"    lower: {r['lower_method']}")
    print(f"    upper: {r['upper_method']}")
    print(f"  Poincare constant lambda = {r['poincare']:.6g}   (tau lambda = {r['tau'] * r['poincare']:.6g})")
    print(f"  discrete generator gap ell = {r['ell']:.6g}   (math.md §5.3(e): ell -> tau lambda as h -> 0)")
    return 0


def _plot(args) -> int:
    from .plots import plot_run

    for written in plot_run(args.run_dir):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
