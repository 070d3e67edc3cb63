"""``flow.kind = "wasserstein"``: the Wasserstein policy-gradient flow (theory.md §3), implicit Euler in time.

For every state ``s``, with ``Q = Q^{pi_t}`` re-evaluated from the current policy at all states,

    d_t p = div( tau grad p + p grad(tau U - Q) )      in A,     no flux on the boundary of A,

discretised in space by edge-averaged P1 finite elements (:mod:`solver.flows.fokker_planck`) and in time by
implicit Euler with ``Q`` frozen over the step, ``(I - dt L_n) m^{n+1} = m^n`` on the masses ``m = w p``. For
every ``dt``: mass is conserved, ``m^{n+1} >= 0``, the discrete Gibbs policy of ``Q*`` is an exact fixed point
and ``V^{pi_n}`` is non-decreasing at every state (theory.md §3). The asymptotic gap rate is
``2 log(1 + dt ell_min) / dt`` (``2 ell_min`` with adaptive steps), ``ell_min`` the smallest generator gap at
``Q*`` (theory.md §5.3(e)).

``flow.integrator = "exponential"``: each step applies ``exp(dt L_n)`` to the masses instead
(:func:`solver.flows.fokker_planck.exponential_step`, uniformisation), with the same four properties for every
``dt``; it is exact in time when ``Q`` does not depend on the policy (one state: ``Q = R + gamma V`` moves by a
constant), where the generator is built once for the whole run; on coupled MDPs its gap rate is
``2 ell_min`` for every ``dt`` (near ``Q*`` the change of ``Q`` is second order in the policy's, so the
linearised step is ``exp(dt L*)``).

With an MPI partition each rank steps its own rows (states); the flow states hold those rows
(:attr:`solver.flows.FlowState.own_p`) and gather the whole policy only where a consumer needs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import budget
from ..config import ConfigError
from .base import Flow, FlowState
from .fokker_planck import (FrozenPropagator, dissipation, edge_rates, exponential_step, implicit_step,
                            rates_and_dissipation, uniformise)


def implicit_euler_rate(ell: float, dt: float) -> float:
    """Asymptotic gap rate of implicit Euler with a slowest mode ``ell``: ``2 log(1 + dt ell) / dt``.

    >>> round(implicit_euler_rate(1.0, 1e-9), 6)
    2.0
    """
    return 2.0 * math.log1p(dt * ell) / dt


@dataclass(frozen=True)
class Adaptive:
    """Step-size control for implicit Euler.

    The local error is estimated from successive mass increments,
    ``err = max_s 1/2 || dm^n - (dt_n / dt_{n-1}) dm^{n-1} ||_1`` (``~ dt^2 |m''|``, a total-variation
    distance). A step with ``err > tol`` is redone with a smaller ``dt``; after an accepted step
    ``dt <- dt * clip(0.9 sqrt(tol / err), 0.5, 2)``, capped at ``dt_max``. Since every step is monotone
    and positive, the controller is about accuracy only.
    """

    tol: float = 1e-3
    dt_max: float = math.inf


class Wasserstein(Flow):
    """The WPG flow (module docstring): implicit Euler with fixed or adaptive steps (``flow.adaptive``), or the
    exponential integrator with fixed steps (``flow.integrator = "exponential"``)."""

    kind = "wasserstein"
    mpi = True
    adaptive = True
    integrators = ("implicit", "exponential")  # flow.integrator values this kind runs
    fokker_planck = True

    @classmethod
    def check(cls, config, space, partition) -> None:
        super().check(config, space, partition)
        if config.integrator == "exponential" and config.adaptive:
            raise ConfigError('flow.adaptive: flow.integrator = "exponential" takes fixed steps (it is exact in time '
                              'for a frozen Q); set flow.adaptive = false or flow.integrator = "implicit"')

    def start(self, p0: np.ndarray) -> np.ndarray:
        f = self.config
        self._exponential = f.integrator == "exponential"
        # one state: Q = R + gamma V 1 moves by a constant only, so the generator is the same at every step and
        # is uniformised once (from the first step's potential)
        self._frozen = self._frozen_rates = None
        self._rates = None  # (state, its edge rates) from the last dissipation, reused by the step from that state
        self._adaptive = Adaptive(tol=f.adapt_tol, dt_max=f.dt_max) if f.adaptive else None
        self._dt = f.dt
        self._masses = p0[self.partition.rows] * self.mdp.space.weights  # this rank's rows
        self._previous = None  # (mass increment, step) of the last accepted step, for the error estimate
        return p0

    def advance(self, state: FlowState, t_end: float) -> tuple[np.ndarray, float, int]:
        mdp, adaptive = self.mdp, self._adaptive
        rejected = 0
        while True:
            t_new = min(state.t + self._dt, t_end) if adaptive is not None else self.fixed_time(state, t_end)
            h = t_new - state.t
            masses = self._step(state, h)
            if adaptive is None:
                break
            increment = masses - self._masses
            if self._previous is None:
                break
            previous_increment, previous_dt = self._previous
            err = 0.5 * np.max(np.sum(np.abs(increment - (h / previous_dt) * previous_increment), axis=1))
            err = self.partition.max(err)
            factor = 0.9 * math.sqrt(adaptive.tol / err) if err > 0 else 2.0
            if err <= adaptive.tol or h <= 1e-12 * max(1.0, state.t):
                self._dt = min(adaptive.dt_max, h * min(2.0, max(0.5, factor)))
                break
            self._dt = h * max(0.2, factor)
            rejected += 1
        if adaptive is not None:
            self._previous = increment, h
        self._masses = masses
        return masses / mdp.space.weights, t_new, rejected  # this rank's rows (the states gather them)

    def _step(self, state: FlowState, h: float) -> np.ndarray:
        """This rank's masses after a step of size ``h`` from ``state`` (its potential on this rank's rows)."""
        mdp, scheme = self.mdp, self.config.scheme
        g = state.own_g
        if not self._exponential:
            rates = self._rates[1] if self._rates is not None and self._rates[0] is state else None
            return implicit_step(mdp.space, self._masses, g, mdp.tau, h, scheme, rates=rates)
        if mdp.n_states == 1:
            if self._frozen is None:
                self._frozen = FrozenPropagator(uniformise(mdp.space, g, mdp.tau, scheme))
            return self._frozen.apply(self._masses, h)
        return exponential_step(mdp.space, self._masses, g, mdp.tau, h, scheme)

    def checkpoint(self) -> dict[str, np.ndarray]:
        """Masses (all rows), the next step size and the last increment of the adaptive controller."""
        data = {"masses": self.partition.gather(self._masses), "dt": np.array(self._dt)}
        if self._previous is not None:
            data |= {"increment": self.partition.gather(self._previous[0]), "increment_dt": np.array(self._previous[1])}
        if getattr(self, "_frozen_rates", None) is not None:  # one state: the edge rates of the first potential
            data |= {"frozen_fwd": self._frozen_rates[0], "frozen_bwd": self._frozen_rates[1]}
        return data

    def restore(self, p: np.ndarray, data: dict[str, np.ndarray]) -> None:
        self.start(p)
        rows = self.partition.rows
        self._masses, self._dt = data["masses"][rows], float(data["dt"])
        if "increment" in data:
            self._previous = data["increment"][rows], float(data["increment_dt"])
        if "frozen_fwd" in data:
            self._frozen_rates = data["frozen_fwd"], data["frozen_bwd"]

    def dissipation(self, state: FlowState) -> np.ndarray:
        return self.partition.gather(self.own_dissipation(state))

    def own_dissipation(self, state: FlowState) -> np.ndarray:
        mdp, scheme = self.mdp, self.config.scheme
        if mdp.n_states == 1:  # the generator is frozen (start): its edge rates are computed once
            if getattr(self, "_frozen_rates", None) is None:
                self._frozen_rates = edge_rates(mdp.space, state.own_g, mdp.tau, scheme)
            return dissipation(mdp, state.own_p, state.own_g, scheme, self._frozen_rates, state.evaluation.log_p)
        p, g = state.own_p, state.own_g
        if 16 * g.shape[0] * mdp.space.edges.shape[0] > budget.SOLVE_CHUNK_BYTES:  # too large to keep: chunks
            self._rates = None
            D = dissipation(mdp, p, g, scheme)
        else:  # the evaluation's log p (this rank's rows) is that of this policy: the entropy of r^pi took it
            rates, D = rates_and_dissipation(mdp, p, g, scheme, state.evaluation.log_p)
            self._rates = (state, rates)  # the next step from this state uses the same rates (implicit_step)
            state.memo[("rates", scheme)] = rates  # this rank's states, for the along-flow check's gaps
        state.memo[("dissipation", scheme)] = D  # this rank's states, for the along-flow check
        return D

    def predicted_rate(self, ell_min: float) -> float | None:
        if not math.isfinite(ell_min):
            return None
        if self.config.adaptive or self.config.integrator == "exponential":
            return 2 * ell_min
        return implicit_euler_rate(ell_min, self.config.dt)
