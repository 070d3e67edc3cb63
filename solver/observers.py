"""Observers of the flow loop: each is called as ``observer(row, state)`` after every flow state.

They record, report and keep; they never change the flow (the stepper stays pure).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable

import numpy as np

from .diagnostics import HISTORY_COLUMNS
from .flows import FlowState


class HistoryCSV:
    """Observer writing one ``history.csv`` row per flow state, flushed at once."""

    def __init__(self, path: Path):
        self._file = open(path / "history.csv", "w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(HISTORY_COLUMNS)

    def __call__(self, row: dict, state: FlowState) -> None:
        self._writer.writerow([repr(float(row[c])) for c in HISTORY_COLUMNS])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Snapshots:
    """Observer keeping the policy at ``t = 0``, then at geometrically spaced times up to ``t_end``.

    Geometric spacing resolves the fast initial transient and the slow tail alike; the last state of the
    run is added by :meth:`finish`, so a run that converges early still ends on its final policy.

    Args:
        count: number of target times (``output.snapshots``).
        first: the first positive target time; the others are geometrically spaced up to ``t_end``.
        t_end: the last target time.
        states: the state rows whose policies are kept (:func:`solver.outputs.snapshot_states`), or None for all.
            ``V^pi`` is kept at every state whatever ``states`` (``N`` doubles per snapshot).
        on_snapshot: called with each snapshot's flow state while its evaluation is alive (the local-rate check
            of :class:`solver.lsi.LocalRates` runs there, so no snapshot policy is evaluated again).
    """

    def __init__(self, count: int, first: float, t_end: float, states: np.ndarray | None = None,
                 on_snapshot: Callable[[FlowState], None] | None = None):
        self.targets = np.concatenate([[0.0], np.geomspace(first, t_end, count - 1)])
        self.states = states
        self.on_snapshot = on_snapshot
        self.times: list[float] = []
        self.policies: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self._next = 0

    def __call__(self, row: dict, state: FlowState) -> None:
        if self._next < self.targets.size and state.t >= self.targets[self._next] * (1 - 1e-12):
            self._keep(state)
            while self._next < self.targets.size and self.targets[self._next] <= state.t * (1 + 1e-12):
                self._next += 1

    def finish(self, state: FlowState | None) -> None:
        if state is not None and (not self.times or self.times[-1] < state.t):
            self._keep(state)

    def _keep(self, state: FlowState) -> None:
        self.times.append(state.t)
        self.policies.append(state.p.copy() if self.states is None else state.p[self.states])
        self.values.append(state.evaluation.V.copy())
        if self.on_snapshot is not None:
            self.on_snapshot(state)


class Progress:
    """A tqdm progress bar (on stderr) over flow time, showing the current gap."""

    def __init__(self, t_end: float):
        from tqdm import tqdm

        layout = "{desc}: {percentage:3.0f}%|{bar}| t={n:.3g}/{total:.3g} [{elapsed}<{remaining}] {postfix}"
        self._bar = tqdm(total=t_end, unit="t", desc="flow", dynamic_ncols=True, bar_format=layout)
        self._t = 0.0

    def __call__(self, row: dict, state: FlowState) -> None:
        self._bar.update(state.t - self._t)
        self._t = state.t
        gap = row["gap"]
        self._bar.set_postfix_str(f"gap={gap:.2e}" if math.isfinite(gap) else "gap=nan", refresh=False)

    def close(self) -> None:
        self._bar.close()
