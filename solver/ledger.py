"""The hypothesis ledger: the regularity the convergence theorems assume, measured along a run (``hypotheses.csv``).

:class:`Ledger` is an :class:`~solver.observers.Observer` on the snapshot :class:`~solver.observers.Schedule` (as
:class:`solver.along_flow.LocalRates`). At every snapshot and state it records (:mod:`solver.regularity`):

* the regularity of ``Q^{pi_t}(s, .)``: ``dQ_sup = sup_a |d_a Q|``, ``d2Q_min`` / ``d2Q_max`` (extreme Hessian
  eigenvalues), ``oscQ``, the semiconvexity constant ``min_a lambda_min(Hess_a(-Q / tau + U))`` (theory.md §5.4,
  Bakry-Emery), and ``dtQ_sup = sup_a |d_t Q|`` by the backward difference between this snapshot and the
  previous one, ``(Q(t_k) - Q(t_{k-1})) / (t_k - t_{k-1})`` (NaN at the first snapshot; a first-order estimate of
  the derivative at the midpoint of the interval, exact in the mean over it);
* the regularity of the solution: ``fisher_info = 4 ||grad sqrt p_t||^2``, ``grad_log_p_sup``, ``rel_fisher =
  I(p_t | G_t) = D_t / tau^2``, ``ratio_min`` / ``ratio_max`` of ``p_t / G_t`` and ``p_min`` / ``p_max``;
* the a-priori bounds (theory.md §10.3, §5.4) beside the quantities that have one: ``dQ_bound``, ``d2Q_bound``
  (on ``max(|d2Q_min|, |d2Q_max|)``), ``oscQ_bound``, and ``lsi_hs``, the Holley-Stroock lower bound
  ``C_LSI(mu) exp(-oscQ / tau)`` of the LSI constant of the Gibbs policy (1D actions).

:meth:`Ledger.summary` gives the worst values and one verdict row per hypothesis of theory.md §5
(:func:`verdicts`): *holds*, *holds with bound B* or *fails at t, s*.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from . import bellman, budget, regularity
from .config import ConfigError
from .mdp import GaussianGridKernel
from .observers import Observer, Schedule
from .outputs import atomic_file
from .parallel import Partition

#: Columns of ``hypotheses.csv``, one row per snapshot and state.
COLUMNS = ("t", "state", "dQ_sup", "dQ_bound", "d2Q_min", "d2Q_max", "d2Q_bound", "oscQ", "oscQ_bound",
           "semiconvexity", "dtQ_sup", "fisher_info", "rel_fisher", "grad_log_p_sup", "ratio_min", "ratio_max",
           "p_min", "p_max", "lsi_hs")

#: Measured-over-bound slack: the quantities are mean-value forms of the continuum derivatives (exact up to
#: round-off), the bounds' sups are over nodes and midpoints and use central differences of ``r`` and ``f``
#: (relative error ~1e-8): a bound counts as violated only beyond this relative margin.
BOUND_SLACK = 1e-6

#: Gaps below this times ``max(1, |J*|)`` are not used for the PL ratio (round-off in ``J* - J``, theory.md §8.6).
GAP_FLOOR = 1e-9

#: Pairs (measured column, bound column) checked by :func:`violations`; ``d2Q`` is checked on both extremes.
CHECKED = (("dQ_sup", "dQ_bound"), ("d2Q_max", "d2Q_bound"), ("d2Q_min", "d2Q_bound"), ("oscQ", "oscQ_bound"))


def state_quantities(mdp, Q: np.ndarray, p: np.ndarray, fits=None) -> dict[str, np.ndarray]:
    """The measured per-state columns (all but ``t``, ``state``, the bounds and ``dtQ_sup``) of ``Q``, ``p (N, M)``."""
    d = regularity.derivatives(mdp.space, Q, fits)
    semi = regularity.semiconvexity(mdp.space, Q, mdp.tau, mdp.log_mu, fits)
    log_g = bellman.log_gibbs(mdp, Q)[0]
    with np.errstate(divide="ignore"):
        log_p = np.log(p)
    mass = regularity.cell_masses(mdp.space, log_p)  # shared by I(p) and I(p | G)
    fisher, grad_sup = regularity.log_linear_fisher(mdp.space, log_p, mass=mass)
    rel, _ = regularity.log_linear_fisher(mdp.space, log_p, log_g, mass=mass)
    with np.errstate(over="ignore", invalid="ignore"):
        ratio = np.exp(log_p - log_g)
    return {"dQ_sup": d.grad_sup, "d2Q_min": d.hess_min, "d2Q_max": d.hess_max, "oscQ": d.osc,
            "semiconvexity": semi, "fisher_info": fisher, "rel_fisher": rel, "grad_log_p_sup": grad_sup,
            "ratio_min": ratio.min(axis=1), "ratio_max": ratio.max(axis=1), "p_min": p.min(axis=1),
            "p_max": p.max(axis=1), "lsi_hs": regularity.holley_stroock(mdp.space, d.osc, mdp.tau)}


class Ledger(Observer):
    """The ledger of the module docstring; :meth:`finish` writes ``hypotheses.csv`` into ``out`` (if given).

    Under MPI over states it is *collective* (as :class:`solver.along_flow.LocalRates`): every rank measures its own
    states (``partition.rows``) and the rows of a snapshot are gathered onto every rank, so that the regularity of
    the policies is not one rank's work while the others wait (~8% of a 41 x 41-state run's loop on one rank).

    Args:
        problem: a built :class:`solver.runner.Problem`.
        schedule: when to record (default: every flow state).
        out: run directory, or None (the ranks other than 0 write nothing).
        peers: the run's other observers; a :class:`solver.along_flow.LocalRates` among them supplies the
            certified entropy-production constants along the flow for the LSI verdict.
        partition: the MPI partition of the states (default: serial).
    """

    collective = True

    def __init__(self, problem, schedule: Schedule | None = None, out: Path | None = None, peers=(),
                 partition: Partition | None = None):
        self.problem, self.schedule, self.out, self.peers = problem, schedule, out, peers
        self.partition = Partition(None, problem.mdp.n_states) if partition is None else partition
        self.rows: list[dict] = []
        self._blocks: list[np.ndarray] = []  # the rows as arrays (n_states, len(COLUMNS)) per snapshot, for checkpoints
        self.history: list[dict] = []
        self.bounds = None
        self._V_initial = None
        space = problem.mdp.space
        # what is constant over the run is computed here, before the time loop (runner: setup, not time_per_step_s):
        # the 2D patch fits of the mesh, and the a-priori bounds at osc V = 0, whose parts give the bounds at the
        # osc V of the first state exactly (regularity.Bounds.at, the same arithmetic as regularity.apriori_bounds)
        self._fits = regularity.patch_fits(space.coords, space.edges) if space.dim == 2 else None
        V_star = problem.optimum.V
        self._base = regularity.apriori_bounds(problem.model, problem.mdp, V_star, np.full_like(V_star, V_star.max()),
                                               isinstance(problem.mdp.kernel, GaussianGridKernel))
        self._previous = None  # (t, Q of this rank's states) of the last recorded snapshot
        self._last_t = None

    def observe(self, row: dict, state) -> None:
        self.history.append({"t": row["t"], "gap": row["gap"], "dissipation": row["dissipation"]})
        if self.bounds is None:  # the first state is the initial policy: V^{pi_0} fixes the a-priori bounds
            self._set_bounds(state.evaluation.V.copy())
        if self.schedule is None or self.schedule.due(state.t):
            self.record(state.t, state.evaluation.own_Q, state.own_p, state.evaluation.V)

    def finish(self, result) -> None:
        state = result.final
        if state is not None and self.bounds is not None and (self._last_t is None or self._last_t < state.t):
            self.record(state.t, state.evaluation.own_Q, state.own_p, state.evaluation.V)
        if self.out is not None and self.rows and self.partition.root:
            write(Path(self.out) / "hypotheses.csv", self.rows)

    def _set_bounds(self, V_initial: np.ndarray) -> None:
        """The a-priori bounds with ``osc V <= max V* - min V^{pi_0}`` (:func:`solver.regularity.apriori_bounds`)."""
        p = self.problem
        self._V_initial = V_initial
        osc_V = float(np.max(p.optimum.V) - np.min(V_initial))
        if osc_V > self._base.osc_V:
            self.bounds = self._base.at(osc_V)
        else:  # pi_0 optimal to round-off
            self.bounds = regularity.apriori_bounds(p.model, p.mdp, p.optimum.V, V_initial,
                                                    isinstance(p.mdp.kernel, GaussianGridKernel))

    def checkpoint_state(self) -> dict:
        """Arrays of what the ledger carries (its rows, the history ratios, the bounds, the last snapshot's ``Q``)
        for a checkpoint; :meth:`restore_state` inverts it, so a resumed run writes the same ``hypotheses.csv``.
        Collective under MPI (``Q`` is gathered from the ranks' states)."""
        rows = np.concatenate(self._blocks) if self._blocks else np.zeros((0, len(COLUMNS)))
        data = {"rows": rows,
                "history": np.array([[h["t"], h["gap"], h["dissipation"]] for h in self.history],
                                    float).reshape(-1, 3)}
        if self._V_initial is not None:
            data["V_initial"] = self._V_initial
        if self._previous is not None:
            data |= {"previous_t": np.array(self._previous[0]), "previous_Q": self.partition.gather(self._previous[1])}
        return data

    def restore_state(self, data: dict) -> None:
        """Inverse of :meth:`checkpoint_state`."""
        block = np.asarray(data["rows"], float).reshape(-1, len(COLUMNS))
        self._blocks = [block] if block.size else []
        self.rows = [{c: (int(v) if c == "state" else float(v)) for c, v in zip(COLUMNS, row)} for row in block]
        self.history = [{"t": float(t), "gap": float(g), "dissipation": float(d)}
                        for t, g, d in np.asarray(data["history"]).reshape(-1, 3)]
        if "V_initial" in data:
            self._set_bounds(np.asarray(data["V_initial"], float))
        if "previous_Q" in data:
            self._previous = (float(data["previous_t"]), np.asarray(data["previous_Q"], float)[self.partition.rows])
            self._last_t = self._previous[0]

    def record(self, t: float, Q: np.ndarray, p: np.ndarray, V: np.ndarray | None = None) -> None:
        """Add the rows (one per state) of one snapshot of ``Q`` and ``p`` (this rank's rows under MPI, every
        state when serial). If ``V = V^{pi_t}`` fell below ``min V^{pi_0}`` (a flow
        that is not monotone, e.g. particles) or above ``max V*``, the bounds use ``osc V`` widened to include it:
        they still bound the measured values, but are then not a-priori. Collective under MPI: each rank measures
        its own states, the block of rows is gathered."""
        mdp, own = self.problem.mdp, self.partition.rows
        n_own = Q.shape[0]
        # in chunks of states: about 30 policy-sized temporaries per state (the 2D Hessians), kept below the
        # solve-chunk budget, so the ledger adds no (N, M) peak to a run's memory (solver.budget)
        parts = [state_quantities(mdp, Q[rows], p[rows], self._fits)
                 for rows in budget.chunks(n_own, 8 * 30 * mdp.n_actions)]
        q = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
        dtq = np.full(n_own, math.nan)
        if self._previous is not None and t > self._previous[0]:
            for rows in budget.chunks(n_own, 8 * 2 * mdp.n_actions):
                dtq[rows] = np.abs(Q[rows] - self._previous[1][rows]).max(axis=1) / (t - self._previous[0])
        self._previous = (t, Q.copy())
        self._last_t = t
        b = self.bounds
        if V is not None and b is not None:
            V_star = self.problem.optimum.V
            osc_V = max(float(V_star.max()), float(V.max())) - min(float(V.min()), float(V_star.max()) - b.osc_V)
            b = b.at(osc_V)
        n = mdp.n_states
        bounds = {"dQ_bound": b.dQ, "d2Q_bound": b.d2Q, "oscQ_bound": b.oscQ}
        columns = q | {"t": np.full(n_own, float(t)), "state": np.arange(n, dtype=float)[own], "dtQ_sup": dtq} | {
            key: np.broadcast_to(np.asarray(value, float), (n,))[own] for key, value in bounds.items()}
        block = self.partition.gather(np.column_stack([np.broadcast_to(np.asarray(columns[c], float), (n_own,))
                                                       for c in COLUMNS]))
        self._blocks.append(block)
        for values in block.tolist():  # Python floats, as float(v[i]) gave
            row = dict(zip(COLUMNS, values))
            row["state"] = int(row["state"])
            self.rows.append(row)

    def summary(self) -> dict:
        """``hypotheses`` (the verdict rows of :func:`verdicts`), ``ledger_worst`` and ``ledger_bounds_hold``."""
        if not self.rows:
            return {"hypotheses": [], "ledger_worst": {}, "ledger_bounds_hold": None}
        certified = None
        for peer in self.peers:
            if hasattr(peer, "result") and getattr(peer, "rows", None):
                along = peer.result()
                certified = (float(np.min(along.C_h_lo)), float(along.t[int(np.argmin(along.C_h_lo))]))
        J_star = self.problem.J_star
        return {"hypotheses": verdicts(self.rows, self.history, certified, J_star), "ledger_worst": worst(self.rows),
                "ledger_bounds_hold": not violations(self.rows)}


def write(path: Path, rows: list[dict]) -> None:
    """``hypotheses.csv`` (columns :data:`COLUMNS`), written whole and renamed (crash safety as the other files)."""
    with atomic_file(Path(path), binary=False) as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([str(r[c]) if c == "state" else repr(float(r[c])) for c in COLUMNS])


def read(path: Path) -> list[dict]:
    """The rows of a ``hypotheses.csv`` (``state`` an int, the rest floats)."""
    with open(path, newline="") as f:
        return [{k: int(v) if k == "state" else float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def violations(rows: list[dict]) -> list[tuple[str, float, int, float, float]]:
    """Every ``(quantity, t, state, measured, bound)`` where a measured value exceeds its a-priori bound (beyond
    :data:`BOUND_SLACK`); ``d2Q_min`` / ``d2Q_max`` are checked in absolute value against ``d2Q_bound``."""
    out = []
    for r in rows:
        for q, b in CHECKED:
            m, bound = abs(r[q]), r[b]
            if math.isfinite(bound) and math.isfinite(m) and m > bound * (1 + BOUND_SLACK) + 1e-12:
                out.append((q, r["t"], r["state"], m, bound))
    return out


def _extreme(rows: list[dict], key: str, largest: bool = True, absolute: bool = False) -> tuple[float, float, int]:
    """``(value, t, state)`` of the largest (smallest) finite ``key`` over the rows; NaN if there is none."""
    best = (math.nan, math.nan, -1)
    for r in rows:
        v = abs(r[key]) if absolute else r[key]
        if not math.isfinite(v) and not (largest and v == math.inf):
            continue
        if best[2] < 0 or (v > best[0] if largest else v < best[0]):
            best = (v, r["t"], r["state"])
    return best


def worst(rows: list[dict]) -> dict:
    """The worst value of every quantity over the run: the largest norms, the smallest semiconvexity, ratio and
    Holley-Stroock constant; each ``{"value", "t", "state"}``."""
    spec = {"dQ_sup": (True, False), "d2Q_max": (True, True), "d2Q_min": (True, True), "oscQ": (True, False),
            "semiconvexity": (False, False), "dtQ_sup": (True, False), "fisher_info": (True, False),
            "grad_log_p_sup": (True, False), "rel_fisher": (True, False), "ratio_min": (False, False),
            "ratio_max": (True, False), "lsi_hs": (False, False)}
    out = {}
    for key, (largest, absolute) in spec.items():
        v, t, s = _extreme(rows, key, largest, absolute)
        out[key] = {"value": v, "t": t, "state": s}
    out["d2Q_abs"] = max((out["d2Q_max"], out["d2Q_min"]), key=lambda e: e["value"] if math.isfinite(e["value"])
                         else -1.0)
    return out


def _row(hypothesis: str, quantity: str, value: float, t: float, state: int | None, verdict: str,
         bound: float | None = None) -> dict:
    return {"hypothesis": hypothesis, "quantity": quantity, "worst": value, "t": t, "state": state,
            "bound": bound, "verdict": verdict, "refinement": None}


def verdicts(rows: list[dict], history: list[dict], certified: tuple | None, J_star: float,
             summary: dict | None = None) -> list[dict]:
    """One row per hypothesis of theory.md §5 (as the two convergence results state them).

    * ``regular solution``: ``sup |grad log p_t|`` over the run (finite: ``p_t > 0`` with a bounded log-gradient,
      so ``p_t`` is in the weighted Sobolev space the theorem needs); fails where a density vanishes (infinite).
    * ``Q-regularity uniform along iterates``: ``sup |Hess_a Q^{pi_t}|`` against its a-priori bound ``d2Q_bound``
      (a violation is a bug: *fails*); without a bound (no noise) it holds with the measured bound only, which the
      refinement column must confirm.
    * ``uniform LSI of the Gibbs family``: the certified entropy-production constant ``min_t C_h_lo(t)`` of
      ``rates.csv`` if the run has it, else ``summary["lsi_bracket"]["certified_lower"]`` (at ``Q*``), else the
      ledger's Holley-Stroock value ``min lsi_hs``; fails if it underflows to 0.
    * ``PL/dissipation inequality``: ``min (dJ/dt) / (J* - J)`` over the history rows with a gap above
      :data:`GAP_FLOOR` (``dissipation`` is ``dJ/dt``); fails at the first ``t`` where it is not positive.
    """
    out = []
    v, t, s = _extreme(rows, "grad_log_p_sup", True)
    out.append(_row("regular solution", "sup |grad log p_t|", v, t, s,
                    f"fails at t = {t:.4g}, s = {s} (p_t vanishes)" if not math.isfinite(v)
                    else f"holds with bound {v:.4g}"))
    w = worst(rows)["d2Q_abs"]
    bad = [x for x in violations(rows) if x[0].startswith("d2Q")]
    bound = max((r["d2Q_bound"] for r in rows), default=math.nan)
    if bad:
        verdict = f"fails at t = {bad[0][1]:.4g}, s = {bad[0][2]} (above the a-priori bound: a bug)"
    elif math.isfinite(bound):
        verdict = f"holds with bound {bound:.4g}"
    else:
        verdict = f"holds with bound {w['value']:.4g} (measured; no a-priori bound for this kernel)"
    out.append(_row("Q-regularity uniform along iterates", "sup |Hess_a Q|", w["value"], w["t"], w["state"], verdict,
                    bound if math.isfinite(bound) else None))
    if certified is not None:
        value, t_c, s_c, what = certified[0], certified[1], None, "certified entropy-production constant min_t C_h_lo"
    elif summary and (summary.get("lsi_bracket") or {}).get("certified_lower") is not None:
        b = summary["lsi_bracket"]
        value, t_c, s_c, what = b["certified_lower"], math.inf, b.get("certified_state"), "certified_lower at Q*"
    else:
        value, t_c, s_c = _extreme(rows, "lsi_hs", False)
        what = "Holley-Stroock C_LSI(mu) exp(-osc Q / tau)"
    if not math.isfinite(value):
        verdict = "undetermined (no LSI constant: 2D actions without the local-rate check)"
    else:
        verdict = f"holds with bound {value:.4g}" if value > 0 else f"fails at t = {t_c:.4g}, s = {s_c}"
    out.append(_row("uniform LSI of the Gibbs family", what, value, t_c, s_c, verdict))
    floor = GAP_FLOOR * max(1.0, abs(J_star))
    ratios = [(h["dissipation"] / h["gap"], h["t"]) for h in history
              if h["gap"] > floor and math.isfinite(h["dissipation"])]
    if ratios:
        r_min, t_min = min(ratios)
        failing = [t for r, t in ratios if not r > 0]
        verdict = f"fails at t = {failing[0]:.4g}" if failing else f"holds with bound {r_min:.4g}"
    elif not any(math.isfinite(h["dissipation"]) for h in history):
        r_min, t_min, verdict = math.nan, math.nan, "undetermined (this flow kind has no dissipation identity)"
    else:
        r_min, t_min, verdict = math.nan, math.nan, "holds (no gap above the round-off floor)"
    out.append(_row("PL/dissipation inequality", "min (dJ/dt) / (J* - J)", r_min, t_min, None, verdict))
    return out


# --- refinement: worst values at h and h / factor ------------------------------------------------------------------

#: A worst value that changes by less than this (relative) under refinement is *converging*.
CONVERGED = 0.05


def at_optimum(problem) -> dict[str, float]:
    """Worst (over states) ledger quantities of ``Q*`` and ``pi*`` (no flow): ``d2Q_abs``, ``dQ_sup``,
    ``semiconvexity``, ``fisher_info``, ``grad_log_p_sup``."""
    mdp, opt = problem.mdp, problem.optimum
    fits = regularity.patch_fits(mdp.space.coords, mdp.space.edges) if mdp.space.dim == 2 else None
    q = state_quantities(mdp, opt.Q, opt.p, fits)
    return {"d2Q_abs": float(np.max(np.maximum(np.abs(q["d2Q_min"]), np.abs(q["d2Q_max"])))),
            "dQ_sup": float(q["dQ_sup"].max()), "semiconvexity": float(q["semiconvexity"].min()),
            "fisher_info": float(q["fisher_info"].max()), "grad_log_p_sup": float(q["grad_log_p_sup"].max())}


def classify(h: list[float], values: list[float]) -> str:
    """``converging`` or ``growing like h^-p`` for the worst values ``values`` at the steps ``h`` (coarse first).

    Three or more levels: converging when the successive differences shrink (``|x2 - x1| < 0.75 |x1 - x0|``, a
    Cauchy sequence: a sup approached at ``O(h^q)``), else growing with the exponent of the last two levels. Two
    levels: converging when the change is at most :data:`CONVERGED`.
    """
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return "undetermined"
    change = abs(values[-1] - values[-2]) / max(abs(values[-2]), 1e-300)
    p = regularity.power_law(np.array(h[-2:]), np.array(values[-2:]))
    if len(values) >= 3:
        d1, d2 = abs(values[-2] - values[-3]), abs(values[-1] - values[-2])
        if d2 <= 0.75 * d1 or change <= 1e-3:
            return f"converging ({change:.1%} change at the finest step, differences x{d2 / max(d1, 1e-300):.2f})"
        return f"growing like h^{p:.2f}" if p < 0 else f"converging ({change:.1%} change)"
    if change <= CONVERGED:
        return f"converging ({change:.1%} change)"
    return f"growing like h^{p:.2f}" if p < 0 else f"converging ({change:.1%} change)"


def refinement(config, build, factor: int = 2, levels: int = 3) -> dict:
    """The worst ledger quantities at ``Q*`` on the config's action mesh and on ``levels - 1`` refinements
    (``actions.cells x factor`` each), with :func:`classify` per quantity. 1D intervals and rectangles only.
    ``build``: config -> problem (:func:`solver.runner.build`; passed in, so this module does not import the runner).

    Returns:
        ``{"h": [...], "<quantity>": [...], "<quantity>_verdict": str}``.
    """
    from dataclasses import replace

    if config.actions.domain not in ("interval", "rectangle"):
        raise ConfigError(f"--refine: needs an interval or rectangle action domain with actions.cells (got "
                          f"{config.actions.domain!r}: its meshes are refined by actions.resolution)")
    out: dict = {"h": []}
    for k in range(levels):
        a = config.actions
        cells = a.cells * factor ** k if isinstance(a.cells, int) else [c * factor ** k for c in a.cells]
        cfg = replace(config, actions=replace(a, cells=cells))
        problem = build(cfg)
        width = (a.upper - a.lower) if isinstance(a.upper, (int, float)) else max(
            u - l for u, l in zip(a.upper, a.lower))
        out["h"].append(float(width / (cells if isinstance(cells, int) else max(cells))))
        for key, value in at_optimum(problem).items():
            out.setdefault(key, []).append(value)
    for key in list(out):
        if key != "h":
            out[f"{key}_verdict"] = classify(out["h"], out[key])
    return out
