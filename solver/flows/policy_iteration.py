"""``flow.kind = "policy_iteration"``: soft policy iteration ``p_{k+1} = G^{pi_k}`` (theory.md §2) as a flow.

One iteration per unit of "time": ``dt = 1`` and ``t = k``, whatever ``flow.dt``; ``flow.t_end`` caps the number
of iterations at ``floor(t_end)``. It is monotone and converges superlinearly (quadratically near ``pi*``), so
it has no linear rate and no ``dJ/dt``.
"""

from __future__ import annotations

import math

import numpy as np

from .. import bellman
from .base import Flow, FlowState


class PolicyIteration(Flow):
    """Soft policy iteration (module docstring)."""

    kind = "policy_iteration"
    linear_rate = False
    time_stepped = False

    @classmethod
    def projected_steps(cls, config) -> float:
        return math.floor(config.t_end)

    def advance(self, state: FlowState, t_end: float) -> tuple[np.ndarray, float, int]:
        return bellman.gibbs(self.mdp, state.evaluation.Q), float(state.step + 1), 0

    def more(self, state: FlowState, t_end: float) -> bool:
        return state.step + 1 <= t_end
