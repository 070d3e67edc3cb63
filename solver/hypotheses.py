"""``wpgflow hypotheses RUN_DIR [--refine]``: the hypothesis ledger of a run (:mod:`solver.ledger`) as a table.

One line per snapshot with the worst value over the states of every quantity beside its a-priori bound, then the
verdict rows of :func:`solver.ledger.verdicts` (re-derived from the files, so the LSI row uses the run's
``rates.csv`` or ``summary.json`` constants). ``--refine`` adds the refinement column: the worst values at ``Q*``
on the action mesh and on the meshes with ``actions.cells x 2`` and ``x 4`` (:func:`solver.ledger.refinement`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from . import config as config_module, ledger, outputs, runner
from .config import ConfigError

#: (column, reduction over states, bound column or None) of the per-snapshot table.
TABLE = (("dQ_sup", max, "dQ_bound"), ("d2Q_abs", max, "d2Q_bound"), ("oscQ", max, "oscQ_bound"),
         ("semiconvexity", min, None), ("fisher_info", max, None), ("ratio_min", min, None),
         ("ratio_max", max, None), ("dtQ_sup", max, None))

#: Which worst value each verdict row's refinement column follows.
REFINED = {"regular solution": "grad_log_p_sup", "Q-regularity uniform along iterates": "d2Q_abs",
           "uniform LSI of the Gibbs family": "semiconvexity", "PL/dissipation inequality": None}


def _value(row: dict, key: str) -> float:
    return max(abs(row["d2Q_min"]), abs(row["d2Q_max"])) if key == "d2Q_abs" else row[key]


def table(rows: list[dict]) -> list[str]:
    """The per-snapshot lines (worst over states; ``measured / bound`` where there is a bound)."""
    times = sorted({r["t"] for r in rows})
    head = "t".rjust(10) + "".join(f"{c if b is None else c + ' / bound':>26}" for c, _, b in TABLE)
    lines = [head]
    for t in times:
        at = [r for r in rows if r["t"] == t]
        cells = []
        for c, reduce, b in TABLE:
            values = [_value(r, c) for r in at if math.isfinite(_value(r, c))]
            v = reduce(values) if values else math.nan
            text = f"{v:.4g}"
            if b is not None:
                text += f" / {max(r[b] for r in at):.4g}"
            cells.append(f"{text:>26}")
        lines.append(f"{t:10.4g}" + "".join(cells))
    return lines


def report(run_dir: Path, refine: bool = False) -> tuple[list[str], list[dict]]:
    """The lines ``wpgflow hypotheses`` prints and the verdict rows."""
    run_dir = Path(run_dir)
    file = run_dir / "hypotheses.csv"
    if not file.exists():
        raise ConfigError(f"{run_dir}: no hypotheses.csv (not a run directory, or a run of an older wpgflow)")
    try:
        rows = ledger.read(file)
        summary = json.loads((run_dir / "summary.json").read_text())
        _, history, _ = outputs.read_run(run_dir)
    except (OSError, ValueError, KeyError, TypeError, csv.Error) as exc:
        raise ConfigError(f"{file}: damaged ({type(exc).__name__})") from None
    if not rows:
        raise ConfigError(f"{file}: damaged (no rows)")
    hist = [{"t": t, "gap": g, "dissipation": d} for t, g, d in zip(history["t"], history["gap"],
                                                                  history["dissipation"])]
    rates = outputs.read_rates(run_dir)
    certified = None
    if rates is not None and "C_h_lo" in rates and len(rates["C_h_lo"]):
        k = int(rates["C_h_lo"].argmin())
        certified = (float(rates["C_h_lo"][k]), float(rates["t"][k]))
    rows_v = ledger.verdicts(rows, hist, certified, float(summary.get("J_star", 0.0)), summary)
    if refine:
        ref = ledger.refinement(config_module.load(run_dir / "config.toml"), runner.build)
        for v in rows_v:
            key = REFINED[v["hypothesis"]]
            if key is not None:
                v["refinement"] = (" -> ".join(f"{x:.4g} (h = {hh:.3g})" for x, hh in zip(ref[key], ref["h"]))
                                   + f": {ref[key + '_verdict']}")
    lines = [f"hypothesis ledger of {run_dir} ({len({r['state'] for r in rows})} states x "
             f"{len({r['t'] for r in rows})} snapshots; worst over states)"] + table(rows)
    bad = ledger.violations(rows)
    lines.append(f"a-priori bounds: {'all hold' if not bad else f'{len(bad)} VIOLATED (a bug), first {bad[0]}'}")
    lines.append("")
    for v in rows_v:
        worst = v["worst"]
        where = "" if v["t"] is None or not math.isfinite(v["t"]) else f" at t = {v['t']:.4g}"
        where += "" if v["state"] is None or v["state"] < 0 else f", s = {v['state']}"
        lines.append(f"{v['hypothesis']}: {v['quantity']} = {worst:.4g}{where} -> {v['verdict']}")
        if v["refinement"]:
            lines.append(f"    refinement: {v['refinement']}")
    return lines, rows_v


def command(args) -> int:
    """``wpgflow hypotheses RUN_DIR [--refine]``."""
    lines, _ = report(args.run_dir, args.refine)
    print("\n".join(lines))
    return 0
