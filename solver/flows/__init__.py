"""Policy flows: one module per ``flow.kind`` behind the protocol of :mod:`solver.flows.base`.

Adding a kind is one new module with a :class:`~solver.flows.base.Flow` subclass and one line in :data:`KINDS`.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from ..config import ConfigError, flow_config
from ..mdp import MDP
from ..parallel import Partition
from .base import Flow, FlowState, NumericalError, evaluate_checked, potential, trajectory
from .fisher_rao import FisherRao
from .gaussian_wpo import GaussianWPO
from .particles import Particles
from .policy_iteration import PolicyIteration
from .wasserstein import Wasserstein

#: ``flow.kind`` -> its implementation.
KINDS: dict[str, type[Flow]] = {cls.kind: cls for cls in (Wasserstein, FisherRao, PolicyIteration, Particles,
                                                          GaussianWPO)}

__all__ = ["KINDS", "Flow", "FlowState", "NumericalError", "evaluate_checked", "lookup", "make", "potential", "states",
           "trajectory"]


def lookup(kind: str) -> type[Flow]:
    """The flow class of ``flow.kind``; a :class:`ConfigError` naming the key and the allowed kinds otherwise."""
    try:
        return KINDS[kind]
    except KeyError:
        raise ConfigError(f"flow.kind: must be one of {', '.join(map(repr, KINDS))} (got {kind!r})") from None


def make(kind: str, mdp: MDP, partition: Partition | None = None, model=None, **options) -> Flow:
    """A flow of ``kind`` on ``mdp``; ``options`` are ``[flow]`` keys (``dt=0.01``, ``scheme="sg"``, ...).

    Serial unless ``partition`` says otherwise; ``model`` (:class:`solver.models.Model`) for kinds that evaluate
    the model off the action grid (``gaussian_wpo``). Raises :class:`ConfigError` for what the kind cannot run.
    """
    cls = lookup(kind)
    config = flow_config(kind=kind, **options)
    partition = partition if partition is not None else Partition(None, mdp.n_states)
    cls.check(config, mdp.space, partition)
    return cls(mdp, config, partition, model=model)


def states(kind: str, mdp: MDP, p0: np.ndarray, t_end: float = math.inf, **options) -> Iterator[FlowState]:
    """The flow states of ``kind`` from ``p0`` up to ``t_end`` (forever by default): :func:`trajectory` of
    :func:`make`."""
    return trajectory(make(kind, mdp, **options), p0, t_end)
