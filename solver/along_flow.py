"""The along-flow rate check (theory.md §5.3(c), §10.1) as an observer, ``rates.csv``, and the LSI reports of a run.

:class:`LocalRates` takes at the times of its :class:`~solver.observers.Schedule` (and at the last state) the local
rate ``r = (dJ/dt) / (J* - J)`` with ``dJ/dt = rho^T (I - gamma P^pi)^{-1} D^h`` and the mismatch
``kappa = max_s d*_rho(s) / d^pi_rho(s)``, and checks two bounds:

* **certified** (the reported check, theory.md §10.1): per state, the frozen-``Q^{pi_t}`` SG/EAFE generator
  ``L_s`` is reversible w.r.t. the discrete Gibbs masses ``pi_s`` of ``Q^{pi_t}`` and ``D^h(s) = tau E_s(u, log u)``
  is its entropy production (``u = m / pi_s``). With ``rho_{0,s}`` its entropy-production constant,
  ``dV(s)/dt >= D^h(s) >= tau rho_{0,s} KL = rho_{0,s} Delta_t(s)`` and, as in §5.3(c),
  ``r(t) >= min_s rho_{0,s} / kappa_t`` (the generator includes tau: no factor ``2 tau``). The bound checked is
  ``C_h_lo / kappa_t`` with ``C_h_lo = min_s`` :func:`solver.lsi.mlsi_lower` of ``(ell_s(t), log pi_*,s(t))``,
  ``ell_s`` the generator gap at the current Gibbs policy. It is a theorem about the computed semi-discrete
  system (no continuum limit, no estimated factor), so a violation is a bug.
* **continuum** (separate, labelled): ``2 tau C_lo / kappa_t`` with ``C_lo`` the Bakry-Emery/Holley-Stroock lower
  bound of the Gibbs densities (:func:`solver.lsi.lower_bounds`), minimised over the states where it is
  *informative* (``C_lo,s >= INFORMATIVE * ell_s / tau``, i.e. within 1e-6 of the Poincaré scale): at truncated edge
  states (a concave kink of ``Q`` where the state grid cuts the dynamics) the sup-norm perturbation bounds collapse
  to 1e-20 or below, and those states are listed instead (``vacuous_states``). The continuum constants are those of
  the interpolated density, ``O(h^2)`` away from the discrete ones, and the restriction to informative states is
  not a proof: this check is a comparison, not a certificate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bellman, diagnostics, lsi
from .flows.base import potential
from .flows.fokker_planck import dissipation
from .lsi import LOWER_METHODS, bracket, log_gibbs_row
from .observers import Observer, Schedule
from .outputs import RATES_COLUMNS, write_rates
from .parallel import Partition

#: Gaps below ``GAP_FLOOR * max(1, |J*|)`` are not tested (``holds`` NaN): there the round-off in ``J* - J``
#: (~1e-13 |J|, theory.md §8.6) is no longer small against the gap. Nor are gaps below
#: ``MASS_FLOOR * max|Q| * mass_error / (1 - gamma)``: a policy whose mass is off by ``mass_error`` (round-off of the
#: solves, which grows with ``dt``: 7e-12 per step at ``dt = 1e4`` on a deep double well) moves ``J`` by about
#: ``max|Q| mass_error / (1 - gamma)``, and a gap at that floor says nothing about the rate.
GAP_FLOOR = 1e-9
MASS_FLOOR = 10.0

#: A bound below this fraction of its reference is *uninformative*: the certified bound against the measured rate
#: (``certified_status``), a state's continuum ``C_lo`` against its Poincaré scale ``ell_s / tau``.
INFORMATIVE = 1e-6

#: ``rates.csv`` columns holding booleans (written ``true`` / ``false``; ``nan`` where not tested).
BOOLEAN_COLUMNS = ("certified_holds", "continuum_holds")


@dataclass(frozen=True)
class AlongFlow:
    """The checks at every checked snapshot; arrays of shape ``(K,)`` (columns :data:`RATES_COLUMNS`).

    ``certified_holds`` / ``continuum_holds`` are 1/0, NaN if not tested (gap below :data:`GAP_FLOOR`).
    ``vacuous_states``: the states whose continuum bound was vacuous at some checked snapshot (sorted).
    """

    t: np.ndarray
    local_rate: np.ndarray
    kappa: np.ndarray
    certified_bound: np.ndarray
    certified_holds: np.ndarray
    certified_margin: np.ndarray
    C_h_lo: np.ndarray
    C_lo: np.ndarray
    bound_continuum: np.ndarray
    continuum_holds: np.ndarray
    vacuous_states: tuple

    @property
    def tested(self) -> np.ndarray:
        return np.isfinite(self.certified_holds)

    @property
    def all_hold(self) -> bool | None:
        """The certified bound held at every tested snapshot (None if none was tested)."""
        return bool(np.all(self.certified_holds[self.tested] == 1)) if self.tested.any() else None

    @property
    def all_hold_continuum(self) -> bool | None:
        tested = np.isfinite(self.continuum_holds)
        return bool(np.all(self.continuum_holds[tested] == 1)) if tested.any() else None

    @property
    def status(self) -> str:
        """``violated`` if the certified bound failed once; else ``uninformative`` if no snapshot was tested or the
        bound fell below :data:`INFORMATIVE` times the measured rate at one; else ``holds``."""
        tested = self.tested
        if np.any(self.certified_holds[tested] == 0):
            return "violated"
        if not tested.any() or np.any(self.certified_bound[tested] < INFORMATIVE * self.local_rate[tested]):
            return "uninformative"
        return "holds"

    @property
    def margin(self) -> float | None:
        """``min r / bound`` over the tested snapshots (None if none was tested or the bound was 0)."""
        m = self.certified_margin[self.tested]
        return float(m.min()) if m.size and np.isfinite(m.min()) else None

    def rows(self) -> list[dict]:
        rows = []
        for k in range(self.t.size):
            row = {c: float(getattr(self, c)[k]) for c in RATES_COLUMNS}
            for c in BOOLEAN_COLUMNS:
                if math.isfinite(row[c]):
                    row[c] = bool(row[c])
            rows.append(row)
        return rows


def occupancy(mdp, evaluation: bellman.Evaluation) -> np.ndarray:
    """Discounted occupancy ``d^pi_rho = (1 - gamma) (I - gamma P^pi)^{-T} rho``, ``(N,)``."""
    return (1.0 - mdp.gamma) * evaluation.resolvent_adjoint(mdp.rho)


@dataclass(frozen=True)
class StateConstants:
    """Per-state constants of the Gibbs policies of one ``Q``, arrays ``(N,)``.

    ``ell``: generator gaps; ``log_pi_min``: ``log min_j pi_j``; ``rho_lo``: certified lower bound of the
    entropy-production constant (:func:`solver.lsi.mlsi_lower`); ``C_lo``: continuum LSI lower bound and
    ``method`` its index in :data:`solver.lsi.LOWER_METHODS`; ``informative``: ``C_lo >= INFORMATIVE ell / tau``;
    ``kappa_step``: the best split step per state (-1 where the split was not computed).
    """

    ell: np.ndarray
    log_pi_min: np.ndarray
    rho_lo: np.ndarray
    C_lo: np.ndarray
    method: np.ndarray
    informative: np.ndarray
    kappa_step: np.ndarray


def state_constants(mdp, Q: np.ndarray, scheme: str, ell: np.ndarray | None = None,
                    around: np.ndarray | None = None, g: np.ndarray | None = None,
                    log_pi_min: np.ndarray | None = None) -> StateConstants:
    """:class:`StateConstants` of ``G^Q_s`` at every state (vectorised over states, in chunks).

    The continuum bound takes the best of three families per state (:func:`solver.lsi.lower_bounds`); the
    kappa-convex split costs ``O(P M)`` per state and ``kappa`` and is only needed where it can change the outcome.
    So it is computed (branch and bound) at the states whose cheap bound (quadratic fit, uniform Holley-Stroock)
    is not informative, and then in increasing order of the cheap bound until the cheap bound of the next state
    is above the smallest informative value found: ``C_lo`` is the best of the three families at every state
    where that can decide the minimum or the informative flag, and the cheap bound (a valid lower bound, never
    larger) elsewhere. ``around (N,)``: the previous snapshot's best split steps (``kappa_step``), to try only
    their neighbourhood (:func:`solver.lsi.lower_bounds`); with it, the branch and bound has a middle level: a
    state is first bounded by the split at its previous step alone (one convex minorant instead of three) and
    refined only if that bound is not above the smallest refined value (so about a third of the work along a
    flow, the same minimum). ``g``: the potentials ``potential(mdp, Q)`` if the caller has them (the Gibbs
    log-densities up to a constant per state). ``log_pi_min``: :func:`solver.lsi.log_min_masses` of ``g`` if the
    caller has it (the gap tracker's).
    """
    ell = diagnostics.generator_gaps(mdp, Q, scheme) if ell is None else ell
    g = potential(mdp, Q) if g is None else g
    log_pi_min = lsi.log_min_masses(mdp.space, g) if log_pi_min is None else log_pi_min
    n = Q.shape[0]
    threshold = INFORMATIVE * ell / mdp.tau
    C_lo, method, _ = lsi.many_lower_bounds(mdp.space, g, np.zeros(n))  # cheap families only
    steps = np.full(n, -1)

    def refine(idx):
        warm = np.zeros(idx.size, bool) if around is None else around[idx] >= 0
        for part, centre in ((idx[warm], around[idx[warm]] if warm.any() else None), (idx[~warm], None)):
            if part.size:
                C_lo[part], method[part], steps[part] = lsi.many_lower_bounds(mdp.space, g[part], None, centre)

    refined = C_lo < threshold
    if refined.any():
        refine(np.flatnonzero(refined))
    order = [int(i) for i in np.argsort(C_lo, kind="stable") if not refined[i]]  # ascending cheap bound
    while order:
        done = refined & (C_lo >= threshold)
        best = float(C_lo[done].min()) if done.any() else math.inf  # smallest informative refined value
        if C_lo[order[0]] > best:
            break  # every remaining state's bound is at least its cheap bound > best
        if math.isfinite(best):
            # a middle level, in one pass over every state that can still hold the minimum (cheap <= best): the
            # split at one step alone (the previous best step, else KAPPA_STEPS[1]; one convex minorant instead of
            # three, or eleven) is a lower bound too; only the states where it is not above best are refined,
            # in increasing order of it (the minimum is the same)
            idx = np.array([i for i in order if C_lo[i] <= best])
            centre = np.full(idx.size, -1) if around is None else around[idx]
            mid, mid_method, mid_step = lsi.many_lower_bounds(mdp.space, g[idx], None, centre, offsets=(0,))
            higher = mid > C_lo[idx]
            C_lo[idx[higher]], method[idx[higher]] = mid[higher], mid_method[higher]
            if around is not None:
                steps[idx] = np.where(mid_step >= 0, mid_step, steps[idx])
            queue = idx[np.argsort(mid, kind="stable")]  # ascending middle bound, refined until it exceeds best
            while queue.size:
                done = refined & (C_lo >= threshold)
                best = float(C_lo[done].min()) if done.any() else math.inf
                if C_lo[queue[0]] > best:
                    break
                refine(queue[:8])
                refined[queue[:8]] = True
                queue = queue[8:]
            break  # every other state's cheap bound is above best
        idx = np.array(order[:8])
        order = order[8:]
        refine(idx)
        refined[idx] = True
    return StateConstants(ell=ell, log_pi_min=log_pi_min, rho_lo=lsi.mlsi_lower(ell, log_pi_min), C_lo=C_lo,
                          method=method, informative=C_lo >= threshold, kappa_step=steps)


class LocalRates(Observer):
    """The local-rate checks (module docstring) at the times of ``schedule`` and at the last state of the run;
    :meth:`finish` writes ``rates.csv`` into ``out`` (if given).

    It reuses the flow's own ``Q^pi`` and resolvent while the state is alive: no policy is evaluated again and no
    snapshot policy is kept. Per check: ``dJ/dt = x . D^h`` with ``x = (I - gamma P^pi)^{-T} rho`` (theory.md §4),
    ``kappa = max_s d*(s) / d^pi(s)``, and :func:`state_constants` of ``Q^pi`` (one gap per state, ``log pi_*``, the
    closed-form continuum bounds).

    Under MPI over states (``partition`` of more than one rank) it is *collective*: every rank has one and runs
    the per-state work (gaps, constants, KL, ``D^h``) on its own states; the sums and minima over states are
    reduced over the ranks, so every rank holds the same rows (rank 0 writes ``rates.csv``). The minima are those
    of a serial check: each rank's branch and bound finds its own minimum exactly (:func:`state_constants`).

    Args:
        problem: a built :class:`solver.runner.Problem`.
        scheme: the flow scheme for ``D^h`` and the generator (default: the config's ``flow.scheme``).
        schedule: when to check (default: every flow state).
        out: run directory for ``rates.csv``, or None.
        partition: the MPI partition of the states (default: serial).
    """

    collective = True

    def __init__(self, problem, scheme: str | None = None, schedule: Schedule | None = None,
                 out: Path | None = None, partition: Partition | None = None):
        self.problem = problem
        self.schedule, self.out = schedule, out
        self.partition = Partition(None, problem.mdp.n_states) if partition is None else partition
        self._last_t = None
        self.scheme = problem.config.flow.scheme if scheme is None else scheme
        self.d_star = occupancy(problem.mdp, bellman.evaluate(problem.mdp, problem.optimum.p))
        self.rows: list[tuple] = []
        self.vacuous: set[int] = set()
        self._steps = None  # best kappa-split step per own state at the last check (warm start)
        # certified ell_s, warm-started; on 2D meshes under MPI shared by the ranks (all states, the solves dealt out)
        self.gaps = lsi.GapTracker(problem.mdp.space, problem.mdp.tau, self.scheme, self.partition)

    def needs_full(self, row: dict, state) -> bool:
        """A shared gap tracker (2D meshes under MPI) takes the potentials of every state at a check."""
        return self.gaps.shared and (self.schedule is None or self.schedule.pending(state.t))

    def observe(self, row: dict, state) -> None:
        if self.schedule is None or self.schedule.due(state.t):
            self.check(state)

    def finish(self, result) -> None:
        state = result.final
        if state is not None and (self._last_t is None or self._last_t < state.t):
            self.check(state)
        if self.out is not None and self.rows and self.partition.root:
            write_rates(self.out, self.result())

    def summary(self) -> dict:
        """``certified_status``, ``certified_margin``, ``local_rate_check`` (= the certified check held at every
        tested snapshot), ``local_rate_check_continuum``, ``continuum_vacuous_states``."""
        if not self.rows:
            return {"certified_status": "uninformative", "certified_margin": None, "local_rate_check": None,
                    "local_rate_check_continuum": None, "continuum_vacuous_states": []}
        along = self.result()
        return {"certified_status": along.status, "certified_margin": along.margin,
                "local_rate_check": along.all_hold, "local_rate_check_continuum": along.all_hold_continuum,
                "continuum_vacuous_states": list(along.vacuous_states)}

    def checkpoint_state(self) -> dict:
        """Arrays of what this observer carries from check to check (for a checkpoint): its rows, the vacuous
        states, the last checked time and the warm starts of its per-state solves (the kappa-split steps, the gap
        tracker's gaps or eigenvectors), which change later checks in the last digits. :meth:`restore_state`
        inverts it, so a resumed run writes the same ``rates.csv`` bit for bit."""
        data = {"rows": np.array(self.rows, dtype=float).reshape(len(self.rows), len(RATES_COLUMNS)),
                "vacuous": np.array(sorted(self.vacuous), dtype=np.int64),
                "last_t": np.array(math.nan if self._last_t is None else self._last_t)}
        # collective under MPI: the warm starts are this rank's states (all states, the same on every rank, when the
        # gap tracker is shared)
        gather = self.partition.gather
        tracked = (lambda value: value) if self.gaps.shared else gather
        if self._steps is not None:
            data["steps"] = gather(self._steps).astype(np.int64)
        for name in ("previous", "vectors"):
            value = getattr(self.gaps, name)
            if value is not None:
                data[f"gaps_{name}"] = tracked(value)
        if self.gaps.reference is not None:
            for name, value in zip(("diag", "off", "ell"), self.gaps.reference):
                data[f"gaps_reference_{name}"] = tracked(value)
        return data

    def restore_state(self, data: dict) -> None:
        """Inverse of :meth:`checkpoint_state`."""
        self.rows = [tuple(float(v) for v in row) for row in np.asarray(data["rows"]).reshape(-1, len(RATES_COLUMNS))]
        self.vacuous = {int(i) for i in np.asarray(data["vacuous"]).ravel()}
        last = float(data["last_t"])
        self._last_t = None if math.isnan(last) else last
        own = self.partition.rows
        if "steps" in data:
            self._steps = np.asarray(data["steps"], dtype=int)[own]
        tracked = slice(None) if self.gaps.shared else own  # a shared gap tracker holds every state
        for name in ("previous", "vectors"):
            if f"gaps_{name}" in data:
                setattr(self.gaps, name, np.array(np.asarray(data[f"gaps_{name}"], dtype=float)[tracked]))
        if "gaps_reference_ell" in data:
            self.gaps.reference = tuple(np.array(np.asarray(data[f"gaps_reference_{name}"], dtype=float)[tracked])
                                        for name in ("diag", "off", "ell"))

    def check(self, state) -> None:
        """Add the row of one flow state (its evaluation alive, or re-evaluated if it was released)."""
        mdp, J_star, ev, part = self.problem.mdp, self.problem.J_star, state.evaluation, self.partition
        own = part.rows  # this rank's states (all of them when serial)
        self._last_t = state.t
        if ev.resolvent.released:
            ev = bellman.evaluate(mdp, state.own_p, None if part.serial else part)
        x = ev.resolvent_adjoint(mdp.rho)
        p, g = state.own_p, state.own_g  # g: potential(Q)
        gap = J_star - float(mdp.rho @ ev.V)
        kappa = float(np.max(self.d_star / ((1.0 - mdp.gamma) * x)))
        if self.gaps.shared:  # collective: every state on every rank, the eigen-solves dealt out
            ell, log_pi_min = self.gaps(state.g)[own], self.gaps.log_pi_min[own]
        else:  # the flow's edge rates of this state, if it kept them (the symmetrised generator without logs)
            ell, log_pi_min = self.gaps(g, state.memo.get(("rates", self.scheme))), self.gaps.log_pi_min
        sc = state_constants(mdp, ev.own_Q, self.scheme, ell, self._steps, g, log_pi_min)
        previous = sc.kappa_step if self._steps is None else self._steps
        self._steps = np.where(sc.kappa_step >= 0, sc.kappa_step, previous)
        # Delta_s = tau KL(pi_s || G^pi_s) (the Bellman residual); J* - J <= y . Delta with y = d* / (1 - gamma)
        kl = state.memo.get("kl")  # the KL of the history row of this state, else computed
        kl = diagnostics.kl_to_gibbs(mdp, p, g) if kl is None else kl
        delta = mdp.tau * np.maximum(kl, 0.0)
        y = self.d_star[own] / (1.0 - mdp.gamma)
        D = state.memo.get(("dissipation", self.scheme))  # the flow's D^h of this state if it has this scheme
        D = dissipation(mdp, p, g, self.scheme) if D is None else D
        rate_J, denominator, numerator = part.reduce(
            [x[own] @ D, y @ delta, x[own] @ (sc.rho_lo * delta)], "sum")
        informative = sc.C_lo[sc.informative]
        low_h, low, mass_error, q_max = part.reduce(  # minima as maxima of negatives: one reduction
            [-sc.rho_lo.min(), -informative.min() if informative.size else -math.inf,
             np.max(np.abs(p @ mdp.weights - 1.0)), np.max(np.abs(ev.own_Q))], "max")
        C_h_lo = float(-low_h)
        certified = float(numerator) / denominator if denominator > 0 else C_h_lo / kappa
        certified = max(certified, C_h_lo / kappa)  # equal or larger in exact arithmetic (module docstring)
        self.vacuous.update(int(i) for i in part.owned(np.flatnonzero(~sc.informative)))
        C_lo = float(-low) if math.isfinite(low) else math.nan
        continuum = 2.0 * mdp.tau * C_lo / kappa
        floor = max(GAP_FLOOR * max(1.0, abs(J_star)),
                    MASS_FLOOR * float(q_max) * float(mass_error) / (1.0 - mdp.gamma))
        tested = gap > floor
        r = rate_J / gap if tested else math.nan
        nan = math.nan
        self.rows.append((state.t, r, kappa, certified, float(r >= certified) if tested else nan,
                          r / certified if tested and certified > 0 else nan, C_h_lo, C_lo, continuum,
                          float(r >= continuum) if tested and math.isfinite(continuum) else nan))

    def result(self) -> AlongFlow:
        columns = np.array(self.rows, float).reshape(len(self.rows), len(RATES_COLUMNS)).T
        return AlongFlow(**dict(zip(RATES_COLUMNS, columns)), vacuous_states=tuple(sorted(self.vacuous)))


def optimum_summary(problem, ell: np.ndarray) -> dict:
    """``summary.json`` keys at ``Q*``: ``predicted_rate_bound`` (§5.3(c) with ``kappa = 1``) and ``lsi_bracket``.

    ``lsi_bracket`` (continuum constants of the Gibbs densities ``G*_s``): ``lower`` = ``min`` of the closed-form
    bound over the states where it is informative (``lower_state``; ``vacuous_states`` lists the others);
    ``upper`` and ``poincare`` from the slowest state (smallest generator gap ``ell_s``, ``upper_state``), which
    bound the minimum over states from above. The discrete (certified) constants at ``Q*``: ``certified_lower =
    min_s rho_{0,s,lo}`` at ``certified_state``, and ``certified_upper`` (:func:`solver.lsi.certified_bracket`)
    at the slowest state. ``predicted_rate_bound = 2 tau lower`` (continuum, informative states only).
    """
    mdp, Q = problem.mdp, problem.optimum.Q
    sc = state_constants(mdp, Q, problem.config.flow.scheme, ell)
    slowest = int(np.argmin(ell))
    b = bracket(mdp.space, log_gibbs_row(mdp, Q, slowest))
    informative = np.flatnonzero(sc.informative)
    low = int(informative[np.argmin(sc.C_lo[informative])]) if informative.size else None
    lower = float(sc.C_lo[low]) if low is not None else 0.0
    cert_state = int(np.argmin(sc.rho_lo))
    cb = lsi.certified_bracket(mdp.space, potential(mdp, Q[slowest:slowest + 1])[0], mdp.tau, float(ell[slowest]),
                               problem.config.flow.scheme)
    entry = b.as_dict() | {
        "lower": lower, "lower_method": LOWER_METHODS[int(sc.method[low])] if low is not None else "none informative",
        "lower_state": low, "upper_state": slowest,
        "vacuous_states": [int(i) for i in np.flatnonzero(~sc.informative)],
        "certified_lower": float(sc.rho_lo[cert_state]), "certified_state": cert_state,
        "certified_upper": cb.upper}
    return {"predicted_rate_bound": 2.0 * mdp.tau * lower, "lsi_bracket": entry}


def state_report(problem, Q: np.ndarray, state: int | None = None) -> dict:
    """Bracket, Poincaré and generator gap ``ell`` of ``G^Q_s`` at ``state`` (default: the slowest state), and the
    certified bracket ``certified_lower <= rho_0 <= certified_upper`` of its generator (with ``log_pi_min``)."""
    mdp = problem.mdp
    scheme = problem.config.flow.scheme
    ell = diagnostics.generator_gaps(mdp, Q, scheme)
    state = int(np.argmin(ell)) if state is None else state
    b = bracket(mdp.space, log_gibbs_row(mdp, Q, state))
    cb = lsi.certified_bracket(mdp.space, potential(mdp, Q[state:state + 1])[0], mdp.tau, float(ell[state]), scheme)
    return {"state": state, "ell": float(ell[state]), "tau": mdp.tau} | b.as_dict() | {
        "certified_lower": cb.lower, "certified_upper": cb.upper, "log_pi_min": cb.log_pi_min}
