"""Observers of the flow loop, with one life cycle (owned by :func:`solver.runner.run`).

Every observer has the same three calls, each with a default that does nothing:

* ``start(problem)``: once, before the first flow state;
* ``observe(row, state)``: after every flow state (row 0 is the initial policy), with the state's history row
  (:data:`solver.diagnostics.HISTORY_COLUMNS`); the observer's own :class:`Schedule` (if any) decides whether it
  acts. ``state`` and its evaluation (``V``, ``Q``, the resolvent for adjoint solves) are valid during the call;
  an observer that keeps arrays beyond it copies them.
* ``finish(result)``: once, always, in a ``finally``: after a normal end, a numerical failure or an interrupt
  (``result.status`` says which; ``result.final`` is the last state, whose evaluation is still alive).

An observer may contribute ``summary.json`` keys through ``summary()`` (called after ``finish``). They record,
report and keep; they never change the flow (the stepper stays pure).
"""

from __future__ import annotations

import bisect
import csv
import math
import time
from pathlib import Path

import numpy as np

from .diagnostics import HISTORY_COLUMNS
from .flows.base import FlowState


class Observer:
    """Base class: the life cycle of the module docstring, every call a no-op.

    ``collective``: under MPI over states the observer exists on every rank and its calls (and
    :meth:`checkpoint_state`) are collective; otherwise it is rank 0's alone (other ranks hold a base
    :class:`Observer` in its place, so that the observers' positions agree across ranks).
    """

    collective = False

    def start(self, problem) -> None:
        """Called once before the first flow state."""

    def observe(self, row: dict, state: FlowState) -> None:
        """Called after every flow state."""

    def needs_full(self, row: dict, state: FlowState) -> bool:
        """Whether :meth:`observe` reads every state's ``p``, ``g`` or ``Q`` of ``state`` (under MPI the runner then
        gathers them first, :meth:`~solver.flows.FlowState.gather`; rank 0's answer decides). Collective observers
        mostly read their own rows (:attr:`~solver.flows.FlowState.own_p`, ...) and need not; the along-flow
        check's shared gap tracker (2D meshes) does."""
        return False

    def finish(self, result) -> None:
        """Called once after the loop, whatever its outcome (``result.status``)."""

    def summary(self) -> dict:
        """``summary.json`` keys this observer contributes (called after :meth:`finish`)."""
        return {}

    def checkpoint_state(self) -> dict:
        """Arrays that :meth:`resume` needs to continue exactly (written into ``checkpoint.npz``)."""
        return {}

    def restore_state(self, data: dict) -> None:
        """Inverse of :meth:`checkpoint_state`."""

    def resume(self, rows: list[dict], data: dict) -> None:
        """Before :meth:`start` of a resumed run: ``rows`` are the history rows up to the checkpoint, ``data`` this
        observer's :meth:`checkpoint_state` there. The default advances the observer's ``schedule`` (if any) over
        the times already seen, as the uninterrupted run did, and restores ``data``."""
        schedule = getattr(self, "schedule", None)
        if isinstance(schedule, Schedule):
            for row in rows:
                schedule.due(row["t"])
        if data:
            self.restore_state(data)


class Schedule:
    """When a periodic observer acts: at ``t = 0``, then at ``count - 1`` geometrically spaced times up to ``t_end``.

    Geometric spacing resolves the fast initial transient and the slow tail alike. :meth:`due` is true for the
    first flow state at or after each target time (several targets passed in one step count once).

    Args:
        count: number of target times, ``t = 0`` included (``output.snapshots``).
        first: the first positive target time.
        t_end: the last target time.
    """

    def __init__(self, count: int, first: float, t_end: float):
        self.targets = np.concatenate([[0.0], np.geomspace(first, t_end, count - 1)]) if count > 1 else np.zeros(1)
        self._next = 0

    def pending(self, t: float) -> bool:
        """Whether :meth:`due` would be true at ``t`` (without moving on to the next target)."""
        return self._next < self.targets.size and t >= self.targets[self._next] * (1 - 1e-12)

    def due(self, t: float) -> bool:
        if not self.pending(t):
            return False
        while self._next < self.targets.size and self.targets[self._next] <= t * (1 + 1e-12):
            self._next += 1
        return True


#: :class:`HistoryCSV` flushes its rows to the file at most this often (seconds), at every checkpoint (before
#: ``checkpoint.npz`` is written, so the file always reaches the checkpoint) and at the end. A flush per row cost
#: 1.3% of a default lqr_1d loop (one ``write`` per 3 ms step); a killed process loses at most this much of rows
#: after its last checkpoint, which ``--resume`` recomputes anyway.
FLUSH_SECONDS = 1.0


