"""Every fast path agrees with the plain path it replaces (issue 14), and the structure of the flow survives it.

* ``T V`` by interpolation over a grid of means (:class:`solver.mdp.MeanInterpolation`) against the windowed
  CSR product (``interpolate=False``);
* the one-state policy evaluation (a scalar resolvent) against the generic ``P^pi`` + LU path;
* one BLAS thread for small LUs (:func:`solver.parallel.single_threaded_blas`) against the default threads, and
  the same code without threadpoolctl;
* the frozen-generator dissipation (edge rates computed once) against the statewise recomputation;
* ``P^pi`` dense by interpolation over a grid of means (:class:`solver.mdp.InterpolatedPolicy`) against the
  windowed CSR product, and the dense-input LU against the CSR one;
* the compiled chain solve of the implicit step (numba, when installed) against LAPACK's banded solve;
* the kept ``log p`` (entropy, dissipation, :meth:`solver.bellman.Evaluation.kl_gibbs`), the branch-free SG edge
  rates and the one-reduction finiteness check against the expressions they replace.
"""

import numpy as np
import pytest
import scipy.linalg as sla

from solver import bellman, diagnostics, flows, parallel
from solver.flows import fokker_planck
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


def test_interpolated_policy_matrix_equals_the_windowed_one(lqr_pair):
    fast, plain = lqr_pair
    interp = fast.kernel.policy_interpolation
    assert interp is not None and plain.kernel.policy_interpolation is None
    assert plain.kernel.dense_policy_matrix(np.ones((41, 129))) is None
    # the measured operator bound: 16 Lagrange nodes on sigma / 8 is ~14 (1/8)^16 ~ 5e-14
    assert interp.error <= INTERPOLATION_TOLERANCE
    for seed in (0, 1):  # a rough random policy and a smooth one (Gibbs-like)
        p = random_policy(fast, seed) if seed == 0 else bellman.gibbs(fast, np.outer(np.ones(41), -np.linspace(
            -6, 6, 129) ** 2))
        masses = p * fast.weights
        P = fast.kernel.dense_policy_matrix(masses)
        reference = plain.kernel.policy_matrix(masses).toarray()
        # row sums of |P - P_windowed| <= err sum_j m_ij = err (plus the round-off of the sums, ~1e-16)
        assert np.abs(P - reference).sum(axis=1).max() <= interp.error + 1e-15
        assert P.min() >= 0  # clipped: I - gamma P stays an M-matrix
        np.testing.assert_allclose(P.sum(axis=1), masses.sum(axis=1), rtol=0, atol=1e-14)  # mass: Lagrange sums to 1


def test_dense_resolvent_equals_the_csr_one(small_well):
    P = small_well.kernel.policy_matrix(random_policy(small_well, 4) * small_well.weights)
    b = np.random.default_rng(2).normal(size=small_well.n_states)
    dense = P.toarray()
    for method in ("auto", "dense", "sparse"):
        a, c = bellman.Resolvent(dense.copy(), 0.8, method), bellman.Resolvent(P, 0.8, method)
        assert a.method == c.method
        for trans in ("N", "T"):  # cond(I - gamma P) <= 9: round-off of two LU orders, ~1e-15
            np.testing.assert_allclose(a.solve(b, trans), c.solve(b, trans), rtol=1e-13, atol=1e-14)


def test_gibbs_fixed_point_and_monotone_values_on_the_fast_paths(lqr_pair):
    """pi* of the fast MDP (SPI through the interpolated P^pi and Q) is a fixed point of the flow to round-off."""
    fast, _ = lqr_pair
    opt = bellman.soft_policy_iteration(fast)
    assert opt.residual <= 1e-10 * max(1.0, np.abs(opt.V).max())
    states = [s for _, s in zip(range(3), flows.states("wasserstein", fast, opt.p, dt=0.5))]
    for state in states[1:]:
        np.testing.assert_allclose(state.p, opt.p, rtol=1e-9, atol=1e-12)  # all fluxes vanish at u = const
        assert np.abs(state.evaluation.V - opt.V).max() <= 1e-11 * np.abs(opt.V).max()


