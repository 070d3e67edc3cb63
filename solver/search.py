"""``wpgflow search CONFIG --vary KEY=LO:HI ... --objective rate|margin|regularity``: a counterexample search.

A derivative-free optimiser over model (or any numeric config) parameters looks for the MDP where a hypothesis
of the convergence theory is weakest (theory.md §5):

* ``rate`` (cheap, no flow): soft policy iteration and the per-state generator gaps at ``Q*``
  (:func:`solver.diagnostics.generator_gaps`); the objective is the continuous-time asymptotic rate
  ``2 ell_min`` (theory.md §5.3(e)), minimised in ``log``;
* ``margin`` (a short flow with the local-rate check, :class:`solver.along_flow.LocalRates`): the certified
  margin ``min_t r(t) / bound(t)`` (summary key ``certified_margin``), minimised; below 1 the certified bound
  would be broken (a bug or a discovery);
* ``regularity`` (a short flow with the ledger, :class:`solver.ledger.Ledger`): the worst ``sup_s sup_a
  |Hess_a Q^{pi_t}|`` over the snapshots, maximised.

The optimiser is :func:`scipy.optimize.differential_evolution` (seeded, ``2/3`` of the budget) followed by a bounded
Nelder-Mead polish from its best point (the rest), both with the evaluations mapped over at most
``min(--jobs, cores)`` worker processes. Every evaluation is a row of ``search.csv``. The best point is then
confirmed: a full run of that configuration (``DIR/best/``, a normal run directory) and a refinement check (the
objective again with ``actions.cells x 2``); ``search.json`` holds the result, ``best.toml`` the configuration
(ready to run: ``wpgflow run DIR/best.toml``) and ``search.png`` the objective over the evaluations.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import multiprocessing
import os
import tomllib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from . import config as config_module, diagnostics, ledger, runner
from .config import ConfigError

OBJECTIVES = ("rate", "margin", "regularity")

#: An objective that cannot be evaluated at a point (soft policy iteration fails, the flow fails) counts as this
#: (minimised: never the best).
FAILED = 1e300


def parse_vary(items: list[str]) -> list[tuple[str, float, float]]:
    """``["mdp.tau=0.1:0.3", ...]`` -> ``[("mdp.tau", 0.1, 0.3), ...]``; ConfigError naming the bad item."""
    out = []
    for item in items:
        key, sep, rng = item.partition("=")
        lo, colon, hi = rng.partition(":")
        try:
            lo_f, hi_f = float(lo), float(hi)
        except ValueError:
            lo_f = hi_f = math.nan
        if not sep or not colon or not key.strip() or not (math.isfinite(lo_f) and math.isfinite(hi_f) and lo_f < hi_f):
            raise ConfigError(f"--vary {item!r}: expected KEY=LO:HI with finite numbers LO < HI, e.g. mdp.tau=0.1:0.3")
        out.append((key.strip(), lo_f, hi_f))
    if not out:
        raise ConfigError("--vary: at least one KEY=LO:HI is needed")
    if len({k for k, _, _ in out}) != len(out):
        raise ConfigError("--vary: each key may be varied once")
    return out


def with_values(raw: dict, keys: list[str], values) -> dict:
    """A copy of the raw config dict with the dotted ``keys`` set to ``values`` (floats)."""
    raw = copy.deepcopy(raw)
    for key, value in zip(keys, values):
        config_module.apply_override(raw, f"{key}={float(value)!r}")
    return raw


def evaluate(raw: dict, objective: str) -> dict:
    """The objective (minimised) at one raw config, with what it is made of; never raises for bad points."""
    try:
        cfg = config_module.from_dict(raw)
        problem = runner.build(cfg)
        mdp = problem.mdp
        if objective == "rate":
            ell = diagnostics.generator_gaps(mdp, problem.optimum.Q, cfg.flow.scheme)
            rate = 2.0 * float(ell.min())
            return {"objective": math.log(rate) if rate > 0 else -FAILED, "value": rate, "status": "ok"}
        from .along_flow import LocalRates
        from .observers import Schedule

        if objective == "regularity":  # the ledger of a run of the config: the worst sup |Hess_a Q^{pi_t}|
            led = ledger.Ledger(problem, Schedule(cfg.output.snapshots, cfg.flow.dt, cfg.flow.t_end))
            result = runner.run(problem, [led])
            d2 = ledger.worst(led.rows)["d2Q_abs"]["value"] if led.rows and result.status != "failed" else math.nan
            if not math.isfinite(d2):
                return {"objective": FAILED, "value": math.nan, "status": f"no ledger ({result.status})"}
            return {"objective": -d2, "value": d2, "status": "ok"}

        observer = LocalRates(problem, schedule=Schedule(cfg.output.snapshots, cfg.flow.dt, cfg.flow.t_end))
        result = runner.run(problem, [observer])
        margin = observer.summary()["certified_margin"] if result.status != "failed" else None
        if margin is None:
            return {"objective": FAILED, "value": math.nan, "status": f"no margin ({result.status})"}
        return {"objective": float(margin), "value": float(margin), "status": "ok"}
    except ConfigError as exc:
        return {"objective": FAILED, "value": math.nan, "status": f"refused: {str(exc)[:120]}"}
    except Exception as exc:  # noqa: BLE001 - a point where the model breaks is a data point, not a crash
        return {"objective": FAILED, "value": math.nan, "status": f"failed: {type(exc).__name__}"}


class Objective:
    """Picklable ``x -> objective`` for the optimiser (evaluated in worker processes)."""

    def __init__(self, raw: dict, keys: list[str], objective: str):
        self.raw, self.keys, self.objective = raw, keys, objective

    def __call__(self, x) -> dict:
        return evaluate(with_values(self.raw, self.keys, x), self.objective)


class Recorder:
    """The map the optimisers call (``workers=``): evaluates in the pool (or here) and keeps every row."""

    def __init__(self, fn: Objective, pool=None):
        self.fn, self.pool = fn, pool
        self.rows: list[dict] = []

    def __call__(self, func, xs):
        xs = [np.asarray(x, float) for x in xs]
        results = list(self.pool.map(self.fn, xs)) if self.pool is not None else [self.fn(x) for x in xs]
        for x, r in zip(xs, results):
            self.rows.append({"evaluation": len(self.rows)} | dict(zip(self.fn.keys, map(float, x))) | r)
        return [r["objective"] for r in results]


def _cost(x):  # never called: the Recorder evaluates (differential_evolution needs a callable)
    raise AssertionError


def search(raw: dict, vary: list[tuple[str, float, float]], objective: str, budget: int = 40, jobs: int | None = 1,
           seed: int = 0) -> tuple[dict, list[dict]]:
    """Run the optimisers; return ``(best row, every row)`` (rows: the varied values, ``objective``, ``value``)."""
    from scipy.optimize import differential_evolution, minimize

    keys = [k for k, _, _ in vary]
    bounds = [(lo, hi) for _, lo, hi in vary]
    cores = os.cpu_count() or 1
    workers = max(1, min(jobs or cores, cores))
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    try:
        rec = Recorder(Objective(raw, keys, objective), pool)
        d = len(keys)
        popsize = 4  # members per dimension
        de_budget = max(2 * popsize * d, (2 * budget) // 3)
        maxiter = max(1, de_budget // (popsize * d) - 1)
        differential_evolution(_cost, bounds, maxiter=maxiter, popsize=popsize, seed=seed, polish=False,
                               init="latinhypercube", workers=rec, updating="deferred", tol=0.0)
        best = min(rec.rows, key=lambda r: r["objective"])
        left = budget - len(rec.rows)
        if left > d + 1:
            x0 = np.array([best[k] for k in keys])
            minimize(lambda x: rec(None, [np.clip(x, *np.array(bounds).T)])[0], x0, method="Nelder-Mead",
                     bounds=bounds, options={"maxfev": left, "xatol": 1e-4 * float(np.min(np.ptp(bounds, axis=1))),
                                             "fatol": 1e-6})
    finally:
        if pool is not None:
            pool.shutdown()
    best = min(rec.rows, key=lambda r: r["objective"])
    return best, rec.rows


def confirm(raw: dict, keys: list[str], best: dict, objective: str, out: Path) -> dict:
    """A full run of the best configuration (``out / "best"``) and the refinement check (``actions.cells x 2``)."""
    point = with_values(raw, keys, [best[k] for k in keys])
    cfg = config_module.from_dict(point)
    summary, _ = runner.run_and_write(cfg, out / "best", force=True)
    fine = copy.deepcopy(point)
    cells = fine["actions"].get("cells", 256)
    fine["actions"]["cells"] = [2 * c for c in cells] if isinstance(cells, list) else 2 * int(cells)
    refined = evaluate(fine, objective)
    change = abs(refined["value"] - best["value"]) / abs(best["value"]) if best["value"] else math.nan
    return {"run_dir": str(out / "best"), "status": summary.get("status"), "rate": summary.get("rate"),
            "predicted_rate": summary.get("predicted_rate"), "certified_margin": summary.get("certified_margin"),
            "certified_status": summary.get("certified_status"),
            "ledger_bounds_hold": summary.get("ledger_bounds_hold"),
            "refined_value": refined["value"], "refinement_change": change,
            "refinement_verdict": "resolved" if change <= 0.02 else "mesh-sensitive"}


def write_csv(path: Path, rows: list[dict], keys: list[str], objective: str) -> None:
    columns = ["evaluation", *keys, "objective_name", "objective", "value", "status"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([r["evaluation"], *(repr(r[k]) for k in keys), objective, repr(float(r["objective"])),
                        repr(float(r["value"])), r["status"]])


def command(args) -> int:
    """``wpgflow search`` (module docstring)."""
    from .plots import plot_search

    vary = parse_vary(args.vary)
    if args.budget < 4:
        raise ConfigError(f"--budget: must be at least 4 evaluations (got {args.budget})")
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs: must be at least 1 (got {args.jobs})")
    try:
        raw = tomllib.loads(Path(args.config).read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{args.config}: cannot read the config ({type(exc).__name__})") from None
    for item in args.overrides:
        config_module.apply_override(raw, item)
    keys = [k for k, _, _ in vary]
    # both corners must be valid configs (the keys exist and take numbers): refused here, before anything is written
    config_module.from_dict(with_values(raw, keys, [hi for _, _, hi in vary]))
    config_module.from_dict(with_values(raw, keys, [lo for _, lo, _ in vary]))
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}_search"
    if (out / "search.csv").exists() and not args.force:
        raise ConfigError(f"--out {out}: a search is already there (use --force to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    best, rows = search(raw, vary, args.objective, args.budget, args.jobs)
    write_csv(out / "search.csv", rows, keys, args.objective)
    point = with_values(raw, keys, [best[k] for k in keys])
    (out / "best.toml").write_text(config_module.to_toml(point))
    result = {"objective": args.objective, "vary": {k: [lo, hi] for k, lo, hi in vary}, "evaluations": len(rows),
              "best": {k: best[k] for k in keys}, "best_value": best["value"], "best_status": best["status"]}
    if best["status"] == "ok":
        result["confirm"] = confirm(raw, keys, best, args.objective, out)
    (out / "search.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    plot_search(out)
    what = {"rate": "slowest rate 2 ell_min", "margin": "worst certified margin",
            "regularity": "largest sup|Hess_a Q^pi_t|"}[args.objective]
    print(f"search over {', '.join(f'{k} in [{lo:g}, {hi:g}]' for k, lo, hi in vary)}: {len(rows)} evaluations")
    print(f"  {what}: {best['value']:.6g} at " + ", ".join(f"{k} = {best[k]:.6g}" for k in keys))
    c = result.get("confirm")
    if c:
        print(f"  confirmed by a full run ({c['run_dir']}, {c['status']}): fitted rate {c['rate']}, predicted "
              f"{c['predicted_rate']}, certified margin {c['certified_margin']} ({c['certified_status']})")
        print(f"  refinement (actions.cells x 2): {c['refined_value']:.6g} ({c['refinement_change']:.2%} change, "
              f"{c['refinement_verdict']})")
        if args.objective == "margin" and c["certified_margin"] is not None and c["certified_margin"] < 1:
            print("  THE CERTIFIED BOUND IS BROKEN here: a bug or a discovery (see the refinement above)")
    print(f"  results in {out}/ (search.csv, search.json, best.toml, search.png)")
    return 0
