"""Parameter sweeps: ``wpgflow sweep CONFIG --param KEY=V1,V2,... --kinds K1,K2``.

The grid ``kinds x values`` of one numeric config key runs as independent runs in parallel worker processes
(:class:`concurrent.futures.ProcessPoolExecutor`, at most ``min(--jobs, os.cpu_count())`` workers). Each run
goes through :func:`solver.runner.execute`, the code path of ``wpgflow run``, so every run directory is a normal
one. Without ``--param`` / ``--kinds`` the config's ``[sweep]`` table (``param``, ``values``, ``kinds``) is
used; without kinds there, the config's ``flow.kind``. Layout of the sweep directory ``DIR``::

    DIR/<kind>/<key>=<value>/   one run directory per grid point (config.toml, history.csv, summary.json, ...)
    DIR/sweep.csv               one row per run, columns SWEEP_COLUMNS, in grid order (kinds, then values)
    DIR/sweep.png               measured rate against the swept value for each kind, with the prediction, and
                                the relative error; for an mdp.tau sweep of a barrier model also the Arrhenius
                                plot with the fitted barrier and the Eyring-Kramers rate
                                (:func:`solver.plots.plot_sweep`)

``sweep.csv`` columns (empty cell = not available):

* ``kind``, ``param``, ``value``: the grid point (``value`` as given; ints stay ints);
* ``status``: the run's ``summary.json`` status (``converged``, ``t_end``, ``failed``), or ``error`` (the
  run was rejected before it started: :class:`ConfigError` or a failed SPI; the message goes to stderr),
  or ``interrupted`` (Ctrl-C before the run finished);
* ``measured_rate``, ``rate_r2``: the fitted linear rate of ``J* - J`` and its ``r^2`` (``rate``, ``rate_r2``
  of ``summary.json``; fit window theory.md §8.6);
* ``predicted_rate``: ``summary.json``'s ``predicted_rate``, the theory's asymptotic rate for this run's
  flow kind and time step (theory.md §5.3(e), §6);
* ``steps``, ``t_final``, ``wall_time_s``: from ``summary.json`` (``wall_time_s`` = set-up + flow loop);
* ``run_dir``: the run directory relative to ``DIR``;
* then the ``summary.json`` numbers :data:`SUMMARY_COLUMNS` under their summary names (``ell_min``, ``J_star``,
  ``gap_initial``, ``gap_final``, ``monotone`` as ``True``/``False``, ``max_decrease``, ``max_mass_error``,
  ``min_density``, and where the summary has them ``rate_status``, ``predicted_rate_excited``,
  ``certified_status``, ``certified_margin``, ``rate_verdict``, ``rate_local_last``). The other timings stay in
  the runs' ``summary.json``, so that every cell but ``wall_time_s`` is deterministic.

Every combination is validated (config schema, model parameters, state grid) before any run starts, and
nothing is overwritten without ``--force``. Results do not depend on ``--jobs`` or on the order in which
runs finish: every run is deterministic and rows are written in grid order. Workers ignore SIGINT; on
Ctrl-C the main process terminates and reaps them, writes ``sweep.csv`` with the finished rows (the others
``interrupted``) and re-raises, so the CLI exits with code 130 and leaves no worker behind.
"""

from __future__ import annotations

import copy
import csv
import math
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import config as config_module, flows, pool
from .bellman import ConvergenceError
from .config import ConfigError

SWEEP_COLUMNS = ("kind", "param", "value", "status", "measured_rate", "rate_r2", "predicted_rate", "steps",
                 "t_final", "wall_time_s", "run_dir", "rate_status", "predicted_rate_excited", "ell_min", "J_star",
                 "gap_initial", "gap_final", "monotone", "max_decrease", "max_mass_error", "min_density",
                 "certified_status", "certified_margin", "rate_verdict", "rate_local_last")

#: ``summary.json`` keys copied into ``sweep.csv`` under their own names (a key the summary lacks: empty cell).
#: Timings other than ``wall_time_s`` stay in each run's ``summary.json``: every other cell is deterministic.
SUMMARY_COLUMNS = ("rate_status", "predicted_rate_excited", "ell_min", "J_star", "gap_initial", "gap_final",
                   "monotone", "max_decrease", "max_mass_error", "min_density", "certified_status", "certified_margin",
                   "rate_verdict", "rate_local_last")

#: Columns :func:`read_csv` returns as floats; ``steps`` is an int and ``monotone`` a bool.
NUMERIC_COLUMNS = ("value", "measured_rate", "rate_r2", "predicted_rate", "t_final", "wall_time_s",
                   "predicted_rate_excited", "ell_min", "J_star", "gap_initial", "gap_final", "max_decrease",
                   "max_mass_error", "min_density", "certified_margin", "rate_local_last")

