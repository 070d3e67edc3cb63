"""Benchmark: what the observers of a default ``wpgflow run`` add to the time loop (issue 14).

For ``lqr_1d`` (121 states x 257 DOFs) and ``lqr_2d_action`` (41 states x 1201 DOFs), interleaved in one process
(A B C A B C ..., medians):

* A, the loop of a default CLI run: :func:`solver.runner.run` with the observers of
  :func:`solver.runner.run_observers` (``history.csv``, snapshots, the along-flow rate check, the hypothesis ledger,
  the progress lines) and a checkpoint every ``output.checkpoint_every`` steps, to convergence;
  ``time_per_step_s`` exactly as :func:`solver.runner.summarise` computes it (``loop_time / steps``);
* B, the bare step + diagnostics row of ``benchmarks/bench_lqr_1d.py`` (:class:`bench_lqr_1d.Stepper`: flow step,
  evaluation of the new policy, its history row) from the uniform policy;
* C, the same loop without observers (``runner.run(problem)``): the step + row along the same trajectory.

It prints ``time_per_step_s / B`` (the issue's bar: <= 1.2) and ``/ C``, each observer's share of the loop (the time
spent in its ``start`` and ``observe`` over ``loop_time``; the checkpoints too; ``finish`` runs after ``loop_time`` is
taken and is printed apart), and ``loop / (loop - observers - checkpoints)`` within the same run, which a changing
machine load does not bias (A, B and C run seconds apart). Run with
``.venv/bin/python benchmarks/bench_observers.py [--pairs 5] [--only lqr_1d]``.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from solver import config, runner
from solver.checkpoint import Checkpointer
from solver.observers import Observer, Progress

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lqr_1d import Stepper  # noqa: E402 - the benchmarks directory is not a package

ROOT = Path(__file__).resolve().parent.parent


class Timed(Observer):
    """An observer that forwards every call to ``inner`` and adds the time it took to ``seconds``."""

    def __init__(self, inner: Observer):
        self.inner, self.seconds, self.after = inner, 0.0, 0.0

    def _timed(self, name, *args):
        start = time.perf_counter()
        try:
            return getattr(self.inner, name)(*args)
        finally:
            elapsed = time.perf_counter() - start
            if name == "finish":
                self.after += elapsed  # after loop_time was taken (runner.run)
            else:
                self.seconds += elapsed

    def start(self, problem):
        self._timed("start", problem)

    def observe(self, row, state):
        self._timed("observe", row, state)

    def finish(self, result):
        self._timed("finish", result)

    def checkpoint_state(self):
        return self.inner.checkpoint_state()


class TimedCheckpoint:
    """A :class:`~solver.checkpoint.Checkpointer` whose calls are timed (the last one, after the loop, is inside
    ``loop_time`` too: :func:`solver.runner.run` writes it before it stops the clock)."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def __call__(self, state, final=None):
        start = time.perf_counter()
        try:
            return self.inner(state, final)
        finally:
            self.seconds += time.perf_counter() - start


def cli_loop(problem, out: Path) -> tuple[float, int, dict[str, float], dict[str, float]]:
    """One default CLI loop: ``(time_per_step_s, steps, {observer: share of loop_time}, {observer: seconds of
    its finish})`` (``finish`` runs after ``loop_time`` is taken, so it is not in ``time_per_step_s``)."""
    observers = runner.checked_observers(problem, out, progress_bar=True)
    for o in observers:
        if isinstance(o, Progress):
            o.stream = io.StringIO()  # the plain progress lines, not on the terminal
    timed = [Timed(o) for o in observers]
    every = problem.config.output.checkpoint_every
    flow = runner.make_flow(problem)
    checkpoint = TimedCheckpoint(Checkpointer(out, problem.config, flow, observers))
    result = runner.run(problem, timed, flow=flow, checkpoint=checkpoint if every else None, checkpoint_every=every)
    steps = len(result.rows) - 1
    shares = {type(t.inner).__name__: t.seconds / result.loop_time for t in timed}
    shares["checkpoints"] = checkpoint.seconds / result.loop_time
    return result.loop_time / steps, steps, shares, {type(t.inner).__name__: t.after for t in timed}


def bare_loop(problem) -> float:
    """Per step of ``runner.run`` without observers (step + row along the same trajectory)."""
    result = runner.run(problem)
    return result.loop_time / (len(result.rows) - 1)


def stepper_batch(stepper: Stepper, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        stepper()
    return (time.perf_counter() - start) / number


def bench(name: str, pairs: int, number: int) -> None:
    cfg = config.load(ROOT / "experiments" / f"{name}.toml")
    problem = runner.build(cfg)
    mdp = problem.mdp
    print(f"\n{name}: {mdp.n_states} states x {mdp.n_actions} action DOFs, load average {os.getloadavg()[0]:.1f}")
    cli, bare, step, shares, after, steps = [], [], [], [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        stepper = Stepper(problem)
        for _ in range(pairs):
            per, steps, share, finish = cli_loop(problem, Path(tmp))
            cli.append(per)
            shares.append(share)
            after.append(finish)
            step.append(stepper_batch(stepper, number))
            bare.append(bare_loop(problem))
            stepper = Stepper(problem)  # a fresh trajectory from the uniform policy each pair
    a, b, c = statistics.median(cli), statistics.median(step), statistics.median(bare)
    print(f"medians of {pairs} interleaved rounds (a CLI loop of {steps} steps, {number} bench steps, a bare loop)")
    print(f"  {'default CLI loop: time_per_step_s':52s} {1e3 * a:8.2f} ms")
    print(f"  {'bench step + diagnostics row (bench_lqr_1d.Stepper)':52s} {1e3 * b:8.2f} ms   "
          f"ratio {a / b:.2f} (target <= 1.2)")
    print(f"  {'runner.run without observers (same trajectory)':52s} {1e3 * c:8.2f} ms   ratio {a / c:.2f}")
    inside = statistics.median(1.0 / (1.0 - sum(s.values())) for s in shares)
    print(f"  {'within the CLI loop: loop / (loop - observers - checkpoints)':60s}   ratio {inside:.2f}")
    print(f"  {'share of the CLI loop (median)':28s} {'finish, after the loop':>24s}")
    for key in shares[0]:
        end = f"{1e3 * statistics.median(f[key] for f in after):9.1f} ms" if key in after[0] else ""
        print(f"    {key:24s} {100 * statistics.median(s[key] for s in shares):5.1f}% {end:>22s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="interleaved rounds (medians)")
    parser.add_argument("--number", type=int, default=100, help="bench steps per round")
    parser.add_argument("--only", choices=("lqr_1d", "lqr_2d_action"), default=None)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores")
    for name in ("lqr_1d", "lqr_2d_action"):
        if args.only in (None, name):
            bench(name, args.pairs, args.number)


if __name__ == "__main__":
    main()
