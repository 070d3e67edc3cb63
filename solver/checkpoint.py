"""Crash safety of a run: SIGINT/SIGTERM handling, ``checkpoint.npz`` and what a resumed run starts from.

A checkpoint holds the last state's policy, step, time and step size, the flow's own state
(:meth:`~solver.flows.base.Flow.checkpoint`), every observer's :meth:`~solver.observers.Observer.checkpoint_state`
and the config; ``history.csv`` holds the rows. :func:`load_resume` reads it back and :func:`restore_observers`
puts the observers where they were, so a resumed run equals the uninterrupted one bit for bit (same thread count).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__, flows, outputs
from .config import Config, ConfigError
from .observers import Observer


class StopRequest:
    """SIGINT / SIGTERM during a run (:func:`install_signal_handlers`): stop cleanly.

    The first signal during the loop asks it to stop after the current step (the observers finish, a checkpoint of
    that step is written, ``summary.json`` says ``interrupted``); a second one interrupts at once (the last
    periodic checkpoint stays). Before the loop a signal interrupts at once (nothing has been written); while the
    results are written the first one is only recorded (the plots are skipped), a second one interrupts (the
    atomic writes leave no file cut short).
    """

    def __init__(self):
        self.signum: int | None = None
        self.phase = "setup"  # "setup" | "loop" | "writing"

    def __call__(self, signum, frame) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if self.phase == "setup" or not first:
            raise KeyboardInterrupt
        if self.phase == "loop":
            import sys

            print(f"\nwpgflow: {signal.Signals(signum).name}: stopping after this step (send it again to stop at "
                  "once)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def reset(self) -> None:
        self.signum, self.phase = None, "setup"


#: The stop request of this process (the handler of :func:`install_signal_handlers`).
STOP = StopRequest()


def install_signal_handlers() -> dict:
    """Route SIGINT and SIGTERM to :data:`STOP` (main thread only); returns the previous handlers."""
    STOP.reset()
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[signum] = signal.signal(signum, STOP)
        except ValueError:  # not the main thread
            pass
    return previous


def restore_signal_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    STOP.reset()


@dataclass
class Resume:
    """Where a resumed run starts: the checkpointed state (``p``, ``step``, ``t``, ``dt``, ``rejected`` and
    ``flow``, :meth:`~solver.flows.base.Flow.checkpoint`'s arrays) and the history rows up to it."""

    state: dict
    rows: list[dict]


#: Runs whose policy has at least this many entries (``N M``; lqr_1d: 31097) checkpoint on a wall-time rule: a
#: periodic checkpoint (at every ``output.checkpoint_every``-th step) is written only once
#: ``max(CHECKPOINT_INTERVAL, cost / CHECKPOINT_SHARE)`` seconds have passed since the last one, ``cost`` the
#: wall time the last one took. Smaller runs checkpoint at every period (their checkpoints
#: cost well under a millisecond). The first checkpoint (step 0) and the end of the loop (normal, or a stop
#: request) are always written, and a resumed run equals the uninterrupted one from any checkpoint (``--resume``
#: recomputes the steps after it). Measured on lqr_1d (24 snapshots): a 6.9 MB checkpoint (most of it the
#: snapshot policies, rewritten each time) costs ~26 ms, 2.7-4.8% of a 2-3 s loop at one per 100 steps; with the
#: rule the step-0 one (0.5 MB, ~3 ms) and the final one are written.
CHECKPOINT_MIN_ENTRIES = 2 ** 14

#: Wall time between two periodic checkpoints of a large run at least, seconds (:data:`CHECKPOINT_MIN_ENTRIES`).
CHECKPOINT_INTERVAL = 10.0

#: ... and at least the last checkpoint's cost over this share, so that checkpoints take at most ~1% of the loop.
CHECKPOINT_SHARE = 0.01


class Checkpointer:
    """``checkpoint.npz`` of a run (:func:`solver.outputs.write_checkpoint`): the state's policy, step, time and
    step size, the flow's own state (:meth:`~solver.flows.base.Flow.checkpoint`), the snapshots and local-rate rows
    kept so far, and the config. ``history.csv`` holds the rows. Called on every rank; rank 0 writes.

    The periodic calls (during the loop, :data:`STOP` ``.phase == "loop"``) of a large run follow the wall-time
    rule of :data:`CHECKPOINT_MIN_ENTRIES`, decided on rank 0 and broadcast
    (:meth:`solver.parallel.Partition.bcast`), so that every rank takes the same decision (the flow's and the
    collective observers' states are gathered).
    """

    def __init__(self, out: Path, cfg: Config, flow: flows.Flow, observers: list[Observer]):
        self.out, self.cfg, self.flow, self.observers = out, cfg, flow, observers
        self.root = flow.partition.root
        # (wall time of the last checkpoint, seconds it took), on rank 0
        self._last: tuple[float, float] = (time.perf_counter(), 0.0)
        self.written = False  # a checkpoint of this run was written (then the wall-time rule applies)

    def due(self, state: flows.FlowState) -> bool:
        """Whether the periodic checkpoint of ``state`` is written (collective under MPI: rank 0's decision)."""
        mdp = self.flow.mdp
        if mdp.n_states * mdp.n_actions < CHECKPOINT_MIN_ENTRIES or not self.written:  # the same on every rank
            return True  # (the first one is always written: a run has a checkpoint from its first state on)
        decision = True
        if self.root:
            written_at, cost = self._last
            decision = time.perf_counter() - written_at >= max(CHECKPOINT_INTERVAL, cost / CHECKPOINT_SHARE)
        return bool(self.flow.partition.bcast(decision))

    def __call__(self, state: flows.FlowState, final: bool | None = None) -> bool:
        """Write the checkpoint of ``state`` (a periodic one only if :meth:`due`); whether it was written.

        ``final``: the end of the loop (always written); default: any call outside the loop (``STOP.phase``).
        """
        final = STOP.phase != "loop" if final is None else final
        if not final and not self.due(state):
            return False
        start = time.perf_counter()
        state.gather(self.flow.partition)  # collective under MPI: the whole policy for checkpoint.npz
        for o in self.observers:  # history.csv reaches the checkpoint before it is written (HistoryCSV.flush)
            flush = getattr(o, "flush", None)
            if flush is not None:
                flush()
        data = self.flow.checkpoint()  # collective under MPI, and so are the collective observers' states
        observed = [o.checkpoint_state() for o in self.observers]
        if not self.root:
            self.written = True
            return True
        arrays = {"p": state.p, **{f"flow.{k}": np.asarray(v) for k, v in data.items()}}
        for i, o in enumerate(observed):
            arrays |= {f"observer{i}.{k}": np.asarray(v) for k, v in o.items()}
        meta = {"step": state.step, "t": state.t, "dt": state.dt, "rejected": state.rejected,
                "kind": self.flow.kind, "wpgflow": __version__, "config": self.cfg.to_dict()}
        outputs.write_checkpoint(self.out, arrays, meta)
        now = time.perf_counter()
        self._last, self.written = (now, now - start), True
        return True


def comparable(cfg_dict: dict) -> dict:
    """A config dict without what ``--extend`` may change (``flow.t_end``)."""
    return {**cfg_dict, "flow": {k: v for k, v in cfg_dict.get("flow", {}).items() if k != "t_end"}}


def load_resume(out: Path, cfg: Config) -> Resume:
    """The :class:`Resume` of the run directory ``out``: its checkpoint and its history rows up to it.

    Raises:
        ConfigError: naming the file, if the checkpoint is missing, damaged or of another config, or if
            ``history.csv`` does not reach the checkpoint.
    """
    links = [name for name in (*outputs.FILES, outputs.CHECKPOINT) if (out / name).is_symlink()]
    if links:
        raise ConfigError(f"--resume {out}: {links[0]} is a symlink; a run never writes through one (rerun with "
                          "--force, which removes it)")
    file = out / outputs.CHECKPOINT
    if not file.exists():
        raise ConfigError(f"--resume {out}: no {outputs.CHECKPOINT} (output.checkpoint_every = 0, or the run "
                          "stopped before its first checkpoint); rerun it with --force")
    arrays, meta = outputs.read_checkpoint(out)
    try:
        step, t = int(meta["step"]), float(meta["t"])
        state = {"p": arrays["p"], "step": step, "t": t, "dt": float(meta["dt"]), "rejected": int(meta["rejected"]),
                 "flow": {k[len("flow."):]: v for k, v in arrays.items() if k.startswith("flow.")},
                 "arrays": arrays}
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{file}: damaged (incomplete metadata)") from None
    if comparable(meta.get("config", {})) != comparable(outputs.jsonable(cfg.to_dict())):
        raise ConfigError(f"{file}: written for another config than {out / 'config.toml'}; rerun with --force")
    if meta.get("kind") != cfg.flow.kind or state["p"].shape != (state["p"].shape[0], state["p"].shape[-1]):
        raise ConfigError(f"{file}: written for another flow kind ({meta.get('kind')!r})")
    rows = outputs.history_rows(out)
    if len(rows) < step + 1 or rows[step]["t"] != t:
        raise ConfigError(f"{out / 'history.csv'}: does not reach the checkpoint's step {step} (t = {t:g}); "
                          "rerun with --force")
    return Resume(state=state, rows=rows[:step + 1])


def restore_observers(observers: list[Observer], resume_state: Resume) -> list[Observer]:
    """The observers as they were at the checkpoint: history rows replayed, the snapshots and local-rate rows
    restored, and every schedule advanced over the times seen (the same calls as in the uninterrupted run)."""
    arrays = resume_state.state["arrays"]
    for i, o in enumerate(observers):
        prefix = f"observer{i}."
        o.resume(resume_state.rows, {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
    return observers