class HistoryCSV(Observer):
    """One ``history.csv`` row per flow state, written at once and flushed every :data:`FLUSH_SECONDS` (a crash
    keeps the rows up to then, and always those up to the last checkpoint: :meth:`flush`)."""

    def __init__(self, path: Path):
        self.path = Path(path) / "history.csv"
        self._file = None
        self._replay: list[dict] = []
        self._flushed = -math.inf  # time.monotonic() of the last flush

    def resume(self, rows: list[dict], data: dict) -> None:
        self._replay = rows  # rewritten at start: the file then holds exactly the rows up to the checkpoint

    def start(self, problem) -> None:
        self._file = open(self.path, "w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(HISTORY_COLUMNS)
        for row in self._replay:
            self.observe(row, None)

    def observe(self, row: dict, state: FlowState) -> None:
        self._writer.writerow([repr(float(row[c])) for c in HISTORY_COLUMNS])
        if time.monotonic() - self._flushed >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows to the file (the checkpointer calls it before ``checkpoint.npz``)."""
        if self._file is not None and not self._file.closed:
            self._file.flush()
            self._flushed = time.monotonic()

    def finish(self, result) -> None:
        if self._file is not None:
            self._file.close()


class Snapshots(Observer):
    """Keeps the policy (at the states ``states``, all if None) and ``V^pi`` at the times of a :class:`Schedule`.

    The last state of the run is added by :meth:`finish`, so a run that converges early still ends on its final
    policy. ``V^pi`` is kept at every state whatever ``states`` (``N`` doubles per snapshot).
    """

    def __init__(self, schedule: Schedule, states: np.ndarray | None = None):
        self.schedule = schedule
        self.states = states
        self.times: list[float] = []
        self.policies: list[np.ndarray] = []
        self.values: list[np.ndarray] = []

    def needs_full(self, row: dict, state: FlowState) -> bool:
        return self.schedule.pending(state.t)

    def observe(self, row: dict, state: FlowState) -> None:
        if self.schedule.due(state.t):
            self._keep(state)

    def checkpoint_state(self) -> dict:
        return {"times": np.array(self.times, dtype=float), "policies": np.array(self.policies),
                "values": np.array(self.values)}

    def restore_state(self, data: dict) -> None:
        self.times = [float(t) for t in data["times"]]
        self.policies, self.values = list(data["policies"]), list(data["values"])

    def finish(self, result) -> None:
        state = result.final
        if state is not None and (not self.times or self.times[-1] < state.t):
            self._keep(state)

    def _keep(self, state: FlowState) -> None:
        self.times.append(state.t)
        self.policies.append(state.p.copy() if self.states is None else state.p[self.states])
        self.values.append(state.evaluation.V.copy())


class Progress(Observer):
    """Progress to convergence on stderr: a tqdm bar on a terminal, plain periodic lines otherwise.

    The flow stops at ``gap <= gap_tol`` or at ``t_end``, whichever comes first, so progress is the larger of the
    log-gap fraction ``log(g_0 / g) / log(g_0 / gap_tol)`` and the time fraction ``t / t_end`` (each clipped to
    [0, 1]; the log-gap fraction is 0 while ``gap_tol = 0`` or ``g >= g_0``). The gap of a linear-rate flow falls
    exponentially, so the log-gap fraction grows linearly in time once the rate has settled.

    The ETA is ``(1 - f) / f'`` with ``f'`` the progress per second over the most recent half of the elapsed wall
    time (the fast initial transient would make a whole-run average optimistic); ``?`` until there is such a
    window. Not a terminal (a pipe, a log file): one line per 10% of progress or every 30 s, whichever is
    first, and a last line at the end.

    Args:
        t_end: the final flow time (``flow.t_end``).
        gap_tol: the gap tolerance; None takes ``flow.gap_tol`` of the problem passed to :meth:`start`.
        stream: where to write (default ``sys.stderr``).
        every: seconds between plain lines.
    """

    def __init__(self, t_end: float, gap_tol: float | None = None, stream=None, every: float = 30.0):
        self.t_end = t_end
        self.gap_tol = gap_tol
        self.stream = stream
        self.every = every
        self._bar = None
        self._gap0 = None
        self._samples: list[tuple[float, float]] = []  # (wall time, progress)
        self._last_line = (-1.0, -1.0)  # (wall time, progress decile) of the last plain line
        self._start = 0.0
        self._drawn = 0.0
        self._row = None

    def start(self, problem) -> None:
        import sys
        import time

        if self.gap_tol is None:
            self.gap_tol = problem.config.flow.gap_tol
        self.stream = self.stream if self.stream is not None else sys.stderr
        self._start = time.perf_counter()
        if _isatty(self.stream):
            from tqdm import tqdm

            layout = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]"  # tqdm prefixes ", " to postfix
            self._bar = tqdm(total=1000, desc="flow", dynamic_ncols=True, bar_format=layout, file=self.stream)

    def fraction(self, t: float, gap: float) -> float:
        """Progress in [0, 1] at flow time ``t`` and gap ``gap`` (class docstring)."""
        by_time = min(max(t / self.t_end, 0.0), 1.0) if self.t_end > 0 else 1.0
        by_gap = 0.0
        g0, tol = self._gap0, self.gap_tol
        if g0 is not None and tol is not None and g0 > tol > 0 and math.isfinite(gap):
            by_gap = 1.0 if gap <= tol else min(max(math.log(g0 / gap) / math.log(g0 / tol), 0.0), 1.0)
        return max(by_time, by_gap)

    def eta(self, now: float, progress: float) -> float | None:
        """Seconds left at the recent rate of progress, or None if it cannot be estimated yet."""
        elapsed = now - self._start
        if progress >= 1.0:
            return 0.0
        # the samples are in time order: the last one at or before the half-way time, by bisection (O(log n))
        last = bisect.bisect_right(self._samples, (self._start + 0.5 * elapsed, math.inf))
        if not last or elapsed <= 0:
            return None
        w0, f0 = self._samples[last - 1]
        speed = (progress - f0) / (now - w0) if now > w0 else 0.0
        return (1.0 - progress) / speed if speed > 0 else None

    def observe(self, row: dict, state: FlowState) -> None:
        import time

        gap = row["gap"]
        if self._gap0 is None and math.isfinite(gap) and gap > 0:
            self._gap0 = gap
        now = time.perf_counter()
        progress = self.fraction(state.t, gap)
        self._samples.append((now, progress))
        if len(self._samples) > 4096:  # keep the memory bounded: every other old sample
            self._samples = self._samples[:2048:2] + self._samples[2048:]
        self._row = (state.t, gap, progress, None, now)
        # the ETA and the status text only when they are shown (at most 10 redraws a second, or a plain line)
        if self._bar is not None:
            self._bar.n = int(round(1000 * progress))
            if now - self._drawn > 0.1:
                self._bar.set_postfix_str(_status(state.t, self.t_end, gap, self.gap_tol, self.eta(now, progress)),
                                          refresh=False)
                self._bar.refresh()
                self._drawn = now
        elif int(10 * progress) > self._last_line[1] or now - self._last_line[0] >= self.every:
            self._line(progress, _status(state.t, self.t_end, gap, self.gap_tol, self.eta(now, progress)), now)

    def _line(self, progress: float, text: str, now: float) -> None:
        self._last_line = (now, float(int(10 * progress)))
        print(f"flow: {100 * progress:3.0f}% {text} elapsed {now - self._start:.1f} s", file=self.stream, flush=True)

    def finish(self, result) -> None:
        import time

        if self._bar is not None:
            if self._row is not None and getattr(result, "status", "") == "converged":
                self._bar.n = 1000
                self._bar.refresh()
            self._bar.close()
        elif self._row is not None and self.stream is not None:
            t, gap, progress, _, now = self._row
            status = getattr(result, "status", "")
            self._line(progress, _status(t, self.t_end, gap, self.gap_tol, None).split(" ETA")[0] + f" ({status})",
                       time.perf_counter())


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _status(t: float, t_end: float, gap: float, gap_tol: float | None, eta: float | None) -> str:
    """``t=3.1/60 gap=1.2e-05 -> 1e-10 ETA 12 s``."""
    gap_text = f"{gap:.2e}" if math.isfinite(gap) else "nan"
    tol = f" -> {gap_tol:.0e}" if gap_tol else ""
    if eta is None:
        left = "?"
    else:
        left = f"{eta:.1f} s" if eta < 10 else f"{eta:.0f} s" if eta < 600 else f"{eta / 60:.0f} min"
    return f"t={t:.4g}/{t_end:.4g} gap={gap_text}{tol} ETA {left}"
