"""Benchmark: cost of one WPG flow step on lqr_1d (121 states x 257 action DOFs) and time to gap 1e-10.

Prints a table of per-stage costs, then, interleaved in one process (A B A B, medians), wpgflow's step as a run
takes it (flow step, evaluation of the new policy, its diagnostics row) against the same step written as a plain
vectorised-numpy finite-volume code (dense N x M x N kernel tensor, einsum, batched Thomas algorithm) -- as written
and with one BLAS thread (under load its 121 x 121 solve is ~30x slower with OpenBLAS's two threads on 2 cores)
-- and wpgflow without its compiled kernels (``WPGFLOW_NUMBA=0``), then the wall time of a whole run to gap
1e-10. Run with ``make bench`` (or ``.venv/bin/python benchmarks/bench_lqr_1d.py``).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from solver import bellman, config, diagnostics, flows, parallel, runner
from solver.flows import fokker_planck

ROOT = Path(__file__).resolve().parent.parent


def best_of(fn, repeat=5, number=10):
    """Best mean time per call over ``repeat`` batches of ``number`` calls (robust to machine noise)."""
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


class PlainNumpyFV:
    """The same step as a straightforward vectorised-numpy finite-volume code, for comparison."""

    def __init__(self, mdp, model):
        self.mdp = mdp
        states = mdp.states
        a = mdp.space.coords[:, 0]
        mean = model.dynamics(states[:, None], a[None, :])
        logits = -0.5 * ((states[None, None, :] - mean[..., None]) / model.sigma) ** 2
        T = np.exp(logits - logits.max(axis=-1, keepdims=True))
        self.T = T / T.sum(axis=-1, keepdims=True)  # (N, M, N) dense
        self.h = a[1] - a[0]

    def evaluate(self, p):
        mdp = self.mdp
        m = p * mdp.weights
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = np.where(p > 0, p * np.log(p), 0.0) @ mdp.weights
        r_pi = np.sum(m * mdp.reward, axis=1) - mdp.tau * ent
        P = np.einsum("ij,ijk->ik", m, self.T)
        V = np.linalg.solve(np.eye(mdp.n_states) - mdp.gamma * P, r_pi)
        return V, mdp.reward + mdp.gamma * np.einsum("ijk,k->ij", self.T, V)

    def step(self, p, Q, dt):
        """SG fluxes F = tau/h (B(-dg) p_j - B(dg) p_{j+1}); implicit Euler by the Thomas algorithm."""
        mdp = self.mdp
        w, h, tau = mdp.weights, self.h, mdp.tau
        dg = np.diff(Q / tau, axis=1)
        fwd, bwd = tau / h * fokker_planck.bernoulli(-dg), tau / h * fokker_planck.bernoulli(dg)
        n, M = p.shape
        lower = np.zeros((n, M))
        upper = np.zeros((n, M))
        diag = np.ones((n, M))
        diag[:, :-1] += dt * fwd / w[:-1]
        diag[:, 1:] += dt * bwd / w[1:]
        lower[:, 1:] = -dt * fwd / w[:-1]  # A[j+1, j]
        upper[:, :-1] = -dt * bwd / w[1:]  # A[j, j+1]
        b = p * w
        c, d = np.zeros((n, M)), np.zeros((n, M))
        c[:, 0], d[:, 0] = upper[:, 0] / diag[:, 0], b[:, 0] / diag[:, 0]
        for j in range(1, M):
            denom = diag[:, j] - lower[:, j] * c[:, j - 1]
            c[:, j] = upper[:, j] / denom
            d[:, j] = (b[:, j] - lower[:, j] * d[:, j - 1]) / denom
        x = np.zeros((n, M))
        x[:, -1] = d[:, -1]
        for j in range(M - 2, -1, -1):
            x[:, j] = d[:, j] - c[:, j] * x[:, j + 1]
        return x / w


def interleaved(a, b, pairs: int = 7, number: int = 5) -> tuple[float, float]:
    """Medians over ``pairs`` interleaved batches (A B A B ...) of the mean time of ``number`` calls each."""
    ta, tb = [], []
    for _ in range(pairs):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            out.append((time.perf_counter() - start) / number)
    return statistics.median(ta), statistics.median(tb)


class Stepper:
    """wpgflow's step as a run takes it: advance the flow, evaluate the new policy, and the diagnostics row."""

    def __init__(self, problem, diagnostics_row: bool = True):
        self.problem, self.row = problem, diagnostics_row
        self.flow = runner.make_flow(problem)
        self.states = flows.trajectory(self.flow, bellman.uniform_policy(problem.mdp))
        self.state = next(self.states)
        self.previous = diagnostics.record(self.flow, self.state, problem.J_star) if diagnostics_row else None

    def __call__(self):
        self.state.release()
        self.state = next(self.states)
        if self.row:
            self.previous = diagnostics.record(self.flow, self.state, self.problem.J_star, self.previous)


