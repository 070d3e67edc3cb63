"""The cheaper observers and diagnostics of issue 14 against their plain definitions: the same numbers (bit for
bit where the operations are the same, to round-off where a factorisation changed), and the certified gap still a
lower bound (solver/diagnostics.py, solver/lsi.py, solver/along_flow.py, solver/ledger.py, solver/observers.py)."""

import io
import math
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg as sla

from solver import (bellman, budget, checkpoint, config, diagnostics, flows, ledger, lsi, outputs, parallel,
                    regularity, runner)
from solver.along_flow import state_constants
from solver.fem import rectangle_space
from solver.mdp import GaussianGridKernel
from solver.observers import Progress

ROOT = Path(__file__).resolve().parent.parent
TINY_LQR = ["states.n=13", "actions.cells=32", "flow.t_end=0.3", "flow.dt=0.05"]


@pytest.fixture(scope="module")
def lqr():
    problem = runner.build(config.load(ROOT / "experiments" / "lqr_1d.toml", TINY_LQR))
    states = list(flows.trajectory(runner.make_flow(problem), bellman.uniform_policy(problem.mdp), 0.1))
    return problem, states


def test_kl_to_gibbs_is_the_plain_kl_bit_for_bit(lqr, monkeypatch):
    """KL(p || G) from the state's potential g equals kl_divergence(p, log_gibbs(Q)) exactly, with zero masses (the
    masked path) and across chunks of states (KL_CHUNK_BYTES made small)."""
    problem, states = lqr
    mdp, state = problem.mdp, states[-1]
    p = state.p.copy()
    p[3, :5] = 0.0  # 0 log 0 = 0
    plain = bellman.kl_divergence(mdp, p, bellman.log_gibbs(mdp, state.evaluation.Q)[0])
    assert np.array_equal(diagnostics.kl_to_gibbs(mdp, p, state.g), plain)
    assert np.array_equal(diagnostics.kl_to_gibbs(mdp, state.p, state.g, positive=True),
                          bellman.kl_divergence(mdp, state.p, bellman.log_gibbs(mdp, state.evaluation.Q)[0]))
    # the evaluation's log p (every p >= tiny here) instead of log p: the same numbers
    log_p = bellman.policy_log(state.p)
    assert np.array_equal(diagnostics.kl_to_gibbs(mdp, state.p, state.g, True, log_p),
                          diagnostics.kl_to_gibbs(mdp, state.p, state.g, True))
    monkeypatch.setattr(budget, "KL_CHUNK_BYTES", 8 * mdp.n_actions * 4)  # chunks of 4 states
    assert np.array_equal(diagnostics.kl_to_gibbs(mdp, p, state.g), plain)
    chunked = diagnostics.kl_to_gibbs(mdp, state.p, state.g, True, log_p)
    assert np.array_equal(chunked, diagnostics.kl_to_gibbs(mdp, state.p, state.g, True))


def test_compiled_sturm_counts_and_minorant_equal_the_numpy_ones(monkeypatch):
    """The compiled Sturm sweep and convex minorant (lsi._sturm_sweep, lsi._minorant_kernel) do the numpy paths'
    operations: the same counts (shifts at eigenvalues, pivots hitting zero included) and the same minorant, bit
    for bit."""
    monkeypatch.setattr(lsi, "COMPILED_MIN_ENTRIES", 0)  # compiled at any size
    if parallel.compiled(lsi._sturm_sweep, lsi.STURM_SIGNATURE) is None:
        pytest.skip("numba is not installed or cannot compile here")
    rng = np.random.default_rng(3)
    diag = rng.uniform(1.0, 9.0, (6, 40))
    off = -rng.uniform(0.1, 3.0, (6, 39))
    eig = np.array([sla.eigh_tridiagonal(d, o, eigvals_only=True) for d, o in zip(diag, off)])
    middle = 0.5 * (eig[:, :1] + eig[:, 1:2])  # one eigenvalue below
    x = np.concatenate([middle, eig[:, [0, 1, 5]], rng.uniform(-1.0, 12.0, (6, 9)), np.full((6, 1), diag[0, 0])],
                       axis=1)
    a = np.linspace(-3.0, 3.0, 41)
    f = rng.normal(size=(9, a.size)).cumsum(axis=1) + a ** 2
    compiled = lsi.sturm_counts(diag, off, x), lsi._convex_minorant_1d(a, f)
    monkeypatch.setenv(parallel.NUMBA_VARIABLE, "0")
    plain = lsi.sturm_counts(diag, off, x), lsi._convex_minorant_1d(a, f)
    assert np.array_equal(compiled[0], plain[0]) and np.array_equal(compiled[1], plain[1])
    assert np.array_equal(plain[0][:, 0], np.ones(6))  # sanity: one eigenvalue below (lambda_0 + lambda_1) / 2


