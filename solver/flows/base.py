"""What every flow kind shares: the flow state, the checked policy evaluation, the protocol and the time loop.

A flow kind is one module of :mod:`solver.flows` with one subclass of :class:`Flow`, registered in
``solver/flows/__init__.py``. The subclass says how the policy moves over one step (:meth:`Flow.advance`) and
what it knows about itself: its statewise dissipation (for the predicted ``dJ/dt``, theory.md §4), its
asymptotic rate (theory.md §5.3(e), §6) and its capabilities (MPI over states, adaptive steps, 2D actions).
:func:`trajectory` does the rest for every kind: evaluation of each new policy, refusal of non-finite values,
fixed steps that land on ``t = n dt`` exactly, and the flow states it yields.

Life time of a state: :func:`trajectory` never releases anything; a yielded state stays valid until its
consumer calls :meth:`FlowState.release` (the runner does, once every observer has seen the state and the loop
goes on: for large state grids ``P^pi`` is the largest array of a step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import numpy as np

from .. import bellman
from ..config import ConfigError
from ..mdp import MDP
from ..parallel import Partition


@dataclass
class FlowState:
    """One point of the flow: ``p`` at time ``t``, reached by a step of size ``dt`` (0 at the start).

    Attributes:
        step: step index (0 for the initial policy).
        t: time.
        dt: size of the step that produced this state.
        p: ``(N, M)`` policy density w.r.t. Lebesgue (``sum_j w_j p_ij = 1``); None under MPI until
            :meth:`gather`.
        evaluation: soft policy evaluation of ``p`` (``V``, ``Q`` and the resolvent for adjoint solves).
        g: ``(N, M)`` log Gibbs density ``Q / tau + log mu`` of ``Q`` (the potential of the next step); None under
            MPI until :meth:`gather`.
        rejected: steps rejected by an adaptive controller before this one was accepted.
        memo: statewise values of this state computed once and read again within the same step (this rank's
            states): ``"kl"`` ``KL(pi_s || G_s)`` (the history row, :func:`solver.diagnostics.record`) and
            ``("dissipation", scheme)`` ``D^h`` (the flow's :meth:`Flow.dissipation`), both taken by the
            along-flow check (:class:`solver.along_flow.LocalRates`) of the same state.
        own_p, own_g: this rank's rows of ``p`` and ``g`` (serially the same arrays as ``p`` and ``g``). Under MPI
            a step computes only these (and ``evaluation.own_Q``); the whole ``p``, ``g`` and ``Q`` are gathered
            by :meth:`gather` only where a consumer needs every state (a snapshot, a checkpoint, the last state:
            :func:`solver.runner.run`), not at every step.
    """

    step: int
    t: float
    dt: float
    p: np.ndarray | None
    evaluation: bellman.Evaluation
    g: np.ndarray | None
    rejected: int = 0
    memo: dict = field(default_factory=dict, repr=False)
    own_p: np.ndarray | None = field(default=None, repr=False)
    own_g: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        self.own_p = self.p if self.own_p is None else self.own_p
        self.own_g = self.g if self.own_g is None else self.own_g

    def gather(self, partition: Partition) -> None:
        """Gather ``p``, ``g`` and ``evaluation.Q`` from the ranks' rows (collective under MPI; a no-op once they
        hold every state, as they always do when serial)."""
        if self.p is not None:
            return
        self.p, self.g = partition.gather(self.own_p), partition.gather(self.own_g)
        self.evaluation.Q = partition.gather(self.evaluation.own_Q)

    def release(self) -> None:
        """Free the resolvent of the evaluation (its factorisation or ``P^pi``); ``V``, ``Q`` and ``p`` stay."""
        self.evaluation.resolvent.release()


class NumericalError(RuntimeError):
    """A flow produced non-finite values."""


def potential(mdp: MDP, Q: np.ndarray) -> np.ndarray:
    """``g = Q / tau + log mu`` (the log of the unnormalised Gibbs density), ``(N, M)``."""
    g = Q / mdp.tau
    g += mdp.log_mu
    return g


def evaluate_checked(mdp: MDP, p: np.ndarray, step: int, t: float,
                     partition: Partition | None = None) -> bellman.Evaluation:
    """Soft policy evaluation of ``p`` (this rank's rows under MPI), refusing non-finite policies, values or a
    singular Bellman system.

    Raises:
        NumericalError: naming the step and time.
    """
    where = f"at step {step} (t = {t:.6g})"
    # under MPI each rank tests its own rows of p and Q (V is replicated) and the flags are reduced, so every rank
    # raises the same error; a non-finite policy is then evaluated first, which only propagates NaNs (the LU does
    # not test its input, PETSc's GMRES fails on every rank: tests/test_mpi_distributed.py)
    ranks = partition is not None and not partition.serial
    bad_p = not all_finite(p)
    if bad_p and not ranks:
        raise NumericalError(f"non-finite values in the policy {where}")
    try:
        ev = bellman.evaluate(mdp, p, partition if ranks else None)
    except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:  # singular or non-finite I - gamma P^pi
        raise NumericalError(f"policy evaluation failed {where}: {exc}") from None
    bad = [float(bad_p), float(not (all_finite(ev.V) and all_finite(ev.own_Q)))]
    bad_p, bad_v = partition.reduce(bad, "max") if ranks else bad
    if bad_p:
        raise NumericalError(f"non-finite values in the policy {where}")
    if bad_v:
        raise NumericalError(f"non-finite values in V or Q {where}")
    return ev


def all_finite(x: np.ndarray) -> bool:
    """``np.all(np.isfinite(x))`` by two reductions and no temporary: a NaN propagates into ``min`` and
    ``max``, and an infinity is one of them."""
    return x.size == 0 or bool(np.isfinite(x.min()) and np.isfinite(x.max()))


class Flow:
    """One flow kind. Subclasses set the class attributes and implement :meth:`advance`.

    Attributes (class level):
        kind: the ``flow.kind`` name.
        mpi: runs with the states split over MPI ranks.
        adaptive: supports ``flow.adaptive``.
        actions_2d: supports 2D action domains.
        linear_rate: the gap decays at a linear rate, so fitting and predicting one makes sense.
        integrators: the ``flow.integrator`` values it runs ("implicit"; the WPG flow also "exponential").
        fokker_planck: its step is the discrete Fokker-Planck generator of theory.md §3, so the along-flow rate
            check (certified bound, theory.md §10.1) and the LSI rate bound apply to it.
        time_stepped: its steps advance flow time by ``flow.dt`` (soft policy iteration: one iteration per unit
            ``t``, independent of ``dt``).

    Args:
        mdp: the discrete MDP.
        config: the ``[flow]`` table (:class:`solver.config.FlowConfig`).
        partition: the states of this rank (a one-rank partition when serial).
        model: the :class:`solver.models.Model` of ``mdp``, for kinds that evaluate it off the action mesh.
    """

    kind: ClassVar[str] = ""
    mpi: ClassVar[bool] = False
    adaptive: ClassVar[bool] = False
    actions_2d: ClassVar[bool] = True
    linear_rate: ClassVar[bool] = True
    integrators: ClassVar[tuple[str, ...]] = ("implicit",)
    fokker_planck: ClassVar[bool] = False
    time_stepped: ClassVar[bool] = True

    def __init__(self, mdp: MDP, config, partition: Partition, model=None):
        self.mdp, self.config, self.partition, self.model = mdp, config, partition, model

    @classmethod
    def projected_steps(cls, config) -> float:
        """Steps a run of ``config`` (the ``[flow]`` table) takes at most: ``t_end / dt`` (adaptive steps start at
        ``dt`` and grow where the flow is smooth, so this bounds them too)."""
        return config.t_end / config.dt

    #: The config key that sets :meth:`extra_bytes` (named when the memory check refuses a run).
    extra_bytes_key: ClassVar[str] = "states.n"

    @classmethod
    def extra_bytes(cls, config, n_states: int) -> int:
        """Memory this kind needs beyond the policy arrays every kind has, bytes (for the preflight estimate)."""
        return 0

    @classmethod
    def check(cls, config, space, partition: Partition) -> None:
        """Refuse a configuration this kind cannot run, naming the key (raises :class:`ConfigError`)."""
        if config.adaptive and not cls.adaptive:
            raise ConfigError(f"flow.adaptive: flow.kind = {cls.kind!r} has no adaptive step "
                              f"(kinds with one: {', '.join(adaptive_kinds())})")
        if not space.is_chain and not cls.actions_2d:
            raise ConfigError(f"flow.kind: {cls.kind!r} needs a 1D action interval (2D action domains are not "
                              "supported)")
        if not partition.serial and not cls.mpi:
            raise ConfigError(f"flow.kind: only {', '.join(map(repr, mpi_kinds()))} runs on several MPI ranks "
                              f"(got {cls.kind!r}); run it without mpirun")
        if getattr(config, "integrator", "implicit") not in cls.integrators:
            raise ConfigError(f"flow.integrator: flow.kind = {cls.kind!r} has no {config.integrator!r} integrator "
                              f"(allowed: {', '.join(map(repr, cls.integrators))})")

    def start(self, p0: np.ndarray) -> np.ndarray:
        """Set up the flow's own state from the initial policy; return the policy of step 0."""
        return p0

    def advance(self, state: FlowState, t_end: float) -> tuple[np.ndarray, float, int]:
        """One step from ``state``: ``(p at the new time, the new time, steps rejected on the way)``; under MPI
        (kinds with :attr:`mpi`) ``p`` holds this rank's rows only."""
        raise NotImplementedError

    def checkpoint(self) -> dict[str, np.ndarray]:
        """The flow's own state after the last step, as arrays (``checkpoint.npz``; collective under MPI).

        Together with the last state's ``p`` it must determine every later step bit for bit. The default (no
        state beyond ``p``) suits kinds whose step depends on ``p`` and ``Q`` alone; a kind that carries more
        (masses, a log-density, particles, a step-size controller) overrides this and :meth:`restore`.
        """
        return {}

    def restore(self, p: np.ndarray, data: dict[str, np.ndarray]) -> None:
        """Continue from :meth:`checkpoint`'s ``data`` taken at the state of policy ``p`` (instead of :meth:`start`)."""
        self.start(p)

    def more(self, state: FlowState, t_end: float) -> bool:
        """Whether :func:`trajectory` takes another step from ``state`` (default: ``t < t_end``)."""
        return state.t < t_end * (1 - 1e-12)

    def dissipation(self, state: FlowState) -> np.ndarray | None:
        """Statewise dissipation ``D`` ``(N,)`` with ``dJ/dt = rho^T (I - gamma P^pi)^{-1} D``; None if none."""
        return None

    def own_dissipation(self, state: FlowState) -> np.ndarray | None:
        """This rank's rows of :meth:`dissipation` (all of them serially), without a gather; None if none."""
        D = self.dissipation(state)
        return None if D is None else D[self.partition.rows]

    def predicted_rate(self, ell_min: float) -> float | None:
        """Asymptotic gap rate given the smallest generator gap at ``Q*`` (None where there is no prediction)."""
        return None

    def summary(self, problem, result) -> dict:
        """Keys this kind adds to ``summary.json`` after a run (``problem``, ``result``: :mod:`solver.runner`)."""
        return {}

    def fixed_time(self, state: FlowState, t_end: float) -> float:
        """The end of a fixed step from ``state``: ``(n + 1) dt`` (no accumulated round-off), capped at ``t_end``."""
        return min((state.step + 1) * self.config.dt, t_end)


def trajectory(flow: Flow, p0: np.ndarray, t_end: float = math.inf, resume: dict | None = None) -> Iterator[FlowState]:
    """Yield the flow states ``p^0, p^1, ...`` of ``flow`` from ``p0`` (forever, or until ``t_end``).

    Every state holds the full ``V``; ``p``, ``Q`` and ``g`` whole when serial, under MPI this rank's rows
    (:attr:`FlowState.own_p`, ...) until :meth:`FlowState.gather`.

    ``resume``: continue from a checkpoint instead: ``p0`` is the policy of the checkpointed state, ``resume`` its
    ``step``, ``t``, ``dt``, ``rejected`` and ``flow`` (:meth:`Flow.checkpoint`'s arrays); the first state yielded
    is the checkpointed one (evaluated again: the same ``V``, ``Q``, ``g``), and the following ones equal those of
    the uninterrupted run bit for bit.

    Raises:
        NumericalError: if a step produces non-finite values.
    """
    mdp, partition = flow.mdp, flow.partition
    if resume is None:
        p, step, t, dt, rejected = flow.start(p0), 0, 0.0, 0.0, 0
    else:
        flow.restore(p0, resume["flow"])
        p, step, t = p0, int(resume["step"]), float(resume["t"])
        dt, rejected = float(resume["dt"]), int(resume["rejected"])
    state = _state(mdp, p if partition.serial else p[partition.rows], step, t, dt, rejected, partition)
    yield state
    while flow.more(state, t_end):
        p, t, rejected = flow.advance(state, t_end)
        state = _state(mdp, p, state.step + 1, t, t - state.t, rejected, partition)
        yield state


def _state(mdp: MDP, own_p: np.ndarray, step: int, t: float, dt: float, rejected: int,
           partition: Partition) -> FlowState:
    """The flow state of the policy whose rows on this rank are ``own_p`` (all rows when serial): evaluated and
    checked; under MPI ``p``, ``g`` and ``Q`` are left to :meth:`FlowState.gather`."""
    ev = evaluate_checked(mdp, own_p, step, t, partition)
    own_g = potential(mdp, ev.own_Q)
    if partition.serial:
        return FlowState(step=step, t=t, dt=dt, p=own_p, evaluation=ev, g=own_g, rejected=rejected)
    return FlowState(step=step, t=t, dt=dt, p=None, evaluation=ev, g=None, rejected=rejected, own_p=own_p,
                     own_g=own_g)


def _kinds() -> list[type[Flow]]:
    """Every defined flow kind (the subclasses of :class:`Flow` with a ``kind``), for error messages."""
    found, todo = [], list(Flow.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo.extend(cls.__subclasses__())
        if cls.kind:
            found.append(cls)
    return found


def adaptive_kinds() -> list[str]:
    return [cls.kind for cls in _kinds() if cls.adaptive]


def mpi_kinds() -> list[str]:
    return [cls.kind for cls in _kinds() if cls.mpi]