def main():
    cfg = config.load(ROOT / "experiments" / "lqr_1d.toml")
    start = time.perf_counter()
    problem = runner.build(cfg)
    setup = time.perf_counter() - start
    mdp, opt = problem.mdp, problem.optimum
    dt = cfg.flow.dt
    p = bellman.uniform_policy(mdp)
    ev = bellman.evaluate(mdp, p)
    g = flows.potential(mdp, ev.Q)
    masses = p * mdp.weights
    flow = runner.make_flow(problem)
    state = flows.FlowState(step=0, t=0.0, dt=0.0, p=p, evaluation=ev, g=g)
    kernel = mdp.kernel
    print(f"lqr_1d: {mdp.n_states} states x {mdp.n_actions} action DOFs, kernel window {kernel.width} states; "
          f"T V by interpolation: {kernel.interpolation is not None}"
          + (f" (operator error {kernel.interpolation.error:.1e})" if kernel.interpolation is not None else ""))
    print(f"setup (mesh, kernel, soft policy iteration to 1e-12): {setup:.2f} s, {opt.iterations} SPI iterations")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n")

    dense_P = kernel.dense_policy_matrix(masses)
    print(f"P^pi by interpolation over a grid of means: {dense_P is not None}"
          + (f" (operator error {kernel.policy_interpolation.error:.1e}, max |P - P_windowed| "
             f"{np.abs(dense_P - kernel.policy_matrix(masses).toarray()).max():.1e})" if dense_P is not None else ""))
    rates = fokker_planck.edge_rates(mdp.space, g, mdp.tau)
    compiled = parallel.compiled(fokker_planck._thomas_chain, fokker_planck.THOMAS_SIGNATURE) is not None
    print(f"compiled chain solve (numba): {compiled}\n")

    def numpy_only(fn):
        """``fn`` with the compiled kernels off (the pure-numpy path)."""
        def run():
            before = os.environ.get(parallel.NUMBA_VARIABLE)
            os.environ[parallel.NUMBA_VARIABLE] = "0"
            try:
                return fn()
            finally:
                if before is None:
                    del os.environ[parallel.NUMBA_VARIABLE]
                else:
                    os.environ[parallel.NUMBA_VARIABLE] = before
        return run

    stages = {
        "policy evaluation (P^pi, LU, solve, Q)": lambda: bellman.evaluate(mdp, p),
        "  of which P^pi (as evaluate takes it)": lambda: (kernel.dense_policy_matrix(masses) if dense_P is not None
                                                           else kernel.policy_matrix(masses)),
        "  (P^pi windowed, dense band einsum, CSR)": lambda: kernel.policy_matrix(masses),
        "  of which the LU of I - gamma P^pi": lambda: bellman.Resolvent(
            dense_P if dense_P is not None else ev.resolvent_P, mdp.gamma),
        "  of which Q = R + gamma T V": lambda: bellman.q_values(mdp, ev.V),
        "flow step (edge rates + chain solve)": lambda: fokker_planck.implicit_step(mdp.space, masses, g, mdp.tau, dt),
        "  of which the solve (rates given)": lambda: fokker_planck.implicit_step(mdp.space, masses, g, mdp.tau, dt,
                                                                                  rates=rates),
        "  (the solve, numpy/LAPACK gbsv)": numpy_only(lambda: fokker_planck.implicit_step(
            mdp.space, masses, g, mdp.tau, dt, rates=rates)),
        "diagnostics row (dissipation, KL, adjoint)": lambda: diagnostics.record(flow, state, 0.0),
    }
    ev.resolvent_P = kernel.policy_matrix(masses)
    print(f"{'stage':48s} {'ms/step':>9s}")
    for name, fn in stages.items():
        print(f"{name:48s} {1e3 * best_of(fn):9.2f}")

    plain = PlainNumpyFV(mdp, problem.model)
    V_plain, Q_plain = plain.evaluate(p)
    assert np.allclose(V_plain, ev.V, rtol=1e-10, atol=1e-10), "baseline disagrees with wpgflow"
    step_plain = plain.step(p, Q_plain, dt)
    new = fokker_planck.implicit_step(mdp.space, masses, g, mdp.tau, dt) / mdp.weights
    assert np.allclose(step_plain, new, rtol=1e-9, atol=1e-12), "baseline step disagrees with wpgflow"

    def plain_step():
        plain.step(p, plain.evaluate(p)[1], dt)

    def plain_step_one_thread():
        """The baseline without OpenBLAS's second thread: its 121 x 121 ``np.linalg.solve`` costs ~3.5 ms with
        two threads on 2 cores and ~0.1 ms with one (the threading artefact wpgflow avoids)."""
        with parallel.single_threaded_blas(mdp.n_states):
            plain_step()

    print(f"\ninterleaved (A B A B), medians of 7 pairs of 5 steps; load average {os.getloadavg()[0]:.1f}:")
    print(f"{'':48s} {'ms/step':>9s}   {'wpgflow / plain':>15s}")
    pairs = [("wpgflow step + diagnostics row", Stepper(problem), plain_step, "plain numpy step"),
             ("wpgflow step alone", Stepper(problem, diagnostics_row=False), plain_step, "plain numpy step"),
             ("wpgflow step + diagnostics row", Stepper(problem), plain_step_one_thread,
              "plain numpy step, one BLAS thread"),
             ("wpgflow step + row, pure numpy (no numba)", numpy_only(Stepper(problem)), plain_step,
              "plain numpy step")]
    for name, ours, theirs, base_name in pairs:
        a, b = interleaved(ours, theirs)
        target = " (target <= 0.3)" if name == "wpgflow step + diagnostics row" else ""
        print(f"{base_name:48s} {1e3 * b:9.2f}")
        print(f"{'  ' + name:48s} {1e3 * a:9.2f}   {a / b:15.2f}{target}")

    print("\ntime to gap 1e-10 from the uniform policy (runner.run: steps with their diagnostics rows, no observers)")
    print(f"{'flow':40s} {'dt':>6s} {'steps':>6s} {'s':>8s} {'ms/step':>8s} {'final gap':>10s}")
    variants = [("wasserstein", {}), ("wasserstein", {"integrator": "exponential", "dt": 0.25}),
                ("fisher_rao", {}), ("policy_iteration", {})]
    for kind, options in variants:
        variant = replace(cfg, flow=replace(cfg.flow, kind=kind, gap_tol=1e-10, t_end=100.0, **options))
        run_problem = runner.Problem(config=variant, model=problem.model, mdp=mdp, optimum=opt)
        start = time.perf_counter()
        result = runner.run(run_problem)
        wall = time.perf_counter() - start
        steps = len(result.rows) - 1
        name = kind + (f" ({options['integrator']})" if "integrator" in options else "")
        print(f"{name:40s} {variant.flow.dt:6.2f} {steps:6d} {wall:8.2f} {1e3 * wall / steps:8.2f} "
              f"{result.rows[-1]['gap']:10.2e}")


if __name__ == "__main__":
    main()
