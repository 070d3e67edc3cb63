"""One run, end to end: config -> model -> MDP -> optimum -> flow loop with observers -> summary -> run directory.

This is the composition root of the package: :func:`build` makes a :class:`Problem` from a config, :func:`run`
drives the flow of ``flow.kind`` (:mod:`solver.flows`) and hands every state's history row to the observers
(:mod:`solver.observers`: one life cycle, closed in a ``finally``), :func:`summarise` makes ``summary.json``, and
:func:`execute` does all of ``wpgflow run`` after the config is loaded (``wpgflow sweep`` calls it once per run).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import numpy as np
import scipy

from . import __version__, along_flow, bellman, diagnostics, fem, flows, models, modes, oracles, outputs
from . import ledger, parallel, preflight
from .checkpoint import STOP, Checkpointer, Resume, load_resume, restore_observers
from .config import Config, ConfigError
from .mdp import MDP, build_mdp, product_grid
from .observers import HistoryCSV, Observer, Progress, Schedule, Snapshots

#: J may decrease by round-off only: ~1e-13 |J| (theory.md §8.6); larger decreases break monotonicity.
MONOTONE_TOLERANCE = 1e-12


@dataclass
class Problem:
    """Everything fixed before the flow starts."""

    config: Config
    model: models.Model
    mdp: MDP
    optimum: bellman.Optimum

    @property
    def J_star(self) -> float:
        return float(self.mdp.rho @ self.optimum.V)


def build(config: Config, force_size: bool = False) -> Problem:
    """Mesh the action domain, build the model and the discrete MDP, and solve for ``pi*`` by SPI.

    Everything is checked first (:func:`preflight`: sizes against the available memory unless ``force_size``,
    the mesh file; then the model's outputs on the grid); every refusal is a :class:`ConfigError` naming the key.
    """
    model = models.build(config.mdp.model, config.mdp.params)
    preflight.preflight(config, model, force_size)
    states = state_grid(config, model)
    a = config.actions
    space = action_space(config)
    if model.action_dim == space.dim and (model.single_state or model.state_dim == states.ndim):
        actions = space.coords[None, :, :] if space.dim == 2 else space.coords[:, 0][None, :]
        models.check_outputs(model, config.mdp.model, states[:, None], actions)
    try:
        with np.errstate(all="ignore"):
            mdp = build_mdp(model, states, space, config.mdp.gamma, config.mdp.tau, a.reference, a.reference_std)
    except ConfigError:
        raise
    except MemoryError:
        raise ConfigError("states: out of memory while building the MDP; allowed: smaller [states] / [actions] "
                          "grids") from None
    except Exception as exc:  # noqa: BLE001 - whatever the model's values do to the kernel, it is bad input
        raise ConfigError(f"mdp.params: the transition kernel or reward of {config.mdp.model!r} cannot be built "
                          f"on this grid ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    if not np.all(np.isfinite(mdp.reward)):
        raise ConfigError(f"mdp.model: the reward of {config.mdp.model!r} is not finite on the state/action grid")
    mdp = replace(mdp, rho=initial_states(config, states))
    flows.lookup(config.flow.kind).check(config.flow, space, parallel.Partition(None, len(states)))
    try:
        with np.errstate(all="ignore"):
            optimum = bellman.soft_policy_iteration(mdp)
    except (bellman.ConvergenceError, ArithmeticError, ValueError, np.linalg.LinAlgError) as exc:
        raise ConfigError(f"mdp.gamma: soft policy iteration failed with gamma = {config.mdp.gamma}, tau = "
                          f"{config.mdp.tau} ({' '.join(str(exc).split())[:120]}); allowed: a smaller mdp.gamma or "
                          "a larger mdp.tau for this reward") from None
    return Problem(config=config, model=model, mdp=mdp, optimum=optimum)


def action_space(config: Config) -> fem.ActionSpace:
    """The P1 action space of ``[actions]`` (:func:`solver.fem.domain_space`)."""
    a = config.actions
    return fem.domain_space(a.domain, a.lower, a.upper, a.cells, a.resolution,
                            a.radius if a.domain == "disk" else a.scale, a.center)


def initial_states(config: Config, states: np.ndarray) -> np.ndarray:
    """``rho``: uniform on the grid points inside ``[states] rho_lower .. rho_upper`` (default the whole grid).

    Raises:
        ConfigError: if the box holds no grid point.
    """
    st = config.states
    if st is None or (st.rho_lower is None and st.rho_upper is None):
        return np.full(len(states), 1.0 / len(states))
    grid = states.reshape(len(states), -1)
    lo = np.atleast_1d(st.rho_lower if st.rho_lower is not None else st.lower)
    hi = np.atleast_1d(st.rho_upper if st.rho_upper is not None else st.upper)
    slack = 1e-9 * np.maximum(1.0, np.maximum(np.abs(lo), np.abs(hi)))  # a box edge on a grid point keeps it
    inside = np.all((grid >= lo - slack) & (grid <= hi + slack), axis=1)
    if not inside.any():
        raise ConfigError(f"states.rho_lower: the box [{st.rho_lower}, {st.rho_upper}] holds no state of the grid; "
                          "allowed: a box containing at least one grid point")
    return inside / inside.sum()


def state_grid(config: Config, model: models.Model) -> np.ndarray:
    """The uniform state grid of ``[states]``.

    Returns:
        ``(N,)`` for a 1D grid; ``(nx * ny, 2)`` for a 2D grid, row-major over ``(nx, ny)``: state
        ``kx * ny + ky`` is ``(x_kx, y_ky)``.
    """
    st = config.states
    if model.single_state:
        if st is not None and st.n != 1:
            raise ConfigError(f"states.n: model {config.mdp.model!r} has one state; use n = 1 or omit [states]")
        return np.array([0.0 if st is None else 0.5 * (st.lower + st.upper)])
    if st is None:
        raise ConfigError(f"states: model {config.mdp.model!r} needs a [states] table (lower, upper, n)")
    dim = 2 if isinstance(st.n, list) else 1
    if dim != model.state_dim:
        form = "lists [x, y]" if model.state_dim == 2 else "numbers"
        raise ConfigError(f"states: model {config.mdp.model!r} has {model.state_dim}D states, so [states] lower, "
                          f"upper and n must be {form} (got a {dim}D grid)")
    if dim == 2:
        return product_grid(*(np.linspace(lo, hi, n) for lo, hi, n in zip(st.lower, st.upper, st.n)))
    if st.n < 2:
        raise ConfigError(f"states.n: model {config.mdp.model!r} needs n >= 2 states (got {st.n})")
    return np.linspace(st.lower, st.upper, st.n)


def initial_policy(config: Config, mdp: MDP) -> np.ndarray:
    """``(N, M)`` initial density: uniform, or a Gaussian ``N(init_mean, init_std^2)`` renormalised on the mesh.

    For 2D actions the Gaussian is isotropic, centred at ``(init_mean, init_mean)``.
    """
    f = config.flow
    if f.init == "uniform":
        return bellman.uniform_policy(mdp)
    a = mdp.space.coords
    with np.errstate(over="ignore", under="ignore"):  # a Gaussian far away: zero mass, refused below
        density = np.exp(-0.5 * np.sum(((a - f.init_mean) / f.init_std) ** 2, axis=1))
    total = density @ mdp.weights
    if not total > 0:
        raise ConfigError(f"flow.init_mean: the initial Gaussian has no mass on the action domain "
                          f"(mean {f.init_mean}, std {f.init_std})")
    return np.tile(density / total, (mdp.n_states, 1))


@dataclass
class RunResult:
    """What a run produced: the history rows, the last flow state, the loop's wall time and (MPI) the part of it
    this rank spent in collectives (:attr:`solver.parallel.Partition.collective_time`)."""

    rows: list[dict] = field(default_factory=list)
    final: flows.FlowState | None = None
    loop_time: float = 0.0
    collective_time: float = 0.0
    status: str = "running"
    message: str = ""


def make_flow(problem: Problem, partition: parallel.Partition | None = None) -> flows.Flow:
    """The flow of ``flow.kind`` for ``problem`` (serial: a one-rank partition); refuses what the kind cannot run."""
    partition = partition if partition is not None else parallel.Partition(None, problem.mdp.n_states)
    cls = flows.lookup(problem.config.flow.kind)
    cls.check(problem.config.flow, problem.mdp.space, partition)
    return cls(problem.mdp, problem.config.flow, partition, model=problem.model)


def _failure(exc: BaseException) -> str:
    """The one-line message of a run that failed with ``exc``."""
    if isinstance(exc, OSError):
        return f"cannot write {exc.filename or 'a file'}: {exc.strerror or exc}"
    if isinstance(exc, MemoryError):
        return "out of memory during the run"
    message = str(exc) if isinstance(exc, flows.NumericalError) else f"{type(exc).__name__}: {exc}"
    return " ".join(message.split())


def run(problem: Problem, observers: Iterable[Observer] = (), partition: parallel.Partition | None = None,
        flow: flows.Flow | None = None, p0: np.ndarray | None = None, resume: Resume | None = None,
        checkpoint=None, checkpoint_every: int = 0) -> RunResult:
    """Run the flow until ``t_end`` or ``gap <= gap_tol``; any failure of a step ends it with status "failed".

    Every observer is started, sees every state, and is finished in a ``finally`` (success, failure or
    interrupt), each even if another one fails. A state's resolvent is released once every observer has seen it
    and the loop goes on; the last state keeps it, for the observers' :meth:`~solver.observers.Observer.finish`.

    ``partition``: MPI over states (:mod:`solver.parallel`); every rank runs this loop with its observers
    (:func:`run_observers`: rank 0's own and the collective ones) and the stopping tests use rank 0's gap and
    signals, so all ranks stop together.

    ``p0``: the initial policy (default :func:`initial_policy`). ``resume``: continue from a checkpoint
    (:class:`Resume`); its state is not observed again (its row and the observers' lists were restored by the
    caller). ``checkpoint(state)`` is called (on every rank) after the observers at every ``checkpoint_every``-th
    step, and at the end: normal, or a stop request (:data:`STOP`, status "interrupted"). Not after a failure or
    an immediate interrupt (KeyboardInterrupt, also "interrupted"): the flow may be half-way through a step.
    """
    flow = flow if flow is not None else make_flow(problem, partition)
    partition = flow.partition
    f = problem.config.flow
    observers = list(observers)
    result = RunResult(rows=list(resume.rows) if resume is not None else [])
    J_star = problem.J_star
    start, collective = time.perf_counter(), partition.collective_time
    if resume is not None:
        p0 = resume.state["p"]
    elif p0 is None:
        p0 = initial_policy(problem.config, problem.mdp)
    fresh = None  # the last state whose flow state has not been checkpointed yet
    STOP.phase = "loop"
    try:
        for observer in observers:
            observer.start(problem)
        skip = resume is not None  # the checkpointed state was observed before the checkpoint
        for state in flows.trajectory(flow, p0, f.t_end, resume=resume.state if resume is not None else None):
            result.final = state
            if not skip:
                fresh = state
                row = diagnostics.record(flow, state, J_star, result.rows[-1] if result.rows else None)
                result.rows.append(row)
                # under MPI p, g and Q stay distributed unless rank 0's observers read every state of this one
                if partition.bcast(any(observer.needs_full(row, state) for observer in observers)):
                    state.gather(partition)
                for observer in observers:
                    observer.observe(row, state)
                if checkpoint is not None and checkpoint_every and state.step % checkpoint_every == 0:
                    if checkpoint(state) is not False:  # a Checkpointer may skip a periodic one (wall-time rule)
                        fresh = None
            skip = False
            converged, stop = partition.bcast((result.rows[-1]["gap"] <= f.gap_tol, STOP.requested))  # one collective
            if converged:
                result.status = "converged"
                break
            if stop:
                result.status = "interrupted"
                result.message = f"stopped by {signal.Signals(STOP.signum).name}" if STOP.signum else "stopped"
                break
            if flow.more(state, f.t_end):
                state.release()
        else:
            result.status = "t_end"
        STOP.phase = "writing"
        if checkpoint is not None and fresh is not None:
            checkpoint(fresh)  # a consistent end: --resume / --extend continue from here
    except KeyboardInterrupt:
        result.status, result.message = "interrupted", "interrupted at once (a second signal, or Ctrl-C)"
    except Exception as exc:  # noqa: BLE001 - any failure of a step (non-finite values, a full disk) ends the run
        result.status, result.message = "failed", _failure(exc)
    finally:
        STOP.phase = "writing"
        if result.final is not None:  # collective (as the observers' finish): the last state, whole
            result.final.gather(partition)
        result.loop_time = time.perf_counter() - start
        result.collective_time = partition.collective_time - collective
        for observer in observers:
            try:
                observer.finish(result)
            except Exception as exc:  # noqa: BLE001 - the others still finish; the run is failed
                if result.status != "failed":
                    result.status, result.message = "failed", _failure(exc)
    return result


def summarise(problem: Problem, result: RunResult, setup_time: float, flow: flows.Flow,
              observers: Iterable[Observer] = ()) -> dict:
    """The ``summary.json`` dictionary (keys documented in the README); the observers add their own keys."""
    cfg, mdp, opt = problem.config, problem.mdp, problem.optimum
    rows = result.rows
    t = np.array([r["t"] for r in rows])
    J = np.array([r["J"] for r in rows])
    gap = np.array([r["gap"] for r in rows])
    decreases = -np.diff(J)
    max_decrease = float(decreases.max()) if decreases.size else 0.0
    fit = diagnostics.fit_rate(t, gap, dissipation=np.array([r["dissipation"] for r in rows]))
    ell_star = [o.ell_star for o in observers if getattr(o, "ell_star", None) is not None]
    ell = ell_star[0] if ell_star else diagnostics.generator_gaps(mdp, opt.Q, cfg.flow.scheme)
    ell_min = float(ell.min()) if mdp.n_actions > 1 else math.nan
    steps = len(rows) - 1
    summary = {
        "status": result.status,
        "message": result.message,
        "model": cfg.mdp.model,
        "reference_measure": f"{cfg.actions.reference} (unnormalised)" if cfg.actions.reference == "lebesgue"
        else f"gaussian N(0, {cfg.actions.reference_std}^2), untruncated normalisation",
        "n_states": mdp.n_states,
        "n_action_dofs": mdp.n_actions,
        "J_star": problem.J_star,
        "J_initial": float(J[0]),
        "J_final": float(J[-1]),
        "gap_initial": float(gap[0]),
        "gap_final": float(gap[-1]),
        "rate": fit.rate if fit else None,
        "rate_r2": fit.r2 if fit else None,
        "rate_window": list(fit.window) if fit else None,
        "rate_t_range": list(fit.t_range) if fit else None,
        "ell_min": ell_min,
        "predicted_rate": flow.predicted_rate(ell_min),
        "measured_rate": fit.rate if fit else None,
        "predicted_rate_bound": None,
        "lsi_bracket": None,
        "local_rate_check": None,
        "local_rate_check_continuum": None,
        "certified_status": None,
        "certified_margin": None,
        "continuum_vacuous_states": None,
        "steps": steps,
        "t_final": float(t[-1]),
        "setup_time_s": setup_time,
        "wall_time_s": setup_time + result.loop_time,
        "time_per_step_s": result.loop_time / steps if steps else None,
        "monotone": bool(max_decrease <= MONOTONE_TOLERANCE * max(1.0, float(np.max(np.abs(J))))),
        "max_decrease": max(max_decrease, 0.0),
        "max_mass_error": float(max(r["mass_error"] for r in rows)),
        "min_density": float(min(r["min_density"] for r in rows)),
        "spi_iterations": opt.iterations,
        "bellman_residual": opt.residual,
        "versions": {"wpgflow": __version__, "dolfinx": fem.dolfinx_version(), "numpy": np.__version__,
                     "scipy": scipy.__version__},
    }
    if mdp.n_actions > 1:
        at_optimum = along_flow.optimum_summary(problem, ell)
        summary["lsi_bracket"] = at_optimum["lsi_bracket"]
        if flow.fokker_planck:
            summary["predicted_rate_bound"] = at_optimum["predicted_rate_bound"]
    # rate verdicts: asymptotic regime, excited modes, boundary-affected states (solver.modes, theory.md §10.2)
    start = next((o for o in observers if isinstance(o, modes.WindowStart)), None)
    summary.update(modes.rate_summary(problem, result.final.p if result.final is not None else None, flow, fit,
                                      ell=ell if mdp.n_actions > 1 else None, gap=float(gap[-1]),
                                      history=(t, gap), start=start))
    for observer in observers:
        summary.update(observer.summary())
    summary.update(flow.summary(problem, result))
    summary.update(oracle_comparison(problem))
    return summary


def oracle_comparison(problem: Problem) -> dict:
    """For ``lqr``, the closed form of theory.md §7.1 and the discrete optimum's distance to it."""
    cfg = problem.config
    if cfg.mdp.model != "lqr":
        return {}
    std = cfg.actions.reference_std if cfg.actions.reference == "gaussian" else None
    exact = oracles.lqr_closed_form(cfg.mdp.params, cfg.mdp.gamma, cfg.mdp.tau, std)
    states = problem.mdp.states
    # theory.md §8.3: far from the truncated action and state boundaries (max-norm for 2D states)
    interior = np.abs(states).reshape(len(states), -1).max(axis=1) <= 2.0
    error = np.abs(problem.optimum.V - exact.value(states))[interior]
    return {"oracle": exact.as_dict() | {
        "rate_continuous": exact.wpg_rate(),
        "rate_implicit_euler": exact.wpg_rate(
            None if cfg.flow.adaptive or cfg.flow.integrator == "exponential" else cfg.flow.dt),
        "V_star_max_error_interior": float(error.max()) if error.size else None}}


def run_observers(problem: Problem, out: Path, progress_bar: bool = False,
                  partition: parallel.Partition | None = None) -> list[Observer]:
    """The observers of a ``wpgflow run``: history, snapshots, the local-rate check, the progress bar.

    Under MPI (``partition`` of several ranks) rank 0 gets them all; another rank gets the collective ones
    (:attr:`~solver.observers.Observer.collective`: the local-rate check and the hypothesis ledger, which split
    their per-state work over the ranks) and a base :class:`~solver.observers.Observer` in place of each of rank 0's
    own.
    """
    cfg, mdp = problem.config, problem.mdp
    schedule = (cfg.output.snapshots, cfg.flow.dt, cfg.flow.t_end)
    root = partition is None or partition.root
    observers: list[Observer] = [
        HistoryCSV(out) if root else Observer(),
        Snapshots(Schedule(*schedule), outputs.snapshot_states(mdp.n_states, mdp.n_actions, cfg.output.snapshots))
        if root else Observer()]
    if flows.lookup(cfg.flow.kind).fokker_planck and mdp.n_actions > 1:
        observers.append(along_flow.LocalRates(problem, schedule=Schedule(*schedule), out=out if root else None,
                                               partition=partition))
        observers.append(modes.WindowStart() if root else Observer())  # the policy whose modes predict the span
    observers.append(ledger.Ledger(problem, Schedule(*schedule), out if root else None, peers=observers,
                                   partition=partition))  # hypotheses.csv; collective
    if root and progress_bar:
        observers.append(Progress(cfg.flow.t_end))
    return observers


def execute(cfg: Config, out: Path, force: bool = False, progress_bar: bool = False, force_size: bool = False,
            resume_from: Path | None = None) -> dict:
    """One run, config to run directory: build, flow, write every file of ``out``; return ``summary.json``'s dict.

    This is all of ``wpgflow run`` after the config is loaded (``wpgflow sweep`` calls it once per run).
    Raises :class:`ConfigError` / :class:`ConvergenceError` before anything is written; a numerical failure
    of the flow is reported as ``summary["status"] == "failed"`` with the files up to the failure written.

    Under ``mpirun -n K`` (K > 1) the states are split over the ranks (:mod:`solver.parallel`); a ConfigError
    on any rank is raised on every rank; rank 0 alone writes ``out`` and returns the full summary, the other
    ranks return only ``status`` and ``message``.
    """
    held: list = []
    try:
        summary, root = run_and_write(cfg, out, force, progress_bar, force_size, resume_from, keep_lock=held)
        _plot_and_finish(cfg, out, summary, root)
    finally:
        for lock in held:
            lock.release()
    return summary


def _plot_and_finish(cfg: Config, out: Path, summary: dict, root: bool) -> None:
    """The plots of :func:`execute` (rank 0, under the run directory's lock)."""
    from . import plots

    if root and summary["status"] == "failed" and summary.get("steps") and not summary["message"].startswith(
            "cannot write"):  # plot what there is, if it can be (not on a full disk)
        try:
            plots.plot_run(out)
        except Exception:  # noqa: BLE001 - the run failed already; its files are what counts
            pass
    if root and summary["status"] in ("converged", "t_end") and not STOP.requested:  # the plots read the files
        _return_freed_memory()
        start = time.perf_counter()
        try:
            plots.plot_run(out)
            if cfg.output.animation:
                from .plots.animate import animate
                animate(out)
        except Exception as exc:  # noqa: BLE001 - a figure must never cost a run its results (all written by now)
            summary["plot_error"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            print(f"wpgflow: warning: drawing the figures failed ({summary['plot_error']}); the results in {out}/ "
                  f"are complete ('wpgflow plot {out}' retries)", file=sys.stderr)
        summary["plot_time_s"] = time.perf_counter() - start  # plots (and the movie): after wall_time_s
        outputs.write_summary(out, summary)


def _return_freed_memory() -> None:
    """Give the heap freed by a run back to the OS (glibc keeps it otherwise, and the plots' arrays would come
    on top of it in the peak resident memory; measured: 631 -> 149 MiB after 61 x 61 states x 1013 DOFs).
    A no-op where ``malloc_trim`` does not exist."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_and_write(cfg: Config, out: Path, force: bool = False, progress_bar: bool = False,
                  force_size: bool = False, resume_from: Path | None = None,
                  keep_lock: list | None = None) -> tuple[dict, bool]:
    """:func:`execute` but the plots; returns ``(summary, is rank 0)``.

    Everything is validated before the run directory is touched: the config, sizes (:func:`preflight`), the model,
    the initial policy and what the observers compute up front; then the directory is created and locked
    (:func:`solver.outputs.prepare_run_dir`), ``config.toml`` and a ``summary.json`` with status ``running`` are
    written, and the loop runs with a checkpoint every ``output.checkpoint_every`` steps. ``solution.npz`` is
    written before the final ``summary.json``, so a summary with a final status describes complete files; if
    writing fails (a full disk) the summary says ``failed`` and names the file. ``resume_from``: continue the run
    of that directory from its ``checkpoint.npz`` (:func:`resume`). ``keep_lock``: a list to which the directory's
    lock is appended instead of being released at the end (:func:`execute` holds it while it plots).
    """
    comm = parallel.world_comm()
    root = comm is None or comm.Get_rank() == 0
    start = time.perf_counter()
    error, lock, resume_state = None, None, None
    try:  # all validation happens before anything is written
        problem = build(cfg, force_size)
        partition = parallel.Partition(comm, problem.mdp.n_states)
        flow = make_flow(problem, partition)
        p0 = initial_policy(cfg, problem.mdp)  # refuses a Gaussian with no mass on the domain
        observers = checked_observers(problem, out, progress_bar, partition)
        if resume_from is not None:
            if root:
                lock = outputs.RunLock(out)
            resume_state = load_resume(out, cfg)
        elif root:
            lock = outputs.prepare_run_dir(out, force)
        if root:
            try:
                outputs.write_config(out, cfg)
                outputs.write_summary(out, _running_summary(problem, resume_state))
            except OSError as exc:
                raise ConfigError(f"--out {out}: cannot write the run directory ({exc.strerror or exc}: "
                                  f"{exc.filename})") from None
    except ConfigError as exc:
        if lock is not None:
            lock.release()
        error = exc
    parallel.agree(error, comm)
    try:
        setup_time = time.perf_counter() - start
        if resume_state is not None:
            observers = restore_observers(observers, resume_state)
        every = cfg.output.checkpoint_every
        checkpoint = Checkpointer(out, cfg, flow, observers) if every else None
        result = run(problem, observers, flow=flow, p0=p0, resume=resume_state, checkpoint=checkpoint,
                     checkpoint_every=every)
        if not root:
            return {"status": result.status, "message": result.message}, root
        if result.status == "failed":
            outputs.truncate_partial_line(out / "history.csv")
        try:
            summary = summarise(problem, result, setup_time, flow, observers) if result.rows else {}
        except Exception as exc:  # noqa: BLE001 - a failed run's summary must still be written
            summary = {"summary_error": f"{type(exc).__name__}: {exc}"}
        summary = _running_summary(problem, resume_state) | summary | {
            "status": result.status, "message": result.message, "mpi_ranks": partition.size,
            "mpi_collective_time_s": result.collective_time,
            "steps": len(result.rows) - 1 if result.rows else 0,
            "checkpoint": outputs.CHECKPOINT if every else None}
        try:
            snapshots = next(o for o in observers if isinstance(o, Snapshots))
            outputs.write_solution(out, problem.mdp, problem.optimum, result.final, snapshots)
            outputs.write_summary(out, summary)
        except OSError as exc:
            summary |= {"status": "failed", "message": _failure(exc)}
            outputs.truncate_partial_line(out / "history.csv")
            try:
                outputs.write_summary(out, summary)
            except OSError:
                outputs.write_failed_summary(out, {"status": "failed", "message": summary["message"]})
        if keep_lock is not None:
            keep_lock.append(lock)
            lock = None
        return summary, root
    finally:
        if lock is not None:
            lock.release()


def checked_observers(problem: Problem, out: Path, progress_bar: bool,
                      partition: parallel.Partition | None = None) -> list[Observer]:
    """:func:`run_observers`, made before anything is written: what they compute up front (the generator gaps at
    ``Q*``, the local-rate factor) must work, else the run is refused naming ``mdp.tau`` (``Q* / tau`` too steep
    for the action mesh: the spectral solves break down)."""
    root = partition is None or partition.root
    try:
        with np.errstate(all="ignore"):
            observers = run_observers(problem, out, progress_bar, partition)
            if root and problem.mdp.n_actions > 1 and not any(getattr(o, "ell_star", None) is not None
                                                               for o in observers):
                observers.append(_GapsAtOptimum(problem))
    except (ArithmeticError, ValueError, np.linalg.LinAlgError) as exc:
        mdp = problem.mdp
        g = flows.potential(mdp, problem.optimum.Q)
        jump = float(np.max(np.abs(g[:, mdp.space.edges[:, 0]] - g[:, mdp.space.edges[:, 1]])))
        raise ConfigError(f"mdp.tau: tau = {mdp.tau:g} is too small for this reward on this action mesh (Q*/tau "
                          f"changes by up to {jump:.3g} along one mesh edge; the spectral-gap solve failed: "
                          f"{type(exc).__name__}); allowed: a larger mdp.tau, a smaller reward scale or a finer "
                          "action mesh") from None
    return observers


class _GapsAtOptimum(Observer):
    """The generator gaps at ``Q*``, computed before the run (for :func:`summarise`, as ``ell_star``) when no
    :class:`~solver.along_flow.LocalRates` computes them; so a failure shows before anything is written."""

    def __init__(self, problem: Problem):
        self.ell_star = diagnostics.generator_gaps(problem.mdp, problem.optimum.Q, problem.config.flow.scheme)


def _running_summary(problem: Problem, resume_state: Resume | None = None) -> dict:
    """The ``summary.json`` of a run in progress (``status = "running"``), written before the first step."""
    cfg, mdp = problem.config, problem.mdp
    return {"status": "running", "message": f"running (pid {os.getpid()})", "model": cfg.mdp.model,
            "n_states": mdp.n_states, "n_action_dofs": mdp.n_actions, "J_star": problem.J_star,
            "resumed_from_step": int(resume_state.state["step"]) if resume_state is not None else None}


def resume(out: Path, extend: float | None = None, progress_bar: bool = False, force_size: bool = False) -> dict:
    """``wpgflow run --resume RUN_DIR [--extend T]``: continue the run of ``out`` from its ``checkpoint.npz``.

    Without ``extend`` the run must be unfinished (``interrupted``, ``failed``, or ``running`` if it was killed);
    it continues to its ``flow.t_end``, and its results equal those of the uninterrupted run bit for bit (same
    thread count). With ``extend = T`` (> the run's ``flow.t_end``) a finished run continues to ``t_end = T``
    (``config.toml`` is rewritten with it). Returns the summary, as :func:`execute`.
    """
    from . import config as config_module

    if not (out / "config.toml").is_file():
        raise ConfigError(f"--resume {out}: not a run directory (missing config.toml)")
    cfg = config_module.load(out / "config.toml")
    status = outputs.read_summary(out)["status"]
    if extend is None and status in ("converged", "t_end"):
        raise ConfigError(f"--resume {out}: the run is finished (status {status!r}); use --extend T to continue it "
                          "to t_end = T")
    if extend is not None:
        if not (math.isfinite(extend) and extend > cfg.flow.t_end):
            raise ConfigError(f"--extend: must be a finite time > the run's flow.t_end = {cfg.flow.t_end:g} "
                              f"(got {extend:g})")
        if status == "converged":
            raise ConfigError(f"--extend: the run in {out} converged (gap <= flow.gap_tol = {cfg.flow.gap_tol:g}); "
                              "there is nothing to extend")
        cfg = replace(cfg, flow=replace(cfg.flow, t_end=float(extend)))
    return execute(cfg, out, progress_bar=progress_bar, force_size=force_size, resume_from=out)
