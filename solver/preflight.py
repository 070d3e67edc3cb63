"""Preflight: what a run will cost, estimated from the config alone, and the refusal of runs that cannot fit.

:func:`preflight` runs before anything is allocated or written (:func:`solver.runner.build`): a mesh file DOLFINx
would choke on, more than :data:`MAX_STEPS` projected steps, or more memory (:func:`memory_needed`) than the
machine has available are refused with a :class:`~solver.config.ConfigError` naming the key that dominates.
"""

from __future__ import annotations

import math

from . import bellman, budget, fem, flows, models, parallel
from .config import Config, ConfigError, inspect_xdmf


#: Longest run ``wpgflow run`` starts without ``--force-size``: ``t_end / dt`` steps. Every history row is kept in
#: memory for the summary, about :data:`ROW_BYTES` each, and counted in :func:`memory_needed`, so the memory check
#: usually refuses first (1e7 steps need 10 GiB).
MAX_STEPS = 100_000_000
ROW_BYTES = 1024


def projected_steps(config: Config) -> float:
    """Steps a run takes at most (:meth:`solver.flows.base.Flow.projected_steps` of its kind)."""
    return flows.lookup(config.flow.kind).projected_steps(config.flow)


def action_dofs(config: Config) -> int:
    """The number of action DOFs of ``[actions]`` without meshing (an XDMF mesh is checked and its vertices counted:
    :func:`solver.config.inspect_xdmf`)."""
    a = config.actions
    if a.domain == "interval":
        return a.cells + 1
    if a.domain == "rectangle":
        nx, ny = a.cells
        return (nx + 1) * (ny + 1) + nx * ny  # crossed diagonals: a vertex at every cell centre
    path = fem.MESH_DIR / f"{a.domain}_{a.resolution}.xdmf" if a.domain in fem.MESH_SHAPES else a.domain
    return inspect_xdmf(path)[0]


def memory_needed(config: Config, model: models.Model) -> int:
    """A cheap upper estimate of the peak memory of a run, bytes, for every kind of grid, from the config alone.

    2D state grids: :func:`solver.budget.memory_estimate` with windows of ``L = 2 ceil(9 sigma / h) + 1`` states
    per axis and bands of ``2 L``. 1D grids and one-state models: the same terms with one window (the kernel's
    dense band capped by :data:`~solver.budget.DENSE_BAND_BYTES`) and, for ``N <= 1500``, the dense LU of
    ``I - gamma P^pi``. On top: the history rows (:data:`ROW_BYTES` per projected step), the snapshots' values,
    and the dense generator-gap eigen-solve (``M^2`` doubles) on small action meshes.
    """
    st = config.states
    m = action_dofs(config)
    if model.single_state or st is None:
        axes = [(1, 1)]
    else:
        dims = list(zip(st.lower, st.upper, st.n)) if isinstance(st.n, list) else [(st.lower, st.upper, st.n)]
        axes = [(k, min(k, 2 * math.ceil(min(9 * model.sigma * (k - 1) / (hi - lo), 1e15)) + 1)) for lo, hi, k in dims]
    n = math.prod(k for k, _ in axes)
    widths = tuple(w for _, w in axes)
    bands = tuple(min(k, 2 * w) for k, w in axes)
    extra = (ROW_BYTES * min(projected_steps(config), 1e15) + 8 * (config.output.snapshots + 1) * n
             + (8 * m * m if m <= 600 else 0))
    extra += flows.lookup(config.flow.kind).extra_bytes(config.flow, n)  # e.g. the particles of each state
    extra += budget.COMPILED_BYTES if parallel.compiled_available(n * m) else 0  # numba, where it runs
    if len(axes) == 2:
        stored = budget.window_bytes(n, m, *widths) <= budget.WINDOW_STORE_BYTES
        return int(budget.memory_estimate(n, m, widths, bands, stored) + extra)
    per_policy = 8 * n * m
    kernel = per_policy * widths[0] + min(per_policy * bands[0], budget.DENSE_BAND_BYTES)
    dense_lu = 8 * n * n if n <= bellman.DENSE_STATES else 0
    return int(budget.BASE_BYTES + budget.POLICY_ARRAYS * per_policy + kernel + 12 * n * bands[0] + dense_lu
               + budget.KERNEL_CHUNK_BYTES + budget.SOLVE_CHUNK_BYTES + budget.SNAPSHOT_BYTES + extra)


def available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo``, bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def preflight(config: Config, model: models.Model, force_size: bool = False) -> None:
    """Refuse, before anything is allocated or written, what cannot run: a mesh file DOLFINx would choke on, more
    than :data:`MAX_STEPS` projected steps, or more memory (:func:`memory_needed`) than ``MemAvailable``. The size
    limits are lifted by ``force_size`` (``wpgflow run --force-size``)."""
    needed = memory_needed(config, model)  # checks a mesh file too (solver.config.inspect_xdmf)
    if force_size:
        return
    steps = projected_steps(config)
    if steps > MAX_STEPS:
        raise ConfigError(f"flow.dt: t_end / dt = {steps:.3g} steps is more than {MAX_STEPS:,} (allowed: a larger "
                          "flow.dt or a smaller flow.t_end, or --force-size)")
    available = available_memory()
    if available is not None and needed > available:
        grid = "x".join(map(str, config.states.n)) if config.states and isinstance(config.states.n, list) else (
            config.states.n if config.states else 1)
        n = math.prod(config.states.n) if config.states and isinstance(config.states.n, list) else (
            config.states.n if config.states else 1)
        key = "states.n"  # the term that dominates the estimate
        if ROW_BYTES * min(steps, 1e15) > needed / 2:
            key = "flow.dt"
        elif (kind := flows.lookup(config.flow.kind)).extra_bytes(config.flow, n) > needed / 2:
            key = kind.extra_bytes_key
        raise ConfigError(f"{key}: the run needs about {needed / 2 ** 30:.3g} GiB ({grid} states x "
                          f"{action_dofs(config)} action DOFs) but {available / 2 ** 30:.3g} GiB are available "
                          "(MemAvailable); allowed: smaller states.n / actions.cells / flow.particles, fewer steps "
                          "(t_end / dt), or --force-size")
