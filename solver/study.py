"""Refinement studies: ``wpgflow study CONFIG [--levels 2|3]``: is every headline number resolved?

One experiment runs at its own resolution (level 0) and refined along three axes, each run a normal run
directory made by :func:`solver.runner.run_and_write` (without the per-run plots; ``wpgflow plot DIR/<run>``
draws them) in a worker process (at most ``min(--jobs, os.cpu_count())`` workers, as for ``wpgflow sweep``;
with one worker the runs go one after the other in this process):

* ``mesh``: ``actions.cells`` x 2 per level (interval, rectangle); ``actions.resolution`` coarse -> fine for the
  shipped 2D meshes (no finer level exists beyond "fine": the axis is then skipped, and said so);
* ``dt``: ``flow.dt`` / 2 per level (adaptive runs: ``flow.adapt_tol`` / 4, which halves the steps, and
  ``flow.dt_max`` / 2);
* ``domain``: the state interval enlarged about its centre, keeping the spacing ``h`` (each axis of a 2D grid;
  ``n - 1`` grows to an even number of extra cells so that the original states stay grid points), with ``rho``
  kept on the base box: level 1 by ``max(1.5, reach)`` where ``reach`` (:func:`domain_reach`) makes room for every
  next-state mean of the base states +- 4 sigma (so no base state's transitions are cut), level 2 by 1.5 more;
  at most :data:`MAX_DOMAIN_FACTOR`. Skipped for one-state models.

``--levels 3`` adds a second refinement per axis (x 4 cells, dt / 4, the domain x 1.5 again): then each mesh and
dt number gets an observed order ``p = log(|x_0 - x_1| / |x_1 - x_2|) / log(factor)`` and, when the order is clean
(:data:`CLEAN_ORDER`, the differences of one sign), a Richardson estimate ``x_2 + (x_2 - x_1) / (factor^p - 1)``
(the truncation error of a domain falls exponentially, not as a power: no order on that axis).

Headline numbers (:data:`QUANTITIES`, from each run's ``summary.json``): ``J_star`` (the ``domain`` runs keep
``rho`` on the base box, ``states.rho_lower/rho_upper``, so ``J* = rho . V*`` averages over the same states and the
enlarged MDP is asked the same question), the fitted rate, ``predicted_rate`` (slowest mode),
``predicted_rate_excited`` (the excited modes over the fit span), the LSI/Poincaré bracket ends of ``lsi_bracket``
and ``certified_margin`` where present. Each gets a verdict from its relative changes ``c_axis =
|x_last - x_0| / |x_0|`` along the axes: ``resolved to X%`` (``X = max c_axis``) when every change is at most
:data:`RESOLVED`; else ``<axis>-sensitive`` for every axis whose change exceeds it. For the fitted rate, the
runs whose own ``rate_verdict`` is ``transient`` or ``domain-sensitive`` (the base run, and the finest level of
each axis) are appended, e.g. ``resolved to 1.8% (runs say base: domain-sensitive)``: the numbers agree, but a
run says its fit is not the asymptotic rate. A number that is 0 at every level is reported as such.

Layout of the study directory ``DIR`` (default ``runs/<config stem>_study``)::

    DIR/<axis>-<level>/   one run directory per run (``base-0`` for level 0)
    DIR/study.csv         one row per (quantity, run), columns STUDY_COLUMNS
    DIR/study.png         relative change of each quantity against refinement level, one line per axis

``study.csv`` columns (empty cell = not available): ``quantity``; ``axis`` (base, mesh, dt, domain); ``level``
(0, 1, 2); ``setting`` (the changed config keys, e.g. ``actions.cells=512``); ``value``; ``change`` (relative to
the base value); ``status`` (the run's ``summary.json`` status) and ``rate_verdict`` (the run's own verdict);
``order`` and ``richardson`` (on the last level of an axis with three levels); ``verdict`` (the quantity's, the
same on all its rows); ``run_dir`` (relative to ``DIR``).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import config as config_module, flows, pool
from .bellman import ConvergenceError
from .config import ConfigError
from .sweep import OK_STATUSES

AXES = ("mesh", "dt", "domain")

#: Refinement factor per level of each axis (the ``factor`` of the observed order).
FACTORS = {"mesh": 2.0, "dt": 2.0, "domain": 1.5}

#: Relative change under refinement up to which a number is "resolved".
RESOLVED = 0.02

#: An observed order is clean in this range (and with successive differences of one sign).
CLEAN_ORDER = (0.5, 4.5)

#: Differences below this (relative) are round-off: no order is observed.
ROUND_OFF = 1e-12

QUANTITIES = ("J_star", "rate", "predicted_rate", "predicted_rate_excited", "lsi_lower", "lsi_upper", "poincare",
              "certified_lower", "certified_margin")

STUDY_COLUMNS = ("quantity", "axis", "level", "setting", "value", "change", "status", "rate_verdict", "order",
                 "richardson", "verdict", "run_dir")


@dataclass(frozen=True)
class Run:
    """One run of the study: its axis and level, the changed keys and the raw config."""

    axis: str
    level: int
    setting: str
    raw: dict
    out: Path
    run_dir: str
    force: bool


@dataclass(frozen=True)
class Plan:
    """A validated study: runs in order (base first), skipped axes with the reason."""

    out: Path
    levels: int
    runs: list[Run]
    skipped: dict[str, str]


def _refinements(cfg, raw: dict, axis: str, level: int, reach: list[float] | None = None
                 ) -> tuple[list[str], str | None]:
    """The ``--set`` items that refine ``axis`` to ``level`` (>= 1), or ``([], reason)`` if it cannot.

    ``reach``: per state axis, the factor of :func:`domain_reach` (None: plain ``1.5 ** level``)."""
    a, f = cfg.actions, cfg.flow
    if axis == "mesh":
        if a.domain in ("interval", "rectangle"):
            cells = a.cells if a.cells is not None else (256 if a.domain == "interval" else 16)
            scale = 2 ** level
            new = [c * scale for c in cells] if isinstance(cells, list) else cells * scale
            return [f"actions.cells={json.dumps(new)}"], None
        if a.resolution == "coarse" and level == 1:
            return ['actions.resolution="fine"'], None
        return [], f"the {a.domain} mesh has no finer shipped level than {a.resolution!r}"
    if axis == "dt":
        if not flows.lookup(f.kind).time_stepped:
            return [], f"flow.kind = {f.kind!r} does not depend on flow.dt"
        items = [f"flow.dt={f.dt / 2 ** level!r}"]
        if f.adaptive:
            items.append(f"flow.adapt_tol={f.adapt_tol / 4 ** level!r}")
            if math.isfinite(f.dt_max):
                items.append(f"flow.dt_max={f.dt_max / 2 ** level!r}")
        return items, None
    st = cfg.states
    if st is None or "states" not in raw:
        return [], "a one-state model has no state domain"
    lowers, uppers, ns = (st.lower, st.upper, st.n) if isinstance(st.n, list) else ([st.lower], [st.upper], [st.n])
    new_lo, new_hi, new_n = [], [], []
    for d, (lo, hi, n) in enumerate(zip(lowers, uppers, ns)):
        h = (hi - lo) / (n - 1)
        factor = FACTORS["domain"] ** level
        if reach is not None:  # the first level already uncuts the base states' kernels (capped)
            factor = min(MAX_DOMAIN_FACTOR, max(factor, reach[d] * FACTORS["domain"] ** (level - 1)))
        extra = int(round((n - 1) * (factor - 1) / 2))  # cells added on each side
        new_lo.append(lo - extra * h)
        new_hi.append(hi + extra * h)
        new_n.append(n + 2 * extra)
    # rho stays on the base box: the enlarged MDP is asked the same question (J = rho . V over the same states)
    rho_lo = st.rho_lower if st.rho_lower is not None else st.lower
    rho_hi = st.rho_upper if st.rho_upper is not None else st.upper
    if isinstance(st.n, list):
        return [f"states.lower={json.dumps(new_lo)}", f"states.upper={json.dumps(new_hi)}",
                f"states.n={json.dumps(new_n)}", f"states.rho_lower={json.dumps(rho_lo)}",
                f"states.rho_upper={json.dumps(rho_hi)}"], None
    return [f"states.lower={new_lo[0]!r}", f"states.upper={new_hi[0]!r}", f"states.n={new_n[0]}",
            f"states.rho_lower={rho_lo!r}", f"states.rho_upper={rho_hi!r}"], None


#: The first ``domain`` level holds every next-state mean of the base states, +- this many ``sigma``.
REACH_SIGMAS = 4.0

#: ... but grows the state interval by at most this factor (the cost of a step grows like ``N^1.4-1.7``).
MAX_DOMAIN_FACTOR = 4.0


def domain_reach(cfg, model) -> list[float]:
    """Per state axis, the factor (about the interval's centre) by which the base state interval must grow to
    hold every next-state mean ``f(s, a)`` of its grid states and action DOFs, +- :data:`REACH_SIGMAS` ``sigma``.

    Then no base state's Gaussian transition is cut by the grid's ends (:func:`solver.modes.kernel_loss` below
    ~6e-5): the truncation the rate verdicts diagnose (``domain-sensitive``) is removed where ``rho`` lives. 1 if
    the base interval already does.
    """
    from . import modes, runner

    space = runner.action_space(cfg)
    states = runner.state_grid(cfg, model)
    means = np.asarray(modes.next_state_means(model, states, space), float)
    means = means.reshape(means.shape[0], means.shape[1], -1)
    grid = states.reshape(len(states), -1)
    factors = []
    for d in range(grid.shape[1]):
        lo, hi = float(grid[:, d].min()), float(grid[:, d].max())
        centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
        wanted = max(abs(float(means[..., d].min()) - centre), abs(float(means[..., d].max()) - centre))
        factors.append(max(1.0, (wanted + REACH_SIGMAS * model.sigma) / half))
    return factors


def plan(config_path: Path, overrides: list[str] = (), out: Path | None = None, levels: int = 2,
         force: bool = False) -> Plan:
    """Read the config, build every run's config and validate it; nothing is written.

    Raises:
        ConfigError: bad config or ``--levels``, or an existing run directory / study file without ``force``.
    """
    from . import models, outputs, runner

    if levels not in (2, 3):
        raise ConfigError(f"--levels: must be 2 or 3 (got {levels})")
    base = config_module.load(config_path, overrides)
    raw = tomllib.loads(Path(config_path).read_text())
    for item in overrides:
        config_module.apply_override(raw, item)
    raw.pop("sweep", None)
    out = Path(out) if out is not None else Path("runs") / f"{Path(config_path).stem}_study"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    model = models.build(base.mdp.model, base.mdp.params)
    reach = domain_reach(base, model) if base.states is not None and not model.single_state else None
    runs = [Run("base", 0, "", raw, out / "base-0", "base-0", force)]
    skipped = {}
    for axis in AXES:
        for level in range(1, levels):
            items, reason = _refinements(base, raw, axis, level, reach)
            if reason:
                skipped[axis] = reason
                break
            run_raw = copy.deepcopy(raw)
            for item in items:
                config_module.apply_override(run_raw, item)
            cfg = config_module.from_dict(run_raw)
            runner.state_grid(cfg, model)
            name = f"{axis}-{level}"
            runs.append(Run(axis, level, " ".join(items), run_raw, out / name, name, force))
    if not force:
        outputs.refuse_existing(out, [(run.run_dir, run.out) for run in runs], ("study.csv", "study.png"))
    return Plan(out=out, levels=levels, runs=runs, skipped=skipped)


def execute_run(run: Run) -> dict:
    """Run one level (in a worker process); return the headline numbers and the run's status and verdict."""
    from .runner import run_and_write

    start = time.perf_counter()
    try:  # no plots: a study has many runs; 'wpgflow plot DIR/<run>' draws one from its files
        summary, _ = run_and_write(config_module.from_dict(run.raw), run.out, run.force)
    except (ConfigError, ConvergenceError) as exc:
        return {"status": "error", "message": str(exc), "wall_time_s": time.perf_counter() - start}
    return {"status": summary["status"], "message": summary["message"], "rate_verdict": summary.get("rate_verdict"),
            "wall_time_s": summary["wall_time_s"]} | headline(summary)


def headline(summary: dict) -> dict:
    """The :data:`QUANTITIES` of one run's ``summary.json`` (None where absent)."""
    bracket = summary.get("lsi_bracket") or {}
    out = {q: summary.get(q) for q in ("J_star", "rate", "predicted_rate", "predicted_rate_excited",
                                       "certified_margin")}
    out |= {"lsi_lower": bracket.get("lower"), "lsi_upper": bracket.get("upper"),
            "poincare": bracket.get("poincare"), "certified_lower": bracket.get("certified_lower")}
    return {q: (float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None) for q, v in out.items()}


def run_all(study: Plan, jobs: int | None = None, on_done=None) -> list[dict]:
    """Every run of ``study`` (:func:`solver.pool.run_all`; with one worker in this process); results in plan order."""
    results: list[dict | None] = [None] * len(study.runs)
    return pool.run_all(execute_run, [(run,) for run in study.runs], results, jobs, on_done,
                        inline=True)


def observed_order(x0: float, x1: float, x2: float, factor: float) -> tuple[float | None, float | None]:
    """Observed order and Richardson estimate from three levels refined by ``factor``; ``(None, None)`` if a
    difference is at round-off (:data:`ROUND_OFF` relative), and ``(order, None)`` when the order is not clean
    (:data:`CLEAN_ORDER`, differences of one sign)."""
    d1, d2 = x1 - x0, x2 - x1
    if min(abs(d1), abs(d2)) <= ROUND_OFF * max(abs(x0), abs(x1), abs(x2)):
        return None, None
    order = math.log(abs(d1) / abs(d2)) / math.log(factor)
    if d1 * d2 > 0 and CLEAN_ORDER[0] <= order <= CLEAN_ORDER[1]:
        return order, x2 + d2 / (factor ** order - 1)
    return order, None


def analyse(study: Plan, results: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """The ``study.csv`` rows and each quantity's verdict (module docstring)."""
    base = results[0]
    rows, verdicts = [], {}
    per_axis: dict[str, list[tuple[Run, dict]]] = {}
    for run, res in zip(study.runs, results):
        per_axis.setdefault(run.axis, []).append((run, res))
    for q in QUANTITIES:
        x0 = base.get(q)
        if x0 is None and all(r.get(q) is None for r in results):
            continue
        changes, unresolved_rate = {}, []
        extra: dict[str, tuple] = {}
        for axis in AXES:
            levels = per_axis.get(axis, [])
            if not levels:
                continue
            last = levels[-1][1]
            if x0 is not None and last.get(q) is not None:
                changes[axis] = relative_change(last[q], x0)
            if q == "rate" and last.get("rate_verdict") in ("transient", "domain-sensitive", "mesh-sensitive"):
                unresolved_rate.append(f"{axis}: {last['rate_verdict']}")
            if (len(levels) == 2 and axis != "domain" and x0 is not None
                    and all(r.get(q) is not None for _, r in levels)):  # domain: not a power law, no order
                extra[axis] = observed_order(x0, levels[0][1][q], levels[1][1][q], FACTORS[axis])
        values = [r.get(q) for r in results if r.get(q) is not None]
        if not changes:
            verdict = "not available"
        elif values and all(v == 0 for v in values):
            verdict = "0 at every level (an uninformative bound)"
        else:
            sensitive = [f"{axis}-sensitive" for axis, c in changes.items() if c > RESOLVED]
            if sensitive:
                verdict = ", ".join(sensitive)
            else:
                verdict = f"resolved to {_percent(max(changes.values()))}"
            if q == "rate" and base.get("rate_verdict") in ("transient", "domain-sensitive", "mesh-sensitive"):
                unresolved_rate.insert(0, f"base: {base['rate_verdict']}")
            if unresolved_rate:
                verdict += f" (runs say {'; '.join(unresolved_rate)})"
        verdicts[q] = verdict
        for run, res in zip(study.runs, results):
            value = res.get(q)
            order, rich = extra.get(run.axis, (None, None)) if run.level == study.levels - 1 else (None, None)
            rows.append({"quantity": q, "axis": run.axis, "level": run.level, "setting": run.setting,
                         "value": value, "change": (value - x0) / abs(x0) if value is not None and x0 else
                         (0.0 if value == x0 == 0 else None),
                         "status": res.get("status"), "rate_verdict": res.get("rate_verdict"), "order": order,
                         "richardson": rich, "verdict": verdict, "run_dir": run.run_dir})
    return rows, verdicts


def relative_change(value: float, base: float) -> float:
    """``|value - base| / |base|``; 0 when both are 0, inf when only the base is."""
    if base == 0:
        return 0.0 if value == 0 else math.inf
    return abs(value - base) / abs(base)


def _percent(x: float) -> str:
    """``0.0042 -> "0.42%"`` (two significant digits)."""
    return f"{100 * x:.2g}%"


def write_csv(out: Path, rows: list[dict]) -> Path:
    """``out/study.csv`` with :data:`STUDY_COLUMNS` (floats in full precision, missing values empty)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "study.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(STUDY_COLUMNS)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else (repr(float(row[c])) if isinstance(row[c], float)
                                                            else str(row[c])) for c in STUDY_COLUMNS])
    return path


def read_csv(out: Path) -> list[dict]:
    """The rows of ``out/study.csv``: numbers as floats (``level`` as int), empty cells as None."""
    with open(Path(out) / "study.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for c in ("value", "change", "order", "richardson"):
            row[c] = float(row[c]) if row[c] != "" else None
        row["level"] = int(row["level"])
    return rows


def table(study: Plan, results: list[dict], verdicts: dict[str, str]) -> str:
    """The terminal table: one line per quantity, its value at every run, and its verdict."""
    names = [r.run_dir for r in study.runs]
    width = max(12, *(len(n) for n in names))
    lines = [f"{'quantity':<24}" + "".join(f"{n:>{width + 1}}" for n in names) + "   verdict"]
    for q, verdict in verdicts.items():
        cells = "".join(f"{_num(res.get(q)):>{width + 1}}" for res in results)
        lines.append(f"{q:<24}{cells}   {verdict}")
    for axis, reason in study.skipped.items():
        lines.append(f"(axis {axis} skipped: {reason})")
    return "\n".join(lines)


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.7g}"


def command(args) -> int:
    """``wpgflow study``: plan, run, write ``study.csv`` and ``study.png``, print the table; 1 if a run failed."""
    from .plots import plot_study

    study = plan(args.config, args.overrides, args.out, args.levels, args.force)
    start = time.perf_counter()
    done = 0

    def report(i: int, res: dict) -> None:
        nonlocal done
        done += 1
        run = study.runs[i]
        if res["status"] not in OK_STATUSES:
            print(f"wpgflow: {run.run_dir}: {res['status']}: {res.get('message', '')}", file=sys.stderr)
        if not args.quiet:
            print(f"[{done}/{len(study.runs)}] {run.run_dir} {run.setting}: {res['status']}, rate "
                  f"{_num(res.get('rate'))} ({res.get('rate_verdict')}), {res.get('wall_time_s', 0):.1f} s",
                  flush=True)

    if not args.quiet:
        print(f"study of {args.config}: {len(study.runs)} runs on "
              f"{pool.workers_for(args.jobs, len(study.runs))} worker processes", flush=True)
    results = run_all(study, args.jobs, report)
    rows, verdicts = analyse(study, results)
    write_csv(study.out, rows)
    plot_study(study.out)
    if not args.quiet:
        print(table(study, results, verdicts))
        print(f"wrote {study.out}/study.csv and {study.out}/study.png (wall {time.perf_counter() - start:.1f} s)")
    return 0 if all(r["status"] in OK_STATUSES for r in results) else 1
