"""An experiment end to end: config -> model -> MDP -> optimum -> flow loop -> summary.

The flow generator of ``flow.kind`` (:func:`solver.flows.wasserstein_flow`, :func:`solver.comparison.fisher_rao_flow`,
:func:`solver.comparison.policy_iteration_flow`, :func:`solver.particles.particle_flow`) only steps. :func:`run`
consumes it, computes the diagnostics row of every state, hands ``(row, state)`` to observers (history file,
snapshots, progress bar) and stops at ``flow.t_end`` or when ``gap <= flow.gap_tol``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import scipy

from . import __version__, bellman, comparison, diagnostics, fem, flows, lsi, models, oracles, particles
from .config import Config, ConfigError
from .mdp import MDP, build_mdp, product_grid

Observer = Callable[[dict, flows.FlowState], None]

#: J may decrease by round-off only: ~1e-13 |J| (math.md §8.6); larger decreases break monotonicity.
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


def build(config: Config) -> Problem:
    """Mesh the action domain, build the model and the discrete MDP, and solve for ``pi*`` by SPI."""
    model = models.build(config.mdp.model, config.mdp.params)
    states = state_grid(config, model)
    a = config.actions
    space = fem.domain_space(a.domain, a.lower, a.upper, a.cells, a.resolution,
                             a.radius if a.domain == "disk" else a.scale, a.center)
    mdp = build_mdp(model, states, space, config.mdp.gamma, config.mdp.tau, a.reference, a.reference_std)
    if not np.all(np.isfinite(mdp.reward)):
        raise ConfigError(f"mdp.model: the reward of {config.mdp.model!r} is not finite on the state/action grid")
    if config.flow.kind == "particles" and not space.is_chain:
        raise ConfigError("flow.kind: 'particles' needs a 1D action interval (2D action domains are not supported)")
    return Problem(config=config, model=model, mdp=mdp, optimum=bellman.soft_policy_iteration(mdp))


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
    density = np.exp(-0.5 * np.sum(((a - f.init_mean) / f.init_std) ** 2, axis=1))
    total = density @ mdp.weights
    if not total > 0:
        raise ConfigError(f"flow.init_mean: the initial Gaussian has no mass on the action domain "
                          f"(mean {f.init_mean}, std {f.init_std})")
    return np.tile(density / total, (mdp.n_states, 1))


def flow_states(problem: Problem, partition=None) -> Iterable[flows.FlowState]:
    """The flow of kind ``flow.kind`` (``config.FLOW_KINDS``) from the initial policy, up to ``flow.t_end``.

    ``partition``: MPI over states (:mod:`solver.parallel`), "wasserstein" only.
    """
    f = problem.config.flow
    p0 = initial_policy(problem.config, problem.mdp)
    if f.kind == "fisher_rao":
        return comparison.fisher_rao_flow(problem.mdp, p0, f.dt, t_end=f.t_end)
    if f.kind == "policy_iteration":
        return comparison.policy_iteration_flow(problem.mdp, p0, t_end=f.t_end)
    if f.kind == "particles":
        return particles.particle_flow(problem.mdp, p0, f.dt, f.particles, f.seed, t_end=f.t_end)
    adaptive = flows.Adaptive(tol=f.adapt_tol, dt_max=f.dt_max) if f.adaptive else None
    return flows.wasserstein_flow(problem.mdp, p0, f.dt, f.scheme, adaptive, t_end=f.t_end, partition=partition)


@dataclass
class RunResult:
    """What a run produced: the history rows, the last flow state and the loop's wall time."""

    rows: list[dict] = field(default_factory=list)
    final: flows.FlowState | None = None
    loop_time: float = 0.0
    status: str = "running"
    message: str = ""