@pytest.mark.parametrize("jump", [0.3, 8.0])
def test_compiled_chain_solve_equals_the_banded_one(monkeypatch, jump):
    """The numba Thomas sweep against LAPACK's gbsv, for mild and for stiff potentials (|dg| up to ~30)."""
    pytest.importorskip("numba")
    space = interval_space(-2, 2, 63)
    rng = np.random.default_rng(3)
    g = np.cumsum(rng.normal(scale=jump, size=(9, 64)), axis=1)
    masses = rng.uniform(0.0, 1.0, size=(9, 64)) * space.weights
    masses[0, :10] = 0.0  # zero masses stay exactly zero-or-positive
    monkeypatch.setattr(fokker_planck, "COMPILED_MIN_ENTRIES", 0)
    monkeypatch.setenv(parallel.NUMBA_VARIABLE, "0")
    banded = fokker_planck.implicit_step(space, masses, g, 0.5, 0.1)
    monkeypatch.setenv(parallel.NUMBA_VARIABLE, "1")
    if parallel.compiled(fokker_planck._thomas_chain, fokker_planck.THOMAS_SIGNATURE) is None:
        pytest.skip("numba is installed but cannot compile here")
    fast = fokker_planck.implicit_step(space, masses, g, 0.5, 0.1)
    # both direct without pivoting on a column dominant M-matrix (condition <= 1 + 2 dt max rate): round-off
    np.testing.assert_allclose(fast, banded, rtol=1e-12, atol=1e-16)
    assert fast.min() >= 0
    np.testing.assert_allclose(fast.sum(axis=1), masses.sum(axis=1), rtol=1e-14)  # 1^T (I - dt L) = 1^T


def test_compiled_histogram_and_gather_equal_the_sparse_products(lqr_pair, monkeypatch):
    pytest.importorskip("numba")
    from solver import mdp as mdp_module

    fast, _ = lqr_pair
    kernel = fast.kernel
    monkeypatch.setattr(mdp_module, "COMPILED_MIN_ENTRIES", 0)
    model = lqr(**(LQR_PARAMS | {"sigma": 0.9}))
    mean = model.dynamics(fast.states[:, None], fast.space.coords[:, 0][None, :])
    policy = mdp_module.InterpolatedPolicy(mdp_module.MeanInterpolation(
        fast.states, mean, 0.9, kernel.matrix, mdp_module.POLICY_GRID_PER_SIGMA, mdp_module.POLICY_DEGREE), 41, 129)
    masses = random_policy(fast, 5) * fast.weights
    monkeypatch.setenv(parallel.NUMBA_VARIABLE, "0")
    sparse = policy(masses)
    monkeypatch.setenv(parallel.NUMBA_VARIABLE, "1")
    if parallel.compiled(mdp_module._histogram, mdp_module.HISTOGRAM_SIGNATURE) is None:
        pytest.skip("numba is installed but cannot compile here")
    np.testing.assert_array_equal(policy(masses), sparse)  # the same sums in the same order
    interp = mdp_module.MeanInterpolation(fast.states, mean, 0.9, kernel.matrix)  # the T V one, compiled gather
    V = np.random.default_rng(6).normal(size=41)
    gathered = interp.expect(V, 129)
    np.testing.assert_array_equal(interp.expect(V, 129, slice(7, 30)), gathered[7:30])  # MPI row blocks
    monkeypatch.setenv(parallel.NUMBA_VARIABLE, "0")
    np.testing.assert_array_equal(gathered, interp.expect(V, 129))


@pytest.mark.parametrize("numba", ["0", "1"])
def test_row_blocks_of_the_sparse_fine_grid_equal_the_whole_product(lqr_pair, monkeypatch, numba):
    """With ``T_fine`` sparse (above FINE_DENSE_ENTRIES), a block of states (MPI) computes ``T_fine V`` only at the
    fine nodes its means read; its rows of ``T V`` equal the whole product's bit for bit (the same row sums), on the
    compiled gather and on the CSR path."""
    from solver import mdp as mdp_module

    fast, _ = lqr_pair
    monkeypatch.setattr(mdp_module, "FINE_DENSE_ENTRIES", 0)
    monkeypatch.setattr(mdp_module, "COMPILED_MIN_ENTRIES", 0)
    monkeypatch.setenv(parallel.NUMBA_VARIABLE, numba)
    mean = lqr(**(LQR_PARAMS | {"sigma": 0.9})).dynamics(fast.states[:, None], fast.space.coords[:, 0][None, :])
    interp = mdp_module.MeanInterpolation(fast.states, mean, 0.9, fast.kernel.matrix)
    assert interp._fine_dense is None
    V = np.random.default_rng(7).normal(size=41)
    whole = interp.expect(V, 129)
    for rows in (slice(0, 20), slice(20, 41), slice(7, 30), slice(40, 41)):
        block = interp.expect(V, 129, rows)
        assert np.isfinite(block).all()  # no NaN of the nodes left out is read
        np.testing.assert_array_equal(block, whole[rows])


def test_compiled_rates_and_dissipation_equal_numpy(small_well, monkeypatch):
    pytest.importorskip("numba")
    p = random_policy(small_well, 11)
    ev = bellman.evaluate(small_well, p)
    g = flows.potential(small_well, ev.Q)
    g[0, 3:6] = g[0, 2]  # dg = 0 exactly: B(0) = 1
    monkeypatch.setattr(fokker_planck, "COMPILED_MIN_ENTRIES", 0)
    if parallel.compiled(fokker_planck._sg_chain_rates_dissipation, fokker_planck.FUSED_SIGNATURE) is None:
        pytest.skip("numba is installed but cannot compile here")
    (fwd, bwd), D = fokker_planck.rates_and_dissipation(small_well, p, g, "sg", ev.log_p)
    reference = fokker_planck.edge_rates(small_well.space, g, small_well.tau)
    # the same operations; numpy's exp may be its own SIMD one, not libm's as in numba: an ulp
    np.testing.assert_allclose(fwd, reference[0], rtol=4e-16, atol=0)
    np.testing.assert_allclose(bwd, reference[1], rtol=4e-16, atol=0)
    # sums of ~40 positive terms in another order: round-off
    np.testing.assert_allclose(D, fokker_planck.dissipation(small_well, p, g, "sg", reference), rtol=1e-13)
    assert D.min() > 0