#: Statuses of a run that completed normally (the exit code is 0 only if every run has one of these).
OK_STATUSES = ("converged", "t_end")


@dataclass(frozen=True)
class Task:
    """One grid point: the run's raw (validated) config dict and where it writes."""

    kind: str
    param: str
    value: int | float
    raw: dict
    out: Path
    run_dir: str
    force: bool


@dataclass(frozen=True)
class Plan:
    """A validated sweep: ``tasks`` in grid order (kinds outer, values inner)."""

    param: str
    values: list
    kinds: list
    out: Path
    tasks: list[Task]


def parse_param(text: str) -> tuple[str, list]:
    """``"mdp.tau=0.05,0.1,1"`` -> ``("mdp.tau", [0.05, 0.1, 1])``; each value is a TOML number."""
    key, sep, rest = text.partition("=")
    key = key.strip()
    if not sep or config_module.dotted_key_problem(key) is not None:
        raise ConfigError(f"--param {text!r}: expected KEY=V1,V2,... with a dotted key such as mdp.tau=0.1,0.2")
    values = []
    for item in rest.split(","):
        try:
            value = tomllib.loads(f"v = {item.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"--param {key}: value {item.strip()!r} is not a finite number")
        values.append(value)
    if len(set(values)) != len(values):
        raise ConfigError(f"--param {key}: a value is repeated ({rest})")
    return key, values


def parse_kinds(text: str) -> list[str]:
    """``"wasserstein,fisher_rao"`` -> list, checked against :data:`solver.flows.KINDS`."""
    kinds = [k.strip() for k in text.split(",")]
    for kind in kinds:
        if kind not in flows.KINDS:
            raise ConfigError(f"--kinds: unknown flow kind {kind!r} (allowed: {', '.join(flows.KINDS)})")
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"--kinds: a kind is repeated ({text})")
    return kinds


def value_label(value: int | float) -> str:
    """The text of a value in a run directory name: ints as ints, floats as their shortest repr."""
    return str(value) if isinstance(value, int) else repr(float(value))


def plan(config_path: Path, param: str | None = None, kinds: str | None = None, overrides: list[str] = (),
         out: Path | None = None, force: bool = False) -> Plan:
    """Read the config, resolve the grid and validate every combination; nothing is written.

    Raises:
        ConfigError: bad ``--param`` / ``--kinds`` / config, an invalid combination (naming the key), or an
            existing run directory or sweep file without ``force``.
    """
    from . import models, outputs, runner

    base = config_module.load(config_path, overrides)  # validates the config as given
    raw = tomllib.loads(Path(config_path).read_text())
    for item in overrides:
        config_module.apply_override(raw, item)
    raw.pop("sweep", None)  # each run's config.toml describes that run alone
    if param is not None:
        key, values = parse_param(param)
    elif base.sweep is not None:
        key, values = base.sweep.param, list(base.sweep.values)
    else:
        raise ConfigError("--param: required (e.g. --param mdp.tau=0.1,0.2,0.5) when the config has no [sweep] table")
    if kinds is not None:
        kind_list = parse_kinds(kinds)
    elif base.sweep is not None and base.sweep.kinds:
        kind_list = list(base.sweep.kinds)
        unknown = [k for k in kind_list if k not in flows.KINDS]
        if unknown:
            raise ConfigError(f"sweep.kinds: unknown flow kind {unknown[0]!r} (allowed: {', '.join(flows.KINDS)})")
    else:
        kind_list = [base.flow.kind]
    if key == "flow.kind":
        raise ConfigError(f"--param {key}: cannot be swept (use --kinds for the flow kind)")
    out = Path(out) if out is not None else Path("runs") / Path(config_path).stem
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    tasks = []
    for kind in kind_list:
        for value in values:
            run_raw = copy.deepcopy(raw)
            config_module.apply_override(run_raw, f"flow.kind={kind}")
            config_module.apply_override(run_raw, f"{key}={value_label(value)}")
            cfg = config_module.from_dict(run_raw)
            runner.state_grid(cfg, models.build(cfg.mdp.model, cfg.mdp.params))
            run_dir = f"{kind}/{key}={value_label(value)}"
            tasks.append(Task(kind, key, value, run_raw, out / run_dir, run_dir, force))
    if not force:
        outputs.refuse_existing(out, [(task.run_dir, task.out) for task in tasks], ("sweep.csv", "sweep.png"))
    return Plan(param=key, values=values, kinds=kind_list, out=out, tasks=tasks)