def test_checkpoint_wall_time_rule(lqr, tmp_path, monkeypatch):
    """A large run (policy of CHECKPOINT_MIN_ENTRIES entries or more) skips a periodic checkpoint until
    max(CHECKPOINT_INTERVAL, cost / CHECKPOINT_SHARE) seconds have passed since the last one; a small run writes
    every period; the end of the loop is always written."""
    problem, states = lqr
    flow = runner.make_flow(problem)
    flow.start(states[-1].p)
    state = states[-1]
    ck = checkpoint.Checkpointer(tmp_path, problem.config, flow, [])
    assert ck(state, final=False)  # small: every period
    monkeypatch.setattr(checkpoint, "CHECKPOINT_MIN_ENTRIES", state.p.size)  # now a large run
    ck._last = (time.perf_counter(), 0.0)  # the first checkpoint has just been written
    assert not ck.due(state) and not ck(states[0], final=False)
    ck.written = False
    assert ck.due(state)  # the first checkpoint of a run is always written
    ck.written = True
    assert ck(state, final=True)  # the end of the loop: always written
    assert outputs.read_checkpoint(tmp_path)[1]["step"] == state.step
    ck._last = (time.perf_counter() - 1.01 * checkpoint.CHECKPOINT_INTERVAL, 0.0)
    assert ck.due(state)  # the interval has passed
    ck._last = (time.perf_counter() - 1.01 * checkpoint.CHECKPOINT_INTERVAL, 1.0)  # but it took 1 s to write
    assert not ck.due(state)


def test_ledger_bounds_from_parts_equal_apriori_bounds(lqr):
    """The a-priori bounds made before the loop (at osc V = 0) and widened to the first state's osc V equal
    regularity.apriori_bounds at that V bit for bit, also for a larger osc V (a non-monotone flow)."""
    problem, states = lqr
    gaussian = isinstance(problem.mdp.kernel, GaussianGridKernel)
    led = ledger.Ledger(problem)
    V0 = states[0].evaluation.V
    for V in (V0, V0 - 3.0):
        led._set_bounds(V)
        direct = regularity.apriori_bounds(problem.model, problem.mdp, problem.optimum.V, V, gaussian)
        for name in ("dQ", "d2Q", "oscQ", "osc_V"):
            assert np.array_equal(getattr(led.bounds, name), getattr(direct, name), equal_nan=True), name
        wider = led.bounds.at(led.bounds.osc_V + 1.0)
        again = regularity.apriori_bounds(problem.model, problem.mdp, problem.optimum.V,
                                          np.full_like(V, problem.optimum.V.max() - led.bounds.osc_V - 1.0), gaussian)
        assert np.allclose(wider.d2Q, again.d2Q, rtol=1e-14) and np.allclose(wider.oscQ, again.oscQ, rtol=1e-14)


def test_progress_eta_by_bisection_is_the_linear_scan():
    """Progress.eta finds the last sample at or before half the elapsed time by bisection: the same sample as a
    scan of the whole list."""
    bar = Progress(10.0, gap_tol=1e-10, stream=io.StringIO())
    bar._start = 0.0
    rng = np.random.default_rng(0)
    times = np.sort(rng.uniform(0, 10, 200))
    bar._samples = [(float(w), float(w / 20)) for w in times]
    for now in (0.5, 3.3, 7.0, 9.99, 12.0):
        half = 0.5 * now
        past = [s for s in bar._samples if s[0] <= half]
        progress = 0.9 * now / 20
        expected = None if not past else ((1 - progress) / ((progress - past[-1][1]) / (now - past[-1][0]))
                                          if progress > past[-1][1] else None)
        assert bar.eta(now, progress) == expected


