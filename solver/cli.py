"""Command line: ``wpgflow run``, ``plot``, ``animate`` (:mod:`solver.plots.animate`), ``sweep`` (:mod:`solver.sweep`),
``study`` (:mod:`solver.study`), ``lsi`` (:mod:`solver.along_flow`), ``hypotheses`` (:mod:`solver.hypotheses`) and
``search`` (:mod:`solver.search`): argparse and printing only; the work is in :mod:`solver.runner` and those modules.

Exit codes: 0 success; 1 the run failed numerically (what was computed is kept); 2 bad input (one line on
stderr naming the key and what is allowed; nothing is written); 130 / 143 interrupted by SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
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
    parser.add_argument("-V", "--version", action="version", version=f"wpgflow {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run the experiment described by a TOML config")
    run.add_argument("config", type=Path, nargs="?",
                     help="experiment config (TOML), e.g. experiments/lqr_1d.toml (none with --resume)")
    run.add_argument("--out", type=Path, help="run directory (default: runs/<config stem>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set mdp.tau=0.5 --set flow.dt=0.02 (repeatable)")
    run.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    run.add_argument("--quiet", action="store_true", help="no progress bar and no report")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue the interrupted run of RUN_DIR from its checkpoint.npz")
    run.add_argument("--extend", type=float, metavar="T",
                     help="with --resume: continue a finished run to flow.t_end = T")
    run.add_argument("--force-size", action="store_true",
                     help="run even above the memory (MemAvailable) and step-count (1e8) limits")
    plot = sub.add_parser("plot", help="redraw the plots of a run directory")
    plot.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                      help="a run directory written by 'wpgflow run', e.g. runs/lqr_1d")
    animate = sub.add_parser("animate", help="write a movie of the policy density over flow time (density.gif)")
    animate.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                         help="a run directory written by 'wpgflow run', e.g. runs/lqr_1d")
    animate.add_argument("--out", type=Path, metavar="FILE",
                         help="movie file, .gif (Pillow) or .mp4 (needs ffmpeg) (default: RUN_DIR/density.gif)")
    animate.add_argument("--fps", type=int, default=None, metavar="N",
                         help="frames per second; one frame per snapshot, log-spaced in t (default: 8)")
    lsi = sub.add_parser("lsi", help="LSI bracket and Poincare constant of a Gibbs policy of a run (theory.md §5)")
    lsi.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                     help="a run directory written by 'wpgflow run', e.g. runs/lqr_1d")
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
    # --- wpgflow study (solver.study) ---
    study = sub.add_parser("study", help="run an experiment refined in action mesh, dt and state domain; "
                                         "verdict per headline number")
    study.add_argument("config", type=Path, help="experiment config (TOML), e.g. experiments/lqr_1d.toml")
    study.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key in every run (repeatable)")
    study.add_argument("--out", type=Path, help="study directory (default: runs/<config stem>_study)")
    study.add_argument("--jobs", type=int, help="parallel worker processes (default and maximum: the number of cores)")
    study.add_argument("--levels", type=int, default=2, choices=(2, 3),
                       help="resolution levels per axis: 2 (base + one refinement) or 3 (observed order, Richardson)")
    study.add_argument("--force", action="store_true", help="overwrite existing run directories and study files")
    study.add_argument("--quiet", action="store_true", help="no per-run progress lines and no table")
    # --- end wpgflow study ---
    # --- wpgflow hypotheses, wpgflow search (solver.hypotheses, solver.search) ---
    hyp = sub.add_parser("hypotheses", help="print the hypothesis ledger of a run (hypotheses.csv) with verdicts")
    hyp.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by 'wpgflow run'")
    hyp.add_argument("--refine", action="store_true",
                     help="add the refinement column: worst values at Q* with actions.cells x 1, 2, 4")
    search = sub.add_parser("search", help="derivative-free search over model parameters for the slowest rate, "
                                           "the worst certified margin or the largest regularity norm")
    search.add_argument("config", type=Path, help="experiment config (TOML), e.g. experiments/double_well_bandit.toml")
    search.add_argument("--vary", action="append", default=[], metavar="KEY=LO:HI", required=True,
                        help="a varied config key and its range, e.g. mdp.tau=0.05:0.3 (repeatable)")
    search.add_argument("--objective", choices=("rate", "margin", "regularity"), default="rate",
                        help="rate: minimise the asymptotic rate (SPI + generator gaps, no flow); margin: minimise "
                             "the certified margin (short flows); regularity: maximise sup|Hess_a Q^pi_t| "
                             "(short flows)")
    search.add_argument("--budget", type=int, default=40, metavar="N", help="evaluations of the objective")
    search.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key in every evaluation (repeatable)")
    search.add_argument("--out", type=Path, help="search directory (default: runs/<config stem>_search)")
    search.add_argument("--jobs", type=int, help="parallel worker processes (default and maximum: the number of cores)")
    search.add_argument("--force", action="store_true", help="overwrite an existing search directory")
    # --- end wpgflow hypotheses, search ---
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
        if args.command == "study":
            from .study import command as study_command
            return study_command(args)
        if args.command == "hypotheses":
            from .hypotheses import command as hypotheses_command
            return hypotheses_command(args)
        if args.command == "search":
            from .search import command as search_command
            return search_command(args)
        if args.command == "lsi":
            return _lsi(args)
        if args.command == "animate":
            from .plots.animate import animate
            print(animate(args.run_dir, args.out, args.fps))
            return 0
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
    except OSError as exc:  # a file system failure after the checks (a full disk while plotting, ...)
        if parallel.launched_rank() == 0:
            print(f"wpgflow: error: cannot write {exc.filename or 'a file'}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _run(args) -> int:
    """``wpgflow run``: exit 0 (done), 1 (the run failed), 2 (bad input), 130 / 143 (stopped by SIGINT / SIGTERM:
    the results so far and a checkpoint are in the run directory)."""
    import signal

    from . import checkpoint, config as config_module, runner

    resume = args.resume
    if resume is None and args.extend is not None and args.config is not None and args.config.is_dir():
        resume = args.config  # wpgflow run --extend T RUN_DIR
    if resume is not None:
        if args.overrides or args.force or args.out is not None or (args.config is not None and args.config != resume):
            raise ConfigError("--resume: takes the run directory alone (its config.toml is the config; "
                              "no CONFIG, --set, --out or --force)")
    elif args.extend is not None:
        raise ConfigError("--extend: continues a finished run: wpgflow run --resume RUN_DIR --extend T")
    elif args.config is None:
        raise ConfigError("run: needs a CONFIG (a TOML file) or --resume RUN_DIR")
    previous = checkpoint.install_signal_handlers()
    signum = None
    try:
        if resume is not None:
            out = resume
            summary = runner.resume(resume, args.extend, progress_bar=not args.quiet, force_size=args.force_size)
        else:
            cfg = config_module.load(args.config, args.overrides)
            out = args.out if args.out is not None else Path("runs") / args.config.stem
            summary = runner.execute(cfg, out, args.force, progress_bar=not args.quiet, force_size=args.force_size)
        signum = checkpoint.STOP.signum
    except KeyboardInterrupt:  # before the loop, or a second signal: stopped at once
        signum = checkpoint.STOP.signum or signal.SIGINT
        print(f"wpgflow: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    finally:
        checkpoint.restore_signal_handlers(previous)
    root = parallel.launched_rank() == 0
    if summary["status"] == "interrupted":
        if root:
            where = f"t = {summary['t_final']:.6g}, step {summary['steps']}" if "t_final" in summary else \
                f"step {summary.get('steps', 0)}"
            print(f"wpgflow: interrupted at {where}: partial results in {out}/ (summary.json status "
                  f"'interrupted'); continue with: wpgflow run --resume {out}", file=sys.stderr)
        return 128 + (signum or signal.SIGINT)
    if summary["status"] == "failed":
        if root:
            print(f"wpgflow: run failed: {summary['message']}; results up to the failure are in {out}/",
                  file=sys.stderr)
        return 1
    if root and not args.quiet:
        print(_report(summary, out))
    return 0


def _report(s: dict, out: Path) -> str:
    rate = "n/a" if s["rate"] is None else f"{s['rate']:.6g} (r^2 {s['rate_r2']:.5f})"
    predicted = "n/a" if s["predicted_rate"] is None else f"{s['predicted_rate']:.6g}"
    lines = [
        f"{s['model']}: {s['n_states']} states x {s['n_action_dofs']} action DOFs, {s['status']} after "
        f"{s['steps']} steps (t = {s['t_final']:.4g})",
        f"  J* = {s['J_star']:.12g}   J = {s['J_final']:.12g}   gap {s['gap_initial']:.3e} -> {s['gap_final']:.3e}",
        f"  rate: fitted {rate}, predicted asymptotic {predicted}",
        *_verdict_lines(s),
        f"  monotone: {s['monotone']}   max mass error {s['max_mass_error']:.1e}   min density {s['min_density']:.2e}",
        f"  time per step {1e3 * (s['time_per_step_s'] or 0):.2f} ms; wall: set-up {s['setup_time_s']:.1f} s + "
        f"loop {s['wall_time_s'] - s['setup_time_s']:.1f} s + plots {s.get('plot_time_s') or 0:.1f} s = "
        f"{s['wall_time_s'] + (s.get('plot_time_s') or 0):.1f} s",
        f"  results in {out}/",
    ]
    return "\n".join(lines)


# --- rate verdicts in words (solver.modes.rate_summary; README "Trusting the numbers") ---
def _verdict_lines(s: dict) -> list[str]:
    """The rate verdict of a summary, in words (nothing for a summary without one)."""
    verdict = s.get("rate_verdict")
    if verdict is None:
        return []
    lines = []
    if s.get("predicted_rate_excited") is not None:
        span = "over the fitted span" if s.get("modes_span") else "at the end of the run"
        ratio = s.get("modes_rate_ratio")
        lines.append(f"  excited modes predict {s['predicted_rate_excited']:.6g} {span}"
                     + (f" (measured / predicted {ratio:.4f})" if ratio is not None else ""))
        lines.append(f"  slowest mode: state {s['slowest_state']}; slowest excited mode: state "
                     f"{s['slowest_excited_state']} (mode {s['slowest_excited_mode']}), rate "
                     f"{s['slowest_excited_rate']:.6g}; dominant: state {s['dominant_state']}, rate "
                     f"{s['predicted_rate_dominant']:.6g}")
    elif s.get("slowest_state") is not None:
        lines.append(f"  slowest mode: state {s['slowest_state']}; not in the linear regime (gap at state "
                     f"{s['gap_state']}): no mode prediction")
    import textwrap

    words = {"resolved": "resolved: the fitted rate is the asymptotic rate",
             "transient": f"TRANSIENT: the fitted rate is not yet the asymptotic one (last local rate "
                          f"{(s.get('rate_local_last') or float('nan')):.6g})",
             "domain-sensitive": f"DOMAIN-SENSITIVE: the rate depends on the truncation of the domain (last local "
                                 f"rate {(s.get('rate_local_last') or float('nan')):.6g}; 'wpgflow study' refines it)",
             "mesh-sensitive": f"MESH-SENSITIVE: the asymptotic rate of the computed system, but the action mesh "
                               f"moves it (estimated {100 * abs(s.get('mesh_error_estimate') or 0):.2g}%; "
                               "'wpgflow study' refines it)"}
    lines.append(f"  rate verdict: {words[verdict]}")
    lines.extend(textwrap.wrap(f"why: {s['rate_verdict_reason']}", 110, initial_indent="    ",
                               subsequent_indent="      "))
    affected = s.get("boundary_affected_states")
    if affected:
        shown = ", ".join(map(str, affected[:8])) + (", ..." if len(affected) > 8 else "")
        lines.append(f"  boundary-affected states ({len(affected)}): {shown}")
    return lines
# --- end rate verdicts ---


def _lsi(args) -> int:
    """``wpgflow lsi RUN_DIR [--state i] [--time t]``: bracket of ``G^{pi_t}_s`` (``Q*`` without ``--time``)."""
    try:
        return _lsi_report(args)
    except (KeyError, IndexError, TypeError, ValueError) as exc:  # readable files whose arrays do not fit the config
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{args.run_dir}: damaged run directory: solution.npz does not fit config.toml "
                          f"({type(exc).__name__}: {exc})") from None


def _lsi_report(args) -> int:
    """:func:`_lsi` without the check of the run directory's consistency."""
    import math

    import numpy as np

    from . import along_flow, bellman, config as config_module, outputs, runner

    if not (args.run_dir / "config.toml").exists():
        raise ConfigError(f"{args.run_dir}: not a run directory (missing config.toml)")
    _, _, solution = outputs.read_run(args.run_dir)  # names a damaged file; the config below refuses foreign code
    problem = runner.build(config_module.load(args.run_dir / "config.toml"))
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
    r = along_flow.state_report(problem, Q, args.state)
    print(f"Gibbs policy G_s at state {r['state']} (s = {np.ravel(mdp.states[r['state']]).tolist()}), {where}, "
          f"tau = {r['tau']:g}")
    print(f"  LSI constant C in [{r['lower']:.6g}, {r['upper']:.6g}]")
    print(f"    lower: {r['lower_method']}")
    print(f"    upper: {r['upper_method']}")
    print(f"  Poincare constant lambda = {r['poincare']:.6g}   (tau lambda = {r['tau'] * r['poincare']:.6g})")
    print(f"  discrete generator gap ell = {r['ell']:.6g}   (theory.md §5.3(e): ell -> tau lambda as h -> 0)")
    print(f"  certified (discrete generator, theory.md §10.1): rho_0 in [{r['certified_lower']:.6g}, "
          f"{r['certified_upper']:.6g}]   (log pi_* = {r['log_pi_min']:.4g})")
    return 0


def _plot(args) -> int:
    from .plots import plot_run

    try:
        written = plot_run(args.run_dir)
    except (KeyError, IndexError, TypeError, ValueError) as exc:  # readable files, contents not of a run
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{args.run_dir}: damaged run directory: summary.json, history.csv and solution.npz do "
                          f"not fit together ({type(exc).__name__}: {exc})") from None
    for file in written:
        print(file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