def execute_task(task: Task) -> dict:
    """Run one grid point (in a worker process) and return its ``sweep.csv`` row."""
    from .runner import execute

    row = {"kind": task.kind, "param": task.param, "value": task.value, "run_dir": task.run_dir}
    start = time.perf_counter()
    try:
        summary = execute(config_module.from_dict(task.raw), task.out, task.force)
    except (ConfigError, ConvergenceError) as exc:
        return row | {"status": "error", "message": str(exc), "wall_time_s": time.perf_counter() - start}
    return row | {"status": summary["status"], "message": summary["message"], "measured_rate": summary["rate"],
                  "rate_r2": summary["rate_r2"], "predicted_rate": summary["predicted_rate"],
                  "steps": summary["steps"], "t_final": summary["t_final"], "wall_time_s": summary["wall_time_s"]} \
        | {key: summary.get(key) for key in SUMMARY_COLUMNS}


def run(sweep: Plan, jobs: int | None = None, on_done: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Run every task of ``sweep`` in a process pool (:func:`solver.pool.run_all`); return the rows in grid order.

    On KeyboardInterrupt the workers are terminated and joined, the rows finished so far (others
    ``interrupted``) are written to ``sweep.csv`` and the interrupt re-raised.
    """
    rows: list[dict | None] = [None] * len(sweep.tasks)
    try:
        pool.run_all(execute_task, [(task,) for task in sweep.tasks], rows, jobs, on_done)
    except KeyboardInterrupt:
        write_csv(sweep.out, [row if row is not None else _interrupted(task) for row, task in zip(rows, sweep.tasks)])
        raise
    return rows


def _interrupted(task: Task) -> dict:
    return {"kind": task.kind, "param": task.param, "value": task.value, "status": "interrupted",
            "run_dir": task.run_dir}


def write_csv(out: Path, rows: list[dict]) -> Path:
    """``out/sweep.csv`` with :data:`SWEEP_COLUMNS` (floats in full precision, missing values empty)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sweep.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SWEEP_COLUMNS)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else _cell(row[c]) for c in SWEEP_COLUMNS])
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def read_csv(out: Path) -> list[dict]:
    """The rows of ``out/sweep.csv``: numbers as floats (``steps`` as int, ``monotone`` as bool), empty cells as None.

    Columns a file lacks (an older ``sweep.csv``) are None.
    """
    with open(Path(out) / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for c in NUMERIC_COLUMNS:
            row[c] = float(row[c]) if row.get(c) not in ("", None) else None
        row["steps"] = int(row["steps"]) if row.get("steps") not in ("", None) else None
        row["monotone"] = {"True": True, "False": False}.get(row.get("monotone"))
        for c in ("rate_status", "certified_status", "rate_verdict"):
            row[c] = row.get(c) or None
    return rows


def _fmt(x, spec=".5g") -> str:
    return "n/a" if x is None else format(x, spec)


def _line(sweep: Plan, row: dict) -> str:
    return (f"{row['kind']} {sweep.param}={value_label(row['value'])}: {row['status']}, rate "
            f"{_fmt(row.get('measured_rate'))} (predicted {_fmt(row.get('predicted_rate'))}), "
            f"{_fmt(row.get('wall_time_s'), '.1f')} s")


def command(args) -> int:
    """``wpgflow sweep``: plan, run, write ``sweep.csv`` and ``sweep.png``; 1 if any run failed, else 0."""
    sweep = plan(args.config, args.param, args.kinds, args.overrides, args.out, args.force)
    workers = pool.workers_for(args.jobs, len(sweep.tasks))
    start = time.perf_counter()
    done = 0

    def report(i: int, row: dict) -> None:
        nonlocal done
        done += 1
        if row["status"] not in OK_STATUSES:
            print(f"wpgflow: {row['run_dir']}: {row['status']}: {row.get('message', '')}", file=sys.stderr)
        if not args.quiet:
            print(f"[{done}/{len(sweep.tasks)}] {_line(sweep, row)}", flush=True)

    if not args.quiet:
        print(f"sweep {sweep.param} over {len(sweep.values)} values x {len(sweep.kinds)} kinds = "
              f"{len(sweep.tasks)} runs on {workers} worker processes", flush=True)
    rows = run(sweep, args.jobs, report)
    write_csv(sweep.out, rows)
    from .plots import plot_sweep

    plot_sweep(sweep.out, read_csv(sweep.out))
    if not args.quiet:
        print(f"wrote {sweep.out}/sweep.csv and {sweep.out}/sweep.png (wall {time.perf_counter() - start:.1f} s)")
    return 0 if all(row["status"] in OK_STATUSES for row in rows) else 1