def test_banded_deflated_gap_is_the_eigenvalue_and_a_lower_bound():
    """2D meshes: the banded Cholesky + rank-one deflated Lanczos gap equals the dense eigenvalue lambda_2 of the
    symmetrised generator to round-off; with a wrong null vector it is still <= lambda_2 (rank-one interlacing);
    the band holds S exactly."""
    space = rectangle_space((-2.0, -2.0), (2.0, 2.0), (8, 8))
    b = space.coords
    g = np.stack([-np.sum((b - c) ** 2, axis=1) / 0.6 + 0.3 * np.sin(3 * b[:, 0]) for c in (0.3, -0.8)])
    diag, off = lsi.symmetrised_generator(space, g, 0.5)
    log_pi = lsi.log_stationary(space, g)
    bd = lsi.band(space)
    assert np.array_equal(np.sort(bd.perm), np.arange(space.n_dofs)) and np.array_equal(bd.perm[bd.inv],
                                                                                          np.arange(space.n_dofs))
    j, k = space.edges[:, 0], space.edges[:, 1]
    for s in range(2):
        S = np.diag(diag[s])
        S[j, k] = S[k, j] = off[s]
        exact = sla.eigh(S, eigvals_only=True, subset_by_index=(1, 1))[0]
        ab = np.zeros((bd.width + 1, space.n_dofs))
        ab[bd.width, bd.inv] = diag[s]
        ab[bd.row, bd.col] = off[s]
        P = S[np.ix_(bd.perm, bd.perm)]
        for d in range(bd.width + 1):  # upper band storage: ab[b - d, i + d] = P[i, i + d]
            assert np.array_equal(ab[bd.width - d, d:], np.diagonal(P, d))
        value, vector = lsi.deflated_gap(bd, diag[s], off[s], log_pi[s])
        assert value == pytest.approx(exact, rel=1e-11)  # round-off of the band solves
        assert np.linalg.norm(S @ vector - value * vector) <= 1e-8 * value
        wrong = log_pi[s] + 0.5 * np.sin(7 * b[:, 1])  # not the null vector: the bound is lower, never higher
        assert lsi.deflated_gap(bd, diag[s], off[s], wrong)[0] <= exact * (1 + 1e-12)
    ell, vectors, recomputed = lsi.gap_lower_bounds(space, g, 0.5)
    assert recomputed.all() and np.all(ell <= [lsi.chain_gap(lsi.log_stationary(space, row)[0], space.edges,
                                                              lsi.log_conductances(space, row, 0.5)[0])[0]
                                               for row in g])


def test_log_bernoulli_and_greatest_convex_minorant():
    """log B(x) = log(x / (e^x - 1)) by one formula for both signs (and -x/2 below 1e-8); the 1D convex minorant of
    the split bound is the greatest one: at every node the minimum over the chords of points on both sides
    (brute force), convex, below f and equal to f at the ends, on noisy and on exactly linear rows."""
    x = np.array([-30.0, -2.0, -1e-7, -1e-9, 0.0, 1e-9, 1e-7, 0.5, 3.0, 40.0, 800.0, -800.0])
    direct = np.array([math.log(v / math.expm1(v)) if abs(v) >= 1e-8 and abs(v) < 700 else math.nan for v in x])
    got = lsi.log_bernoulli(x)
    finite = np.isfinite(direct)
    # B itself to 1e-14 relative (log B to 1e-14 absolute: log|x| - log expm1|x| cancels at small |x|; the former
    # log1p(-exp(-|x|)) lost 1e-9 at |x| = 1e-7)
    assert np.allclose(got[finite], direct[finite], rtol=1e-13, atol=1e-14)
    assert np.array_equal(got[np.abs(x) < 1e-8], -0.5 * x[np.abs(x) < 1e-8])
    assert got[-2] == pytest.approx(math.log(800.0) - 800.0, rel=1e-15) and got[-1] == pytest.approx(math.log(800.0))
    rng = np.random.default_rng(2)
    a = np.sort(rng.uniform(-3.0, 3.0, 31))
    f = np.concatenate([rng.normal(size=(8, a.size)).cumsum(axis=1) + a ** 2, 0.3 * a[None, :] - 1.0])
    phi = lsi._convex_minorant_1d(a, f)
    i, j, k = np.meshgrid(np.arange(a.size), np.arange(a.size), np.arange(a.size), indexing="ij")
    chords = (i < j) & (j < k)
    brute = f.copy()
    span = np.where(chords, a[k] - a[i], 1.0)
    for r in range(f.shape[0]):
        value = f[r, i] + (f[r, k] - f[r, i]) * (a[j] - a[i]) / span
        brute[r] = np.minimum(f[r], np.where(chords, value, np.inf).min(axis=(0, 2)))
    assert np.allclose(phi, brute, rtol=0, atol=1e-12)  # round-off of the interpolation between hull vertices
    assert np.all(phi <= f + 1e-12) and np.array_equal(phi[:, [0, -1]], f[:, [0, -1]])
    slopes = np.diff(phi, axis=1) / np.diff(a)
    assert np.all(np.diff(slopes, axis=1) >= -1e-9)


