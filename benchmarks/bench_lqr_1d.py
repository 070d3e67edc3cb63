"""Benchmark: cost of one WPG flow step on lqr_1d (121 states x 257 action DOFs) and time to gap 1e-10.

Prints a table of per-stage costs, the cost of the same step written as a plain vectorised-numpy
finite-volume code (dense N x M x N kernel tensor, einsum, batched Thomas algorithm), and the wall time
of a whole run to gap 1e-10. Run with ``make bench`` (or ``.venv/bin/python benchmarks/bench_lqr_1d.py``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from solver import bellman, config, diagnostics, experiment, flows

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
        fwd, bwd = tau / h * flows.bernoulli(-dg), tau / h * flows.bernoulli(dg)
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


def main():
    cfg = config.load(ROOT / "experiments" / "lqr_1d.toml")
    start = time.perf_counter()
    problem = experiment.build(cfg)
    setup = time.perf_counter() - start
    mdp, opt = problem.mdp, problem.optimum
    dt = cfg.flow.dt
    p = bellman.uniform_policy(mdp)
    ev = bellman.evaluate(mdp, p)
    g = flows.potential(mdp, ev.Q)
    masses = p * mdp.weights
    state = flows.FlowState(step=0, t=0.0, dt=0.0, p=p, evaluation=ev, g=g)

    stages = {
        "policy evaluation (P^pi, LU, solve, Q)": lambda: bellman.evaluate(mdp, p),
        "  of which Q = R + gamma T V": lambda: bellman.q_values(mdp, ev.V),
        "flow step (edge rates + banded solve)": lambda: flows.implicit_step(mdp.space, masses, g, mdp.tau, dt),
        "diagnostics row (dissipation, KL, adjoint)": lambda: diagnostics.record(mdp, state, 0.0),
    }
    print(f"lqr_1d: {mdp.n_states} states x {mdp.n_actions} action DOFs, kernel window {mdp.kernel.width} states")
    print(f"setup (mesh, kernel, soft policy iteration to 1e-12): {setup:.2f} s, {opt.iterations} SPI iterations\n")
    print(f"{'stage':48s} {'ms/step':>9s}")
    timings = {name: best_of(fn) for name, fn in stages.items()}
    for name, seconds in timings.items():
        print(f"{name:48s} {1e3 * seconds:9.2f}")
    ours = timings["policy evaluation (P^pi, LU, solve, Q)"] + timings["flow step (edge rates + banded solve)"]

    plain = PlainNumpyFV(mdp, problem.model)
    V_plain, Q_plain = plain.evaluate(p)
    assert np.allclose(V_plain, ev.V, rtol=1e-10, atol=1e-10), "baseline disagrees with wpgflow"
    step_plain = plain.step(p, Q_plain, dt)
    new = flows.implicit_step(mdp.space, masses, g, mdp.tau, dt) / mdp.weights
    assert np.allclose(step_plain, new, rtol=1e-9, atol=1e-12), "baseline step disagrees with wpgflow"
    baseline = best_of(lambda: plain.evaluate(p), number=3) + best_of(lambda: plain.step(p, Q_plain, dt), number=3)
    print(f"\n{'step = evaluation + flow step':48s} {1e3 * ours:9.2f}")
    print(f"{'plain numpy FV (dense tensor, Thomas loop)':48s} {1e3 * baseline:9.2f}   "
          f"(wpgflow is {baseline / ours:.1f}x faster)")

    start = time.perf_counter()
    result = experiment.run(problem)
    wall = time.perf_counter() - start
    steps = len(result.rows) - 1
    print(f"\nfull run to gap {result.rows[-1]['gap']:.2e} ({result.status}): {steps} steps, {wall:.2f} s, "
          f"{1e3 * wall / steps:.2f} ms per step including diagnostics")


if __name__ == "__main__":
    main()
