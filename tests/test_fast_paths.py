"""Every fast path agrees with the plain path it replaces (issue 14), and the structure of the flow survives it.

* ``T V`` by interpolation over a grid of means (:class:`solver.mdp.MeanInterpolation`) against the windowed
  CSR product (``interpolate=False``);
* the one-state policy evaluation (a scalar resolvent) against the generic ``P^pi`` + LU path;
* one BLAS thread for small LUs (:func:`solver.parallel.single_threaded_blas`) against the default threads, and
  the same code without threadpoolctl;
* the frozen-generator dissipation (edge rates computed once) against the statewise recomputation.
"""

import numpy as np
import pytest
import scipy.linalg as sla

from solver import bellman, diagnostics, flows, parallel
from solver.fem import interval_space
from solver.mdp import INTERPOLATION_TOLERANCE, GaussianGridKernel, build_mdp
from solver.models import bandit, lqr

from .conftest import LQR_PARAMS, random_policy


@pytest.fixture(scope="module")
def lqr_pair():
    """The same LQR MDP with and without the interpolated T V (41 states, sigma / h = 3 as in lqr_1d, 129 DOFs)."""
    model = lqr(**(LQR_PARAMS | {"sigma": 0.9}))
    states, space = np.linspace(-6, 6, 41), interval_space(-6, 6, 128)
    fast = build_mdp(model, states, space, 0.9, 0.3)
    plain_kernel = GaussianGridKernel(states, model.dynamics(states[:, None], space.coords[:, 0][None, :]),
                                      model.sigma, interpolate=False)
    plain = build_mdp(model, states, space, 0.9, 0.3)
    object.__setattr__(plain, "kernel", plain_kernel)  # the frozen dataclass: the reference path, for this test only
    return fast, plain


def test_interpolated_expectation_equals_the_windowed_product(lqr_pair):
    fast, plain = lqr_pair
    interp = fast.kernel.interpolation
    assert interp is not None and plain.kernel.interpolation is None
    # the measured operator bound: 10-point Lagrange on sigma / 24 is ~(1/24)^10 ~ 1e-14 of ||V||
    assert interp.error <= INTERPOLATION_TOLERANCE
    rng = np.random.default_rng(1)
    for V in (rng.normal(size=41), np.linspace(-6, 6, 41) ** 2, np.sign(np.linspace(-1, 1, 41))):
        reference = (plain.kernel.matrix @ V).reshape(41, -1)
        got = fast.kernel.expect(V)
        # the bound holds for every V (plus the round-off of two sparse products, ~1e-16 ||V||)
        assert np.max(np.abs(got - reference)) <= (interp.error + 1e-15) * np.max(np.abs(V))
        np.testing.assert_array_equal(fast.kernel.expect(V, slice(10, 25)), got[10:25])  # MPI row blocks


def test_interpolation_is_refused_where_it_would_not_be_exact():
    """A kernel narrower than the stencil (sigma / h = 0.2, window 11 < 10 + ...) keeps the windowed product."""
    states = np.linspace(-1, 1, 101)
    mean = np.tile(np.linspace(-1.2, 1.2, 7), (101, 1))
    kernel = GaussianGridKernel(states, mean, 0.004)
    assert kernel.interpolation is None


def test_flow_with_interpolated_q_equals_the_plain_flow(lqr_pair):
    """Same policies, values and structure along the flow (|dQ| <= gamma err |V| ~ 1e-13 per evaluation)."""
    fast, plain = lqr_pair
    p0 = random_policy(fast, 3)
    a = list(zip(range(6), flows.states("wasserstein", fast, p0, dt=0.5)))
    b = list(zip(range(6), flows.states("wasserstein", plain, p0, dt=0.5)))
    values = []
    for (_, sa), (_, sb) in zip(a, b):
        scale = np.max(np.abs(sb.evaluation.V))
        assert np.max(np.abs(sa.evaluation.V - sb.evaluation.V)) <= 1e-12 * scale
        np.testing.assert_allclose(sa.p, sb.p, rtol=1e-10, atol=1e-14)
        assert np.max(np.abs(sa.p @ fast.weights - 1)) < 1e-13 and sa.p.min() >= 0
        values.append(sa.evaluation.V)
    assert np.diff(np.array(values), axis=0).min() > -1e-12  # monotone V (theory.md §3)