def test_state_constants_middle_level_keeps_the_minimum(lqr):
    """The branch and bound's middle level (the split at the previous step alone) prunes states, never the
    minimum: min C_lo and the informative flags equal those of refining every state with its three steps."""
    problem, states = lqr
    mdp = problem.mdp
    first = state_constants(mdp, states[0].evaluation.Q, "sg", g=states[0].g)
    around = np.where(first.kappa_step >= 0, first.kappa_step, 3)
    state = states[-1]
    sc = state_constants(mdp, state.evaluation.Q, "sg", g=state.g, around=around)
    full, _, _ = lsi.many_lower_bounds(mdp.space, state.g, None, around)
    assert sc.C_lo.min() == pytest.approx(full.min(), rel=1e-12)
    assert np.all(sc.C_lo <= full * (1 + 1e-12))  # every value a lower bound of the full one
    assert np.array_equal(sc.informative, full >= 1e-6 * sc.ell / mdp.tau)
    cold = state_constants(mdp, state.evaluation.Q, "sg", g=state.g)  # no warm start: every step at full refinement
    every, _, _ = lsi.many_lower_bounds(mdp.space, state.g)
    assert cold.C_lo.min() == pytest.approx(every.min(), rel=1e-12) and np.all(cold.C_lo <= every * (1 + 1e-12))


def test_shared_cell_masses_are_the_plain_logarithmic_means(lqr):
    """regularity.cell_masses (one exponential per DOF, shared by the ledger's I(p) and I(p | G)) equals the plain
    1D formula h (p_k - p_j) / (log p_k - log p_j), h sqrt(p_j p_k) where the logs are within 1e-8, bit for bit,
    zero densities included; log_linear_fisher with or without it is the same."""
    problem, states = lqr
    mdp = problem.mdp
    p = states[-1].p.copy()
    p[2, 4:7] = 0.0
    p[3, 9] = p[3, 10]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.log(p)
        l0, l1 = log_p[:, :-1], log_p[:, 1:]
        d = l1 - l0
        small = np.abs(d) < 1e-8
        h = np.diff(mdp.space.coords[:, 0])
        plain = np.where(small, np.exp(0.5 * (l0 + l1)), (np.exp(l1) - np.exp(l0)) / np.where(small, 1.0, d)) * h
        mass = regularity.cell_masses(mdp.space, log_p)
        assert small.any() and np.array_equal(mass, plain, equal_nan=True)
        log_g = bellman.log_gibbs(mdp, states[-1].evaluation.Q)[0]
        for ref in (None, log_g):
            shared = regularity.log_linear_fisher(mdp.space, log_p, ref, mass=mass)
            alone = regularity.log_linear_fisher(mdp.space, log_p, ref)
            assert all(np.array_equal(x, y, equal_nan=True) for x, y in zip(shared, alone))