def test_bernoulli_to_two_ulp_against_extended_precision():
    """Series below BERNOULLI_SERIES_BELOW, x / (e^x - 1) above: the junction, tiny, large and negative x
    against x / expm1(x) in x87 extended precision (64-bit mantissa: a reference 2^11 times finer)."""
    if np.finfo(np.longdouble).eps > 1e-18:
        pytest.skip("no extended precision long double here")
    cut = fokker_planck.BERNOULLI_SERIES_BELOW
    x = np.concatenate([np.linspace(0.0, 2.0, 4001), cut + np.array([-1e-15, 0.0, 1e-15]),
                        np.logspace(-300, 2.8, 3000)])
    x = np.concatenate([x, -x])
    with np.errstate(invalid="ignore"):  # 0 / 0 at x = 0
        reference = x.astype(np.longdouble) / np.expm1(x.astype(np.longdouble))
    reference[x == 0] = 1.0
    got = fokker_planck.bernoulli(x)
    ulps = np.abs((got - reference) / reference).astype(float) / np.finfo(float).eps
    assert ulps.max() <= 2.0, f"{ulps.max():.2f} ulp at x = {x[ulps.argmax()]:.17g}"
    assert got[x == 0].tolist() == [1.0, 1.0]
    np.testing.assert_array_equal(fokker_planck.bernoulli(np.array([800.0, -800.0])), [0.0, 800.0])  # no overflow


def test_compiled_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(parallel.NUMBA_VARIABLE, "0")
    assert parallel.compiled(fokker_planck._thomas_chain, fokker_planck.THOMAS_SIGNATURE) is None


def test_kept_log_p_gives_the_same_entropy_dissipation_and_kl(small_well):
    p = random_policy(small_well, 9)
    p[3, :5] = 0.0  # 0 log 0 = 0
    p /= (p @ small_well.weights)[:, None]
    ev = bellman.evaluate(small_well, p)
    assert ev.log_p is not None
    np.testing.assert_array_equal(bellman.kl_divergence(small_well, p, small_well.log_mu, ev.log_p),
                                  bellman.kl_divergence(small_well, p, small_well.log_mu))  # same operations
    g = flows.potential(small_well, ev.Q)
    rates = fokker_planck.edge_rates(small_well.space, g, small_well.tau)
    np.testing.assert_array_equal(fokker_planck.dissipation(small_well, p, g, "sg", rates, ev.log_p),
                                  fokker_planck.dissipation(small_well, p, g, "sg", rates))
    reference = bellman.kl_divergence(small_well, p, bellman.log_gibbs(small_well, ev.Q)[0])
    # the history row's KL from the flow's potential g (round-off of log p - log G; |log p| <= ~40 here)
    np.testing.assert_allclose(diagnostics.kl_to_gibbs(small_well, p, g), reference, rtol=0, atol=1e-14)
    opt = bellman.soft_policy_iteration(small_well)  # at the Gibbs fixed point KL = 0: no cancellation blow-up
    g_star = flows.potential(small_well, bellman.evaluate(small_well, opt.p).Q)
    assert np.abs(diagnostics.kl_to_gibbs(small_well, opt.p, g_star)).max() <= 1e-15


def test_branch_free_sg_rates_equal_the_selected_ones(small_well):
    g = flows.potential(small_well, bellman.evaluate(small_well, random_policy(small_well, 2)).Q)
    g[0, 3:6] = g[0, 2]  # dg = 0 exactly
    fwd, bwd = fokker_planck.edge_rates(small_well.space, g, small_well.tau)
    j, k = small_well.space.edges[:, 0], small_well.space.edges[:, 1]
    dg = g[:, k] - g[:, j]
    small = fokker_planck.bernoulli(np.abs(dg))
    large = np.abs(dg) + small
    scale = small_well.tau * small_well.space.conductance
    np.testing.assert_array_equal(fwd, scale * np.where(dg > 0, large, small))
    np.testing.assert_array_equal(bwd, scale * np.where(dg > 0, small, large))


def test_one_reduction_finiteness_check():
    assert flows.base.all_finite(np.ones(5)) and flows.base.all_finite(np.full(4, 1e308))  # sum overflows: checked
    assert not flows.base.all_finite(np.array([1.0, np.nan])) and not flows.base.all_finite(np.array([np.inf, -1.0]))