def test_one_state_evaluation_equals_the_generic_path():
    mdp = build_mdp(bandit(k=1.0, center=0.5), np.array([0.0]), interval_space(-6, 6, 64), 0.9, 0.5)
    p = random_policy(mdp, 5)
    fast = bellman.evaluate(mdp, p)
    assert fast.resolvent.method == "scalar"
    masses = p * mdp.weights
    generic = bellman.Resolvent(mdp.kernel.policy_matrix(masses), mdp.gamma)
    assert generic.method == "dense"
    r_pi = np.einsum("ij,ij->i", masses, mdp.reward) - mdp.tau * bellman.kl_divergence(mdp, p, mdp.log_mu)
    V = generic.solve(r_pi)
    np.testing.assert_allclose(fast.V, V, rtol=1e-14)  # 1 / (1 - gamma P), P = sum m to round-off
    np.testing.assert_allclose(fast.Q, bellman.q_values(mdp, V), rtol=1e-14)
    rho = np.ones(1)
    np.testing.assert_allclose(fast.resolvent_adjoint(rho), generic.solve(rho, trans="T"), rtol=1e-14)
    fast.resolvent.release()
    with pytest.raises(RuntimeError, match="released"):
        fast.resolvent.solve(rho)


def test_single_threaded_lu_equals_the_threaded_one(small_well, monkeypatch):
    p = random_policy(small_well, 6)
    P = small_well.kernel.policy_matrix(p * small_well.weights)
    A = np.eye(small_well.n_states) - small_well.gamma * P.toarray()
    b = np.random.default_rng(7).normal(size=small_well.n_states)
    threaded = sla.lu_solve(sla.lu_factor(A), b)
    single = bellman.Resolvent(P, small_well.gamma, method="dense").solve(b)
    np.testing.assert_allclose(single, threaded, rtol=1e-13)  # only the blocking of the sums differs
    monkeypatch.setattr(parallel, "_BLAS", [None])  # as without threadpoolctl: a no-op context
    with parallel.single_threaded_blas(10):
        np.testing.assert_allclose(bellman.Resolvent(P, small_well.gamma, method="dense").solve(b), threaded,
                                   rtol=1e-13)


def test_frozen_dissipation_equals_the_statewise_one():
    mdp = build_mdp(bandit(k=1.0, center=0.5), np.array([0.0]), interval_space(-6, 6, 64), 0.9, 0.5)
    flow = flows.make("wasserstein", mdp, dt=0.1, integrator="exponential")
    states = [s for _, s in zip(range(4), flows.trajectory(flow, random_policy(mdp, 8), 1.0))]
    for state in states:
        cached = flow.dissipation(state)
        plain = flows.fokker_planck.dissipation(mdp, state.p, state.g)
        np.testing.assert_allclose(cached, plain, rtol=1e-12)  # g moves by a constant: rates equal to round-off
        assert cached[0] > 0
    row = diagnostics.record(flow, states[-1], 0.0)
    assert row["mass_error"] < 1e-14 and row["min_density"] >= 0


def test_single_threaded_blas_restores_the_thread_count():
    """Nested uses restore the count of their entry (threadpoolctl reads the real count back)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if parallel._controller() is None:
        pytest.skip("no BLAS library seen by threadpoolctl")

    def threads():
        return threadpoolctl.threadpool_info()[0]["num_threads"]

    before = threads()
    with parallel.single_threaded_blas(10):
        assert threads() == 1
        with parallel.single_threaded_blas(10):
            assert threads() == 1
        assert threads() == 1
    assert threads() == before
    with parallel.single_threaded_blas(parallel.SMALL_BLAS_ROWS + 1):  # large: untouched
        assert threads() == before