def test_vectorised_2d_ledger_quantities_equal_the_per_node_ones():
    """2D actions: the patch fits by groups of equal patch size equal the per-node products, the closed-form 2x2
    eigenvalues LAPACK's, and the vectorised log-linear Fisher information the per-state loop (round-off: sums over
    a patch or the cells in another order; the patch pseudo-inverses amplify it ~100x)."""
    space = rectangle_space((-2.0, -2.0), (2.0, 2.0), (6, 6))
    b = space.coords
    u = np.stack([-np.sum((b - c) ** 2, axis=1) / 0.6 + 0.3 * np.sin(3 * b[:, 0]) for c in (0.3, -0.8, 1.1)])
    fits = regularity.patch_fits(space.coords, space.edges)
    grad, hess = regularity.recovered_2d(fits, u)
    per_node = regularity.PatchFits(nodes=fits.nodes, pinv=fits.pinv)  # no groups: one product per node
    grad0, hess0 = regularity.recovered_2d(per_node, u)
    assert np.allclose(grad, grad0, rtol=0, atol=1e-12 * np.abs(grad0).max())
    assert np.allclose(hess, hess0, rtol=0, atol=1e-12 * np.abs(hess0).max())
    eig = regularity.symmetric_2x2_eigenvalues(hess)
    assert np.allclose(eig, np.linalg.eigvalsh(hess), rtol=0, atol=1e-14 * np.abs(hess).max())
    linear = np.array([0.7, -1.3])
    assert regularity.log_linear_fisher(space, (b @ linear)[None, :])[1][0] == pytest.approx(np.hypot(*linear),
                                                                                             rel=1e-13)  # P1 exact
    log_p = u - np.log(np.exp(u).sum(axis=1, keepdims=True))
    fisher, sup = regularity.log_linear_fisher(space, log_p)
    x = space.coords[space.cells]
    e1, e2 = x[:, 1] - x[:, 0], x[:, 2] - x[:, 0]
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    for i in range(u.shape[0]):  # the plain per-state formula
        v = log_p[i][space.cells]
        d = np.stack([v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]], -1)[..., None]  # (C, 2, 1): numpy 2 needs the column
        g = np.linalg.solve(np.stack([e1, e2], axis=1), d)[..., 0]
        mass = 0.5 * np.abs(det) * np.exp(v).mean(axis=1)
        assert fisher[i] == pytest.approx(float(np.sum((g ** 2).sum(-1) * mass)), rel=1e-12)
        assert sup[i] == pytest.approx(float(np.sqrt((g ** 2).sum(-1).max())), rel=1e-12)


def test_along_flow_check_reads_the_rows_memo(lqr, monkeypatch):
    """The history row leaves the state's KL, D^h and edge rates in ``state.memo``; the along-flow check of that state
    takes them (no second pass; the symmetrised generator of its gaps from the rates, no logarithms) and its
    rates.csv row equals the row of a check that computes them itself, to round-off (the flow's D^h is summed in
    edge order by the compiled kernel; S from the rates and from the logs agree to a few ulps)."""
    from solver.along_flow import LocalRates

    problem, _ = lqr
    flow = runner.make_flow(problem)
    states = list(flows.trajectory(flow, bellman.uniform_policy(problem.mdp), 0.1))
    from solver import along_flow

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the check recomputed what the row's memo holds")

    rows = []
    for memo in (True, False):
        check = LocalRates(problem)
        for state in states[-2:]:
            state.memo.clear()
            with monkeypatch.context() as m:
                if memo:
                    diagnostics.record(flow, state, problem.J_star)
                    assert set(state.memo) == {"kl", ("dissipation", "sg"), ("rates", "sg")}
                    assert state.memo["kl"].shape == (problem.mdp.n_states,)
                    m.setattr(diagnostics, "kl_to_gibbs", no_second_pass)
                    m.setattr(along_flow, "dissipation", no_second_pass)
                    m.setattr(lsi, "_log_conductances", no_second_pass)
                check.check(state)
        rows.append(np.array(check.rows))
    np.testing.assert_allclose(rows[0], rows[1], rtol=1e-12, atol=0)  # round-off of the two D^h sums


def test_history_rows_reach_the_file_before_a_checkpoint(lqr, tmp_path, monkeypatch):
    """HistoryCSV flushes by time (not per row); the checkpointer flushes it first, so history.csv always reaches
    the checkpoint's step (what --resume needs)."""
    from solver import observers
    from solver.diagnostics import HISTORY_COLUMNS

    problem, states = lqr
    monkeypatch.setattr(observers, "FLUSH_SECONDS", math.inf)  # after the first row: only on request
    history = observers.HistoryCSV(tmp_path)
    history.start(problem)
    for i in range(2):
        history.observe({c: float(i) for c in HISTORY_COLUMNS}, states[i])
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 2  # the header and the first row
    flow = runner.make_flow(problem)
    flow.start(states[-1].p)
    assert checkpoint.Checkpointer(tmp_path, problem.config, flow, [history])(states[-1], final=True)
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 3
    history.finish(None)