def run(problem: Problem, observers: Iterable[Observer] = (), partition=None) -> RunResult:
    """Run the flow until ``t_end`` or ``gap <= gap_tol``; non-finite values end it with status "failed".

    ``partition``: MPI over states (:mod:`solver.parallel`); every rank runs this loop (the observers are
    rank 0's business) and the stopping test uses rank 0's gap, so all ranks stop together.
    """
    f = problem.config.flow
    result = RunResult()
    J_star = problem.J_star
    start = time.perf_counter()
    try:
        for state in flow_states(problem, partition):
            row = diagnostics.record(problem.mdp, state, J_star, f.scheme, result.rows[-1] if result.rows else None,
                                     f.kind, partition)
            result.rows.append(row)
            result.final = state
            for observe in observers:
                observe(row, state)
            converged = row["gap"] <= f.gap_tol
            if converged if partition is None else partition.bcast(converged):
                result.status = "converged"
                break
        else:
            result.status = "t_end"
    except flows.NumericalError as exc:
        result.status, result.message = "failed", str(exc)
    result.loop_time = time.perf_counter() - start
    return result


def summarise(problem: Problem, result: RunResult, setup_time: float, along=None) -> dict:
    """The ``summary.json`` dictionary (keys documented in the README).

    ``along``: the :class:`solver.lsi.AlongFlow` check of the snapshots (gives ``local_rate_check``), or None.
    """
    cfg, mdp, opt = problem.config, problem.mdp, problem.optimum
    rows = result.rows
    t = np.array([r["t"] for r in rows])
    J = np.array([r["J"] for r in rows])
    gap = np.array([r["gap"] for r in rows])
    decreases = -np.diff(J)
    max_decrease = float(decreases.max()) if decreases.size else 0.0
    fit = diagnostics.fit_rate(t, gap)
    reuse = along is not None and along.ell_star is not None
    ell = along.ell_star if reuse else diagnostics.generator_gaps(mdp, opt.Q, cfg.flow.scheme)
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
        "predicted_rate": predicted_rate(cfg, mdp, ell_min),
        "measured_rate": fit.rate if fit else None,
        "predicted_rate_bound": None,
        "lsi_bracket": None,
        "local_rate_check": along.all_hold if along is not None else None,
        "local_rate_check_continuum": along.all_hold_continuum if along is not None else None,
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
        at_optimum = lsi.optimum_summary(problem, ell)
        summary["lsi_bracket"] = at_optimum["lsi_bracket"]
        if cfg.flow.kind == "wasserstein":
            summary["predicted_rate_bound"] = at_optimum["predicted_rate_bound"]
    summary.update(oracle_comparison(problem))
    return summary


def predicted_rate(cfg: Config, mdp: MDP, ell_min: float) -> float | None:
    """Asymptotic gap rate of the flow kind (None where there is no linear rate or no prediction).

    Wasserstein: ``2 ell_min`` (adaptive) or ``2 log(1 + dt ell_min) / dt`` (math.md §5.3(e)); Fisher-Rao:
    ``2 log(1 + tau dt) / dt`` (math.md §6); policy iteration is superlinear and the particle gap is
    dominated by sampling noise, so both get None.
    """
    f = cfg.flow
    if f.kind == "fisher_rao":
        return comparison.fisher_rao_rate(mdp.tau, f.dt)
    if f.kind != "wasserstein" or not math.isfinite(ell_min):
        return None
    return 2 * ell_min if f.adaptive else diagnostics.implicit_euler_rate(ell_min, f.dt)


def oracle_comparison(problem: Problem) -> dict:
    """For ``lqr``, the closed form of math.md §7.1 and the discrete optimum's distance to it."""
    cfg = problem.config
    if cfg.mdp.model != "lqr":
        return {}
    std = cfg.actions.reference_std if cfg.actions.reference == "gaussian" else None
    exact = oracles.lqr_closed_form(cfg.mdp.params, cfg.mdp.gamma, cfg.mdp.tau, std)
    states = problem.mdp.states
    # math.md §8.3: far from the truncated action and state boundaries (max-norm for 2D states)
    interior = np.abs(states).reshape(len(states), -1).max(axis=1) <= 2.0
    error = np.abs(problem.optimum.V - exact.value(states))[interior]
    return {"oracle": exact.as_dict() | {
        "rate_continuous": exact.wpg_rate(),
        "rate_implicit_euler": exact.wpg_rate(None if cfg.flow.adaptive else cfg.flow.dt),
        "V_star_max_error_interior": float(error.max()) if error.size else None}}
